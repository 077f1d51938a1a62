"""A text dataset and a Hugging Face model → the adapter and the tensors a run prunes with.

The objective comes from the model's head and the data unless the caller names one:

* labels and a sequence-classification head → ``classification`` (cross-entropy, metric accuracy);
* a causal LM head → next-token loss (metric perplexity; ``packing`` concatenates the texts and cuts them into
  ``max_length`` windows);
* a masked LM head → masked-token loss, the masked positions drawn once with a seeded generator (``mask_fraction``
  of the real tokens, at least one per example, all replaced by the mask token);
* otherwise (an encoder, a sentence embedder) → ``distillation``: MSE between the pruned and the dense model's
  pooled embeddings, the targets computed once here from the dense model (metric: their cosine).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from core.errors import InvalidInput
from core.io.data.dataset import Dataset
from core.io.data.text import TextData
from core.io.hf.adapter import HFAdapter
from core.io.hf.load import LoadedHF

__all__ = ["OBJECTIVE_NAMES", "Prepared", "prepare_text_job"]

#: what a spec may name (``auto``: from the head and the data)
OBJECTIVE_NAMES = ("auto", "classification", "causal_lm", "masked_lm", "distillation")
_CHUNK = 64


@dataclass
class Prepared:
    model: HFAdapter
    data: Dataset
    objective: str  # one of OBJECTIVE_NAMES less auto
    loss: str  # cross_entropy | mse (the engine's losses)
    metric: str  # accuracy | loss


def _bad(msg: str, loc: list) -> InvalidInput:
    return InvalidInput(msg, errors=[{"loc": loc, "msg": msg, "type": "value_error"}])


def choose_objective(head: str, has_labels: bool, asked: str) -> str:
    if asked != "auto":
        if asked == "classification" and (head != "sequence_classification" or not has_labels):
            raise _bad(
                "objective 'classification' needs a sequence-classification model and labelled data",
                ["spec", "text", "objective"],
            )
        if asked in ("causal_lm", "masked_lm") and head != asked:
            raise _bad(
                f"objective {asked!r} needs a {asked.replace('_', ' ')} head, the model's is {head!r}",
                ["spec", "text", "objective"],
            )
        return asked
    if head == "sequence_classification":
        if not has_labels:
            return "distillation"
        return "classification"
    if head in ("causal_lm", "masked_lm"):
        return head
    return "distillation"


def _tokens(loaded: LoadedHF, data: TextData, max_length: int, packing: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(ids, attention, special) int64 (N, L), padded to the longest example (at most ``max_length``)."""
    if data.input_ids is not None:
        rows = [ids[:max_length] for ids in data.input_ids]
        masks = [m[:max_length] for m in data.attention_mask or [[1] * len(r) for r in rows]]
        specials = [[0] * len(r) for r in rows]
        pad = loaded.tokenizer.pad_id if loaded.tokenizer else 0
    else:
        if loaded.tokenizer is None:
            raise _bad(
                "the model has no tokenizer: upload tokenizer.json with it, or pre-tokenized input_ids", ["dataset_id"]
            )
        tok = loaded.tokenizer
        encs = tok.encode(data.texts or [], max_length if not packing else 1_000_000)
        rows = [list(e.ids) for e in encs]
        masks = [list(e.attention_mask) for e in encs]
        specials = [list(e.special_tokens_mask) for e in encs]
        pad = tok.pad_id
    if packing:
        eos = loaded.tokenizer.eos_id if loaded.tokenizer else None
        stream: list[int] = []
        for r in rows:
            stream += r + ([eos] if eos is not None else [])
        n = len(stream) // max_length
        if n == 0:
            raise _bad(
                f"packing needs at least max_length = {max_length} tokens, the texts hold {len(stream)}",
                ["spec", "text", "max_length"],
            )
        ids = torch.tensor(stream[: n * max_length]).view(n, max_length)
        return ids, torch.ones_like(ids), torch.zeros_like(ids)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    spc = torch.ones((len(rows), width), dtype=torch.long)
    for i, (r, m, s) in enumerate(zip(rows, masks, specials, strict=True)):
        ids[i, : len(r)], att[i, : len(m)], spc[i, : len(s)] = torch.tensor(r), torch.tensor(m), torch.tensor(s)
    return ids, att, spc


def _vocab_check(ids: Tensor, loaded: LoadedHF) -> None:
    vocab = getattr(loaded.built.model.config, "vocab_size", None)
    if isinstance(vocab, int) and int(ids.max()) >= vocab:
        raise _bad(f"token id {int(ids.max())} is outside the model's vocabulary of {vocab}", ["dataset_id"])


def _masked(ids: Tensor, att: Tensor, special: Tensor, mask_id: int | None, fraction: float, seed: int):
    if mask_id is None:
        raise _bad("masked-LM objective: the tokenizer has no mask token", ["spec", "text", "objective"])
    gen = torch.Generator().manual_seed(int(seed))
    real = (att == 1) & (special == 0)
    draw = (torch.rand(ids.shape, generator=gen) < fraction) & real
    # at least one masked token per example that has a real token: the first real one when the draw chose none
    first = real & (real.long().cumsum(1) == 1)
    draw |= first & ~draw.any(1, keepdim=True)
    labels = torch.where(draw, ids, torch.full_like(ids, -100))
    return torch.where(draw, torch.full_like(ids, mask_id), ids), labels


@torch.no_grad()
def _dense_targets(adapter: HFAdapter, x: Tensor) -> Tensor:
    return torch.cat([adapter(x[i : i + _CHUNK]) for i in range(0, len(x), _CHUNK)]).detach()


def prepare_text_job(
    loaded: LoadedHF,
    data: TextData,
    *,
    max_length: int,
    packing: bool | None,
    objective: str,
    mask_fraction: float,
    seed: int,
) -> Prepared:
    """The adapter for the chosen objective and the tensors of the run (see the module docstring)."""
    head = loaded.built.head
    chosen = choose_objective(head, data.labels is not None, objective)
    pack = bool(packing) and chosen == "causal_lm"
    if packing and chosen != "causal_lm":
        raise _bad("packing is for causal LMs only", ["spec", "text", "packing"])
    ids, att, special = _tokens(loaded, data, max_length, pack)
    _vocab_check(ids, loaded)
    hf = loaded.built.model
    if chosen == "classification":
        adapter = HFAdapter(hf, "classification", causal=False, source=loaded.source)
        x = torch.stack([ids, att], 1).float()
        return Prepared(
            adapter,
            Dataset(
                x_train=x, y_train=torch.tensor(data.labels, dtype=torch.long), num_classes=int(hf.config.num_labels)
            ),
            chosen,
            "cross_entropy",
            "accuracy",
        )
    if chosen == "distillation":
        adapter = HFAdapter(hf, "distillation", causal=False, source=loaded.source)
        x = torch.stack([ids, att], 1).float()
        return Prepared(adapter, Dataset(x_train=x, y_train=_dense_targets(adapter, x)), chosen, "mse", "loss")
    if chosen == "causal_lm":
        labels = torch.where(att == 1, ids, torch.full_like(ids, -100))
        inputs = ids
    else:
        inputs, labels = _masked(
            ids, att, special, loaded.tokenizer.mask_id if loaded.tokenizer else None, mask_fraction, seed
        )
    adapter = HFAdapter(hf, "tokens", causal=chosen == "causal_lm", source=loaded.source)
    x = torch.stack([inputs, att, labels], 1).float()
    return Prepared(adapter, Dataset(x_train=x, y_train=torch.zeros(len(x), 1)), chosen, "mse", "loss")
