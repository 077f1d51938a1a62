"""Gradual pruning schedule (Zhu & Gupta 2017): s_t = s_f − (s_f − s_i)(1 − progress)^k, k = 3."""

from __future__ import annotations

from core.runs.spec import PruneSpec


def pruning_events(spec: PruneSpec) -> dict[int, float]:
    """{epoch: target sparsity} at the start of which a pruning step runs.

    One-shot: a single step at epoch 0. Gradual: every ``frequency`` epochs from ``start_epoch``,
    always including ``end_epoch`` where the final sparsity is reached exactly.
    """
    if spec.mode == "one_shot":
        return {0: spec.sparsity}
    s = spec.schedule
    epochs = list(range(s.start_epoch, s.end_epoch + 1, s.frequency))
    if epochs[-1] != s.end_epoch:
        epochs.append(s.end_epoch)
    span = max(s.end_epoch - s.start_epoch, 1)
    events = {}
    for e in epochs:
        progress = (e - s.start_epoch) / span if s.end_epoch > s.start_epoch else 1.0
        events[e] = spec.sparsity - (spec.sparsity - s.initial_sparsity) * (1 - progress) ** s.exponent
    return {e: v for e, v in events.items() if v > 0}
