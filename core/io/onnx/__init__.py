"""ONNX in (a safe, op-by-op importer to an nn.Module) and out (export of pruned models)."""
