"""A job on an imported ONNX transformer (inputs ``input_ids``, ``attention_mask``, …) with a pre-tokenized dataset.

An ONNX upload has no tokenizer, so its text dataset is a ``.jsonl`` of ``input_ids`` (and ``attention_mask``)
rows; text data is a 422 that says so. The rows are padded with 0 to the longest (at most ``spec.text.max_length``)
and handed to the graph by name (:mod:`core.io.onnx.packed`): ``input_ids`` and ``attention_mask`` from the data,
``token_type_ids`` zeros and ``position_ids`` 0..L-1 when the graph takes them; any other input is a 422 naming it.

Objective: labels → cross-entropy on the graph's ``(N, classes)`` output (metric accuracy); no labels →
distillation, MSE between the pruned and the dense graph's output (hidden states or logits, every position), the
true Fisher (its empirical one is zero at the dense model), metric the output cosine.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from core.engine.grads import Loss
from core.errors import InvalidInput
from core.io.data import Dataset
from core.io.data.text import TextData, read_text_dataset
from core.io.model_files import load_model
from core.io.onnx.module import OnnxModule
from core.io.onnx.packed import InputSlot, PackedOnnxModule, pack
from core.runs.spec import FisherKind, PruneSpec

__all__ = ["NO_TOKENIZER", "bind_named_inputs", "load_onnx_text_job", "token_inputs"]

NO_TOKENIZER = (
    "an ONNX model has no tokenizer: its text dataset must be pre-tokenized, a .jsonl of rows with 'input_ids' "
    "(and 'attention_mask', optional 'label'), tokenized with the model's own tokenizer"
)
_CHUNK = 64


def _bad(msg: str, loc: list) -> InvalidInput:
    return InvalidInput(msg, errors=[{"loc": loc, "msg": msg, "type": "value_error"}])


def token_inputs(data: TextData, max_length: int) -> dict[str, Tensor]:
    """``input_ids``, ``attention_mask``, ``token_type_ids`` and ``position_ids``, int64 ``(N, L)``, padded with 0
    to the longest row (at most ``max_length``)."""
    if data.input_ids is None:
        raise _bad(NO_TOKENIZER, ["dataset_id"])
    rows = [r[:max_length] for r in data.input_ids]
    masks = [m[:max_length] for m in (data.attention_mask or [[1] * len(r) for r in rows])]
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, m) in enumerate(zip(rows, masks, strict=True)):
        ids[i, : len(r)], att[i, : len(m)] = torch.tensor(r), torch.tensor(m)
    positions = torch.arange(width).expand(len(rows), width).clone()
    return {"input_ids": ids, "attention_mask": att, "token_type_ids": torch.zeros_like(ids), "position_ids": positions}


def _slots(module: OnnxModule, arrays: dict[str, Tensor]) -> list[InputSlot]:
    missing = [n for n in module.input_names if n not in arrays]
    if missing:
        raise _bad(
            f"the ONNX model's inputs {missing} are not in a pre-tokenized dataset (it supplies input_ids and "
            "attention_mask; token_type_ids and position_ids are filled in)",
            ["model_id"],
        )
    slots = []
    for n in module.input_names:
        dtype = module.input_types.get(n) or torch.int64
        if dtype.is_complex or dtype == torch.bool:
            raise _bad(f"the ONNX model's input {n!r} is {dtype}: token inputs are integers or floats", ["model_id"])
        slots.append(InputSlot(n, tuple(arrays[n].shape[1:]), dtype))
    return slots


@torch.no_grad()
def _dense_outputs(module: PackedOnnxModule, x: Tensor) -> Tensor:
    outs = [module(x[i : i + _CHUNK]) for i in range(0, len(x), _CHUNK)]
    if not all(isinstance(o, Tensor) for o in outs):
        raise _bad("the ONNX model has several outputs: a job needs one (logits or hidden states)", ["model_id"])
    return torch.cat(outs).detach().float()


def load_onnx_text_job(
    spec: PruneSpec, model_path: str | os.PathLike, data_path: str | os.PathLike, data_format: str
) -> tuple[PruneSpec, PackedOnnxModule, Dataset]:
    """The spec as the run executes it, the packed module and the tensors (see the module docstring)."""
    if data_format != "jsonl":
        raise _bad(NO_TOKENIZER, ["dataset_id"])
    if spec.text.objective not in ("auto", "classification", "distillation") or spec.text.packing:
        raise _bad(
            "an ONNX model's job is classification (labels) or distillation (no labels): no token objectives or "
            "packing (they need the model's heads and tokenizer: upload it as a Hugging Face archive)",
            ["spec", "text"],
        )
    text = read_text_dataset(data_path, data_format)
    arrays = token_inputs(text, spec.text.max_length)
    module = load_model(model_path, "onnx")
    if not isinstance(module, OnnxModule):  # load_model(…, "onnx") builds one; anything else is a server bug
        raise TypeError(f"expected an OnnxModule, got {type(module).__name__}")
    slots = _slots(module, arrays)
    x = pack(slots, arrays)
    classify = text.labels is not None and spec.text.objective != "distillation"
    if spec.text.objective == "classification" and text.labels is None:
        raise _bad("objective 'classification' needs labelled data", ["spec", "text", "objective"])
    packed = PackedOnnxModule.from_module(module, slots, distill=not classify).eval()
    fisher = spec.fisher
    if classify:
        data = Dataset(x_train=x, y_train=torch.tensor(text.labels, dtype=torch.long))
        loss, metric = Loss.CROSS_ENTROPY, "accuracy"
    else:
        data = Dataset(x_train=x, y_train=_dense_outputs(packed, x))
        loss, metric = Loss.MSE, "loss"
        fisher = fisher.model_copy(update={"kind": FisherKind.TRUE})
    return spec.model_copy(update={"loss": loss, "metric": metric, "fisher": fisher}), packed, data


def bind_named_inputs(model: nn.Module, data: Dataset) -> nn.Module:
    """``model`` as it runs on ``data``: an ONNX graph of several inputs on a dataset of named inputs (``x.<name>``
    arrays, :mod:`core.io.data.formats`) becomes a :class:`PackedOnnxModule` fed by name, each input in the graph's
    dtype; plain features leave it as is. Names that do not match the graph's inputs are a 422 naming both."""
    if data.named_inputs is None:
        return model
    names = [n for n, _ in data.named_inputs]
    if not isinstance(model, OnnxModule):
        raise _bad(
            f"the dataset holds named inputs {names}: they feed an ONNX model of those inputs, not this model",
            ["dataset_id"],
        )
    if sorted(names) != sorted(model.input_names):
        raise _bad(f"the dataset's named inputs {names} are not the ONNX model's inputs {model.input_names}",
                   ["dataset_id"])  # fmt: skip
    slots = []
    for name, shape in data.named_inputs:
        dtype = model.input_types.get(name) or torch.float32
        if dtype.is_complex or dtype == torch.bool:
            raise _bad(f"the ONNX model's input {name!r} is {dtype}: inputs are integers or floats", ["model_id"])
        slots.append(InputSlot(name, shape, dtype))
    return PackedOnnxModule.from_module(model, slots).train(model.training)
