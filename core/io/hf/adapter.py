"""A transformers model as a plain ``nn.Module`` of ONE tensor, so the engine, the run and the checkpoints use it as is.

Input ``x``: float32 ``(N, C, L)`` holding integers (exact below 2**24): channel 0 the token ids, 1 the attention
mask (1 = token, 0 = padding), and for the token objectives 2 the target ids (-100 where no target). The output,
per objective:

* ``classification``: the logits ``(N, classes)`` (loss cross_entropy against the labels);
* ``distillation``: the pooled embedding ``(N, H)`` (mean over the tokens, or the pooling of ``1_Pooling``), the
  loss MSE against the dense model's embedding;
* ``tokens`` (causal LM next token, masked LM masked tokens): ``sqrt(nll)`` ``(N, 1)`` where ``nll`` is the
  example's mean token negative log-likelihood, so that the engine's MSE against 0 *is* the token loss and its
  gradient exactly the gradient of the token cross-entropy (``d(sqrt(nll)^2) = d nll``).

The attention mask is handed to the model as an additive 4-D mask built here (causal for causal LMs): transformers
then skips its own mask construction, whose data-dependent branches ``torch.func.vmap`` cannot batch.

The model's children are registered as the adapter's own, so its parameter and state-dict names are the model's
(``encoder.layer.0.attention.self.query.weight``): ``pruned.safetensors`` keeps them, and ``functional_call`` on the
adapter swaps the very parameters the model uses.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.io.hf.export import write_hf_zip
from core.io.hf.source import HFSource

__all__ = ["OBJECTIVES", "HFAdapter", "HFSource", "block_linear_names"]

OBJECTIVES = ("classification", "distillation", "tokens")
_NLL_FLOOR = 1e-12


def _is_weight_module(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")  # GPT-2's transposed Linear


def block_linear_names(model: nn.Module) -> list[str]:
    """The weights of the Linear layers inside the transformer blocks (those under an ``nn.ModuleList``): not the
    embeddings, the LM head, the classifier or the pooler."""
    lists = [name for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    out = []
    for name, module in model.named_modules():
        if _is_weight_module(module) and any(name.startswith(prefix + ".") for prefix in lists):
            out.append(f"{name}.weight")
    return out


def additive_mask(attention: Tensor, causal: bool, dtype: torch.dtype) -> Tensor:
    """``(B, 1, L|1, L)``: 0 where a query may attend, the dtype's lowest value elsewhere."""
    allow = attention[:, None, None, :] > 0.5
    if causal:
        n = attention.shape[-1]
        allow = allow & torch.ones(n, n, dtype=torch.bool, device=attention.device).tril()
    return torch.zeros(allow.shape, dtype=dtype, device=attention.device).masked_fill(~allow, torch.finfo(dtype).min)


def pool(hidden: Tensor, attention: Tensor, mode: str | None) -> Tensor:
    """Sentence embedding of ``hidden`` (B, L, H) over the tokens where ``attention`` is 1."""
    if mode == "cls":
        return hidden[:, 0]
    a = attention.to(hidden.dtype)[..., None]
    if mode == "max":
        return hidden.masked_fill(a == 0, torch.finfo(hidden.dtype).min).amax(1)
    return (hidden * a).sum(1) / a.sum(1).clamp_min(1.0)


class HFAdapter(nn.Module):
    """``model(x)`` for a transformers model (see the module docstring); ``objective`` in :data:`OBJECTIVES`."""

    def __init__(self, hf: nn.Module, objective: str, *, causal: bool, source: HFSource):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}")
        for name, child in hf.named_children():
            self.add_module(name, child)
        self.__dict__["hf"] = hf  # not a submodule: the children above are its parameters
        self.objective, self.causal, self.source = objective, causal, source

    def default_prunable_names(self) -> list[str]:
        return block_linear_names(self)

    def forward(self, x: Tensor) -> Tensor:
        ids = x[:, 0].long()
        attention = x[:, 1]
        param = next(self.parameters())
        mask = additive_mask(attention, self.causal, param.dtype)
        if self.objective == "classification":
            return self.hf(input_ids=ids, attention_mask=mask).logits
        if self.objective == "distillation":
            out = self.hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            hidden = getattr(out, "last_hidden_state", None)
            if hidden is None:
                hidden = out.hidden_states[-1]
            return pool(hidden, attention, self.source.pooling)
        labels = x[:, 2].long()
        logits = self.hf(input_ids=ids, attention_mask=mask).logits
        if self.causal:
            logits, labels = logits[:, :-1], labels[:, 1:]
        nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none").sum(1)
        count = (labels != -100).sum(1).clamp_min(1).to(nll.dtype)
        return (nll / count).clamp_min(_NLL_FLOOR).sqrt()[:, None]

    def export_artifacts(self, out_dir, masks: dict[str, Tensor], config_updates: dict | None = None) -> dict:
        """``hf_model.zip`` (:mod:`core.io.hf.export`), called by the run once the masks are applied;
        ``config_updates``: a structurally shrunk model's new config fields (then no sparsity config)."""
        path = write_hf_zip(
            Path(out_dir) / "hf_model.zip", self.source, self.state_dict(), masks, config_updates=config_updates
        )
        return {"hf_model": path}

    # metrics beyond the loss, read by core.runs.train.evaluate
    def metric_sums(self, out: Tensor, y: Tensor) -> dict[str, float]:
        if self.objective == "distillation":
            return {"cosine": float(F.cosine_similarity(out.double(), y.double(), dim=-1).sum())}
        return {}

    def finish_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        if self.objective == "tokens":
            return {"perplexity": math.exp(min(metrics["loss"], 700.0))}
        return {}
