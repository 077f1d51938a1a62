"""Masked training and evaluation: pruned weights stay exactly zero through fine-tuning."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from core.engine.grads import Loss, loss_fn
from core.engine.modes import eval_mode
from core.runs.spec import FinetuneSpec


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, loss: Loss | str, batch: int = 1024) -> dict[str, float]:
    """Mean loss and (for classification) top-1 accuracy, in eval mode."""
    criterion = loss_fn(loss)
    total, correct = 0.0, 0
    extra = getattr(model, "metric_sums", None)  # a model's own metrics (core.io.hf: embedding cosine, perplexity)
    sums: dict[str, float] = {}
    with eval_mode(model):
        for i in range(0, len(x), batch):
            out = model(x[i : i + batch])
            total += float(criterion(out, y[i : i + batch])) * len(out)
            if Loss(loss) is Loss.CROSS_ENTROPY:
                correct += int((out.argmax(-1) == y[i : i + batch]).sum())
            for k, v in (extra(out, y[i : i + batch]) if extra else {}).items():
                sums[k] = sums.get(k, 0.0) + v
    result = {"loss": total / len(x)}
    if Loss(loss) is Loss.CROSS_ENTROPY:
        result["accuracy"] = correct / len(x)
    result |= {k: v / len(x) for k, v in sums.items()}
    if hasattr(model, "finish_metrics"):
        result |= model.finish_metrics(result)
    return result


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask)


def make_optimizer(model: nn.Module, spec: FinetuneSpec) -> torch.optim.Optimizer:
    if spec.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)


def learning_rate(spec: FinetuneSpec, epoch: int) -> float:
    """The learning rate of an epoch: a pure function, so resuming needs no scheduler state."""
    if spec.lr_schedule == "cosine":
        return spec.lr * 0.5 * (1 + math.cos(math.pi * epoch / max(spec.epochs or 0, 1)))
    if spec.lr_schedule == "step":
        return spec.lr * 0.1 ** (epoch // max((spec.epochs or 0) // 3, 1))
    return spec.lr


def train_epoch(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    loss: Loss | str,
    batch_size: int,
    masks: dict[str, Tensor],
    generator: torch.Generator,
    on_batch: Callable[[int, int], None] | None = None,
) -> float:
    """One epoch of masked SGD/Adam; the shuffle comes from ``generator`` (deterministic resume)."""
    model.train()
    criterion = loss_fn(loss)
    params = dict(model.named_parameters())
    order = torch.randperm(len(x), generator=generator).to(x.device)
    batches = math.ceil(len(x) / batch_size)
    total = 0.0
    for b in range(batches):
        idx = order[b * batch_size : (b + 1) * batch_size]
        optimizer.zero_grad(set_to_none=True)
        out = criterion(model(x[idx]), y[idx])
        out.backward()
        for name, mask in masks.items():
            if params[name].grad is not None:
                params[name].grad.mul_(mask)
        optimizer.step()
        apply_masks(model, masks)  # weight decay / momentum can not revive a pruned weight
        total += out.item() * len(idx)
        if on_batch:
            on_batch(b + 1, batches)
    return total / len(x)
