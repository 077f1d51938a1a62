"""ONNX in (a safe, op-by-op importer to an nn.Module) and out (export of pruned models)."""

from core.io.onnx.build import onnx_to_torch
from core.io.onnx.export import export_onnx
from core.io.onnx.module import OnnxModule

__all__ = ["OnnxModule", "export_onnx", "onnx_to_torch"]
