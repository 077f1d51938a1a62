"""A job on a Hugging Face model: its archive loaded, its text dataset tokenized, its objective chosen.

The spec's ``loss`` and ``metric`` are replaced by the objective's (``core.io.hf.prepare``): cross_entropy and
accuracy for classification, MSE and loss otherwise (the report adds the embedding cosine or the perplexity).
Distillation always uses the true Fisher (``fisher.kind: true``): its empirical Fisher is zero at the dense model.
"""

from __future__ import annotations

import os

from torch import nn

from core.engine.grads import Loss
from core.errors import InvalidInput
from core.io.data import Dataset
from core.io.data.text import TEXT_FORMATS, read_text_dataset
from core.io.hf.load import load_hf_archive
from core.io.hf.prepare import prepare_text_job
from core.runs.onnx_job import NO_TOKENIZER
from core.runs.spec import FisherKind, PruneSpec

__all__ = ["check_pairing", "load_hf_job"]


def check_pairing(model_format: str, data_format: str) -> None:
    """Text datasets go with Hugging Face models (tokenized with their tokenizer) or, pre-tokenized (``.jsonl`` of
    ``input_ids``), with ONNX models; Hugging Face models go with text datasets (at job creation)."""
    hf, text = model_format == "huggingface", data_format in TEXT_FORMATS
    if model_format == "onnx" and text:
        if data_format != "jsonl":
            raise InvalidInput(
                NO_TOKENIZER, errors=[{"loc": ["dataset_id"], "msg": NO_TOKENIZER, "type": "value_error"}]
            )
        return
    if hf != text:
        detail = (
            f"a Hugging Face model runs on a text dataset (jsonl, txt or parquet with a text column), this one is "
            f"{data_format}"
            if hf
            else f"a {data_format} text dataset needs a Hugging Face model (its tokenizer reads it), this one is "
            f"{model_format}"
        )
        raise InvalidInput(detail, errors=[{"loc": ["dataset_id"], "msg": detail, "type": "value_error"}])


def load_hf_job(
    spec: PruneSpec, model_path: str | os.PathLike, data_path: str | os.PathLike, data_format: str
) -> tuple[PruneSpec, nn.Module, Dataset]:
    """The spec as the run executes it, the adapter and the tensors, from the stored archive and dataset file."""
    check_pairing("huggingface", data_format)
    text = read_text_dataset(data_path, data_format)
    loaded = load_hf_archive(model_path, need_tokenizer=text.input_ids is None)
    t = spec.text
    prepared = prepare_text_job(
        loaded,
        text,
        max_length=t.max_length,
        packing=t.packing,
        objective=t.objective,
        mask_fraction=t.mask_fraction,
        seed=spec.seed,
    )
    fisher = spec.fisher
    if prepared.objective == "distillation":
        # the residuals to the dense outputs are zero at the dense model, and so is every empirical-Fisher gradient:
        # the Fisher of distillation is the true one (targets sampled around the outputs), the Gauss-Newton matrix
        fisher = fisher.model_copy(update={"kind": FisherKind.TRUE})
    elif prepared.loss == "mse" and fisher.kind is FisherKind.TRUE:
        raise InvalidInput(
            f"fisher.kind 'true' samples targets from the model's outputs; the {prepared.objective} objective has "
            "none here: use fisher.kind 'empirical'",
            errors=[{"loc": ["spec", "fisher", "kind"], "msg": "empirical only here", "type": "value_error"}],
        )
    spec = spec.model_copy(update={"loss": Loss(prepared.loss), "metric": prepared.metric, "fisher": fisher})
    return spec, prepared.model, prepared.data
