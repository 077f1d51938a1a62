"""K-FAC: per layer F ≈ B ⊗ A, ordered to match ``weight.flatten()``.

For a Linear weight W (out × in), the per-example gradient is δ aᵀ, and its row-major flattening is
vec(δ aᵀ) = δ ⊗ a: the *output-gradient* factor comes first. Hence F ≈ B ⊗ A with
B = E[δδᵀ] (out × out) and A = E[aaᵀ] (in × in) — not A ⊗ B. Conv layers use unfolded patches
(KFC): A = E[Σₜ aₜaₜᵀ], B = E[Σₜ δₜδₜᵀ]/T over the T output positions.

(B ⊗ A + λI)⁻¹ comes from the eigendecompositions of B and A; with V the weight-shaped vector,
F⁻¹v = U_B [(U_Bᵀ V U_A) ⊘ (λ_B λ_Aᵀ + λ)] U_Aᵀ.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.engine.curvature.base import Curvature, FisherConfig, Progress, effective_lambdas, generator
from core.engine.curvature.inverse import Segment
from core.engine.grads import loss_fn, sample_labels
from core.engine.layout import BlockLayout
from core.engine.modes import eval_mode


@dataclass
class KroneckerInverse:
    """(B ⊗ A + λI)⁻¹ for one whole layer: one block of c = out·in weights."""

    ub: Tensor
    eb: Tensor
    ua: Tensor
    ea: Tensor
    lam: float
    nb: int = 1

    @classmethod
    def from_factors(cls, b: Tensor, a: Tensor, lam: float) -> KroneckerInverse:
        eb, ub = _eigh(b)
        ea, ua = _eigh(a)
        return cls(ub, eb.clamp_min(0), ua, ea.clamp_min(0), lam)

    @property
    def c(self) -> int:
        return self.ub.shape[0] * self.ua.shape[0]

    def _scale(self) -> Tensor:
        return 1.0 / (self.eb[:, None] * self.ea[None, :] + self.lam)

    def diag(self) -> Tensor:
        return (self.ub.square() @ self._scale() @ self.ua.square().T).reshape(1, -1)

    def matvec(self, v: Tensor) -> Tensor:
        vm = v.reshape(self.ub.shape[0], self.ua.shape[0])
        return (self.ub @ ((self.ub.T @ vm @ self.ua) * self._scale()) @ self.ua.T).reshape(1, -1)

    def masked_solve(self, p: Tensor, v: Tensor) -> Tensor:
        raise NotImplementedError("K-FAC keeps no explicit blocks: use the summed update")


def _eigh(x: Tensor) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of a (small) PSD factor in float64: float32 ``eigh`` fails to converge on factors
    with many repeated eigenvalues (dead units give zero rows), as LeNet-5's output-gradient factors have."""
    e, u = torch.linalg.eigh(x.double())
    return e.to(x.dtype), u.to(x.dtype)


def _patches(module: nn.Module, x: Tensor) -> Tensor:
    """Layer inputs as rows (N·T, in_features or in·kh·kw)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1:
        if isinstance(module, nn.Conv1d):
            x = x.unsqueeze(2)
            k, d, p, s = (1, *module.kernel_size), (1, *module.dilation), (0, *module.padding), (1, *module.stride)
        else:
            k, d, p, s = module.kernel_size, module.dilation, module.padding, module.stride
        if isinstance(p, str):
            raise ValueError("K-FAC needs numeric conv padding")
        cols = F.unfold(x, k, dilation=d, padding=p, stride=s)  # (N, in·kh·kw, T)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    raise ValueError(f"K-FAC supports Linear and ungrouped Conv1d/Conv2d weights, not {type(module).__name__}")


def _out_grads(module: nn.Module, g: Tensor) -> Tensor:
    """Output gradients as rows (N·T, out)."""
    if isinstance(module, nn.Linear):
        return g.reshape(-1, g.shape[-1])
    return g.flatten(2).transpose(1, 2).reshape(-1, g.shape[1])


def kfac_factors(
    model: nn.Module, names: list[str], x: Tensor, y: Tensor, config: FisherConfig
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per weight name: (B, A) from m examples, with per-example (sum-reduced) loss gradients."""
    modules = dict(model.named_modules())
    targets = {n: modules[n.rsplit(".", 1)[0] if "." in n else ""] for n in names}
    for n, mod in targets.items():
        if not n.endswith("weight") or not isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            raise ValueError(f"K-FAC supports Linear/Conv weights only, not {n}")
    if config.m > len(x):
        raise ValueError(f"m = {config.m} examples requested, the data has {len(x)}")
    gen = generator(config.seed)
    idx = torch.randperm(len(x), generator=gen)[: config.m].to(x.device)
    xs, ys = x[idx], y[idx]
    if config.true_fisher:
        ys = sample_labels(model, xs, config.loss, gen)
    acts: dict[str, Tensor] = {}
    sums = {n: [0.0, 0.0, 0] for n in names}  # B sum, A sum, positions per example
    hooks = []

    def fwd(name):
        def hook(mod, inp, out):
            acts[name] = _patches(mod, inp[0].detach())
            out.register_hook(lambda g: _record(name, mod, g))

        return hook

    def _record(name, mod, g):
        d = _out_grads(mod, g.detach())
        a = acts.pop(name)
        s = sums[name]
        s[0] = s[0] + d.T @ d
        s[1] = s[1] + a.T @ a
        s[2] = d.shape[0] // g.shape[0]

    for n, mod in targets.items():
        hooks.append(mod.register_forward_hook(fwd(n)))
    criterion = loss_fn(config.loss)
    with eval_mode(model):
        try:
            for i in range(0, config.m, config.chunk):
                xb, yb = xs[i : i + config.chunk], ys[i : i + config.chunk]
                model.zero_grad(set_to_none=True)
                (criterion(model(xb), yb) * len(xb)).backward()  # sum-reduced: per-example δ
        finally:
            for h in hooks:
                h.remove()
            model.zero_grad(set_to_none=True)
    return {n: (s[0] / (config.m * s[2]), s[1] / config.m) for n, s in sums.items()}


@dataclass
class KFAC:
    config: FisherConfig = field(default_factory=FisherConfig)
    block_size: int | None = None  # one Kronecker block per layer

    def estimate(
        self, model: nn.Module, layout: BlockLayout, mask: Tensor, data, progress: Progress | None = None
    ) -> Curvature:
        factors = kfac_factors(model, layout.names, *data, self.config)
        # diag(B ⊗ A) sums to tr(B)·tr(A); K-FAC keeps no mask, so every weight of a layer counts as live
        sums = {n: float(b.trace()) * float(a.trace()) for n, (b, a) in factors.items()}
        lams = effective_lambdas(self.config, sums, {layer.name: float(layer.numel) for layer in layout.layers})
        segments = [
            Segment(layer.offset, KroneckerInverse.from_factors(b.to(mask.dtype), a.to(mask.dtype), lams[layer.name]))
            for layer, (b, a) in zip(layout.layers, (factors[n] for n in layout.names))
        ]
        if progress:
            progress(1, 1)
        return Curvature(segments, lambdas=lams)
