"""Mask patterns: which sets of weights may be pruned together, for every method.

A weight tensor of shape (out, *rest) is seen as the matrix (out, in) with in = prod(rest) (a Conv2d kernel
flattened as ``weight.flatten(1)``: channel, then kernel row, then kernel column), and a 1-D tensor as (1, n).

* ``unstructured`` — any weights;
* ``N:M`` (``2:4``, ``4:8``) — in every group of M consecutive weights of a row (along the input dimension) at
  most N are kept: exactly M − N pruned at the pattern's sparsity 1 − N/M, which the pattern fixes;
* ``block:RxC`` (``block:4x4``, ``block:1x8``) — weights are pruned in whole tiles of R rows × C columns.

N:M needs ``in`` divisible by M, ``block:RxC`` needs out divisible by R and in by C (:meth:`Pattern.fits`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor

_NM = re.compile(r"^(\d+):(\d+)$")
_BLOCK = re.compile(r"^block:(\d+)x(\d+)$")
MAX_GROUP = 256


def as_matrix(t: Tensor) -> Tensor:
    """The (out, in) view of a weight tensor (1-D: one row)."""
    return t.reshape(1, -1) if t.dim() < 2 else t.reshape(t.shape[0], -1)


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    return (1, math.prod(shape)) if len(shape) < 2 else (shape[0], math.prod(shape[1:]))


@dataclass(frozen=True)
class Pattern:
    """A parsed pattern: ``kind`` is ``unstructured``, ``nm`` (keep ``n`` of every ``m``) or ``block`` (``rows`` ×
    ``cols`` tiles)."""

    kind: str = "unstructured"
    n: int = 0
    m: int = 0
    rows: int = 1
    cols: int = 1

    @classmethod
    def parse(cls, text: str | None) -> Pattern:
        """A pattern from its text (None: unstructured); ValueError that says the syntax."""
        if text is None or text == "unstructured":
            return cls()
        if match := _NM.match(text):
            n, m = int(match[1]), int(match[2])
            if not (1 <= n < m <= MAX_GROUP):
                raise ValueError(f"pattern {text!r}: N:M needs 1 ≤ N < M ≤ {MAX_GROUP}")
            return cls("nm", n=n, m=m)
        if match := _BLOCK.match(text):
            r, c = int(match[1]), int(match[2])
            if not (1 <= r <= MAX_GROUP and 1 <= c <= MAX_GROUP) or r * c < 2:
                raise ValueError(f"pattern {text!r}: block tiles need 1 ≤ R, C ≤ {MAX_GROUP} and R·C ≥ 2")
            return cls("block", rows=r, cols=c)
        raise ValueError(
            f"pattern {text!r} is not 'unstructured', 'N:M' (like '2:4') or 'block:RxC' (like 'block:4x4')"
        )

    def __str__(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "block":
            return f"block:{self.rows}x{self.cols}"
        return "unstructured"

    @property
    def fixed_sparsity(self) -> float | None:
        """The sparsity the pattern fixes (N:M: 1 − N/M), or None."""
        return (self.m - self.n) / self.m if self.kind == "nm" else None

    def fits(self, shape: tuple[int, ...]) -> str | None:
        """None when a weight of this shape can follow the pattern, else why not."""
        rows, cols = matrix_shape(shape)
        if self.kind == "nm" and cols % self.m:
            return f"{cols} inputs per row are not a multiple of M = {self.m}"
        if self.kind == "block" and (rows % self.rows or cols % self.cols):
            return f"the {rows} × {cols} weight matrix is not tiled by {self.rows} × {self.cols} blocks"
        return None

    def holds(self, keep: Tensor) -> bool:
        """Whether a keep-mask (nonzero = kept) of one weight tensor follows the pattern."""
        k = as_matrix(keep) != 0
        if self.kind == "nm":
            return bool((k.reshape(k.shape[0], -1, self.m).sum(-1) <= self.n).all())
        if self.kind == "block":
            t = tiles(k.to(torch.int32), self.rows, self.cols).sum(-1)
            return bool(((t == 0) | (t == self.rows * self.cols)).all())
        return True


def tiles(x: Tensor, r: int, c: int) -> Tensor:
    """(rows, cols) → (rows/r, cols/c, r·c): the tiles of a matrix, each flattened."""
    rows, cols = x.shape
    return x.reshape(rows // r, r, cols // c, c).permute(0, 2, 1, 3).reshape(rows // r, cols // c, r * c)


def untile(t: Tensor, r: int, c: int) -> Tensor:
    """Inverse of :func:`tiles` for per-tile values broadcast to (rows, cols): (R', C') → (R'·r, C'·c)."""
    return t.repeat_interleave(r, 0).repeat_interleave(c, 1)


def nm_candidates(scores: Tensor, n: int, m: int) -> Tensor:
    """For a (rows, cols) score matrix: True on the M − N lowest scores of every group of M along a row."""
    rows, cols = scores.shape
    g = scores.reshape(rows, cols // m, m)
    order = g.argsort(dim=-1, stable=True)
    cand = torch.zeros_like(g, dtype=torch.bool)
    cand.scatter_(-1, order[..., : m - n], True)
    return cand.reshape(rows, cols)


def prune_lowest(scores: Tensor, k: int) -> Tensor:
    """A prune-mask (True = pruned) of the k lowest scores of a tensor (any shape)."""
    out = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        out[torch.topk(scores.reshape(-1), min(k, scores.numel()), largest=False).indices] = True
    return out.reshape(scores.shape)


def nm_full(sparsity: float, cols: int, pattern: Pattern) -> bool:
    """Whether ``sparsity`` of a row of ``cols`` reaches the N:M pattern's own (M − N pruned in every group)."""
    return round(sparsity * cols) >= (pattern.m - pattern.n) * (cols // pattern.m)


def prune_rows(scores: Tensor, sparsity: float, pattern: Pattern, pruned: Tensor | None = None) -> Tensor:
    """A prune-mask of a (rows, cols) score matrix, per row (tiles: per band of R rows), at ``sparsity``; weights
    already ``pruned`` stay pruned. N:M at its own sparsity prunes exactly M − N per group; below it (a gradual
    schedule's earlier steps), the round(sparsity · cols) lowest of each row's candidates (the M − N lowest of
    each group), so every step keeps the pattern and the masks nest."""
    if pruned is not None:
        scores = scores.masked_fill(pruned, float("-inf"))
    cols = scores.shape[1]
    if pattern.kind == "nm":
        cand = nm_candidates(scores, pattern.n, pattern.m)
        if nm_full(sparsity, cols, pattern):
            return cand
        k = torch.full((scores.shape[0], 1), round(sparsity * cols), device=scores.device)
        if pruned is not None:
            k = k.clamp_min(pruned.sum(1, keepdim=True))
        rank = scores.masked_fill(~cand, float("inf")).argsort(dim=1, stable=True).argsort(dim=1)
        return (rank < k) & cand
    if pattern.kind == "block":
        r, c = pattern.rows, pattern.cols
        t = tiles(scores, r, c).sum(-1)  # (rows/r, cols/c)
        k = max(round(sparsity * t.shape[1]), 0)
        band = torch.zeros_like(t, dtype=torch.bool)
        if k:
            band.scatter_(1, t.topk(k, dim=1, largest=False).indices, True)
        return untile(band, r, c)
    k = round(sparsity * cols)
    out = torch.zeros_like(scores, dtype=torch.bool)
    if k:
        out.scatter_(1, scores.topk(k, dim=1, largest=False).indices, True)
    return out


def choose_flat(scores: Tensor, mask: Tensor, layout, sparsity: float, global_scope: bool, pattern: Pattern) -> Tensor:
    """The keep-mask over a flat block-padded vector (``core.engine.layout.BlockLayout``) pruning round(sparsity·n)
    weights, per layer or over all layers, under an N:M or block pattern: saliencies decide within the pattern.

    N:M: only the M − N lowest saliencies of each group are candidates, so any target up to 1 − N/M keeps the
    pattern and 1 − N/M reaches it exactly (the sub-steps before the last prune the lowest candidates). Blocks:
    a tile's saliency is the sum of its weights' (tiles have one size, so layers compare in a global scope)."""
    keep = mask.clone()
    units: list[tuple[object, Tensor]] = []  # (layer, per-unit scores)
    for layer in layout.layers:
        s = as_matrix(scores[layer.offset : layer.offset + layer.numel].reshape(layer.shape))
        was = as_matrix(mask[layer.offset : layer.offset + layer.numel].reshape(layer.shape)) == 0
        s = s.masked_fill(was, float("-inf"))
        if pattern.kind == "nm":
            s = s.masked_fill(~nm_candidates(s, pattern.n, pattern.m), float("inf"))
        else:
            s = tiles(s, pattern.rows, pattern.cols).sum(-1)
        units.append((layer, s))
    per = pattern.rows * pattern.cols if pattern.kind == "block" else 1
    groups = [units] if global_scope else [[u] for u in units]
    for group in groups:
        flat = torch.cat([s.reshape(-1) for _, s in group])
        n = sum(layer.numel for layer, _ in group)
        k = max(round(sparsity * n / per), int(torch.isneginf(flat).sum()))
        k = min(k, int(torch.isfinite(flat).sum() + torch.isneginf(flat).sum()))
        chosen = prune_lowest(flat, k)
        start = 0
        for layer, s in group:
            p = chosen[start : start + s.numel()].reshape(s.shape)
            start += s.numel()
            if pattern.kind == "block":
                p = untile(p, pattern.rows, pattern.cols)
            view = keep[layer.offset : layer.offset + layer.numel]
            view.copy_(view * (~p.reshape(-1)).to(view.dtype))
    return keep
