"""Block inverse build: ours (batched GEMM + Cholesky, or Woodbury) vs sequential Sherman–Morrison.

Prints, measured in this one run on the same synthetic gradients:
  * speed-up over the sequential Sherman–Morrison loop (vectorised over blocks, one rank-1 update
    per gradient — the paper's eq. 3) for d=270,000 with (m=1000, c=100) and (m=400, c=1000);
  * achieved GFLOP/s of the dominant kernel vs a measured fp32 GEMM;
  * peak extra memory of one whole-layer block (c=36,864, m=1000) vs c·m·4 bytes (in a subprocess).
Usage: python bench/inverse_speed.py [--quick]
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._util import rss_bytes, save, timeit
from core.engine.curvature.inverse import fisher_block_inverse
from core.engine.curvature.sherman_morrison import sherman_morrison_inverse

LAM = 1e-5
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def gradients(d: int, m: int, c: int) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(d // c, m, c, device=DEVICE) / 10


def speed(d: int, m: int, c: int) -> dict:
    g = gradients(d, m, c)
    ours = timeit(lambda: fisher_block_inverse(g, LAM).diag(), repeats=3)
    base = timeit(lambda: sherman_morrison_inverse(g, LAM), repeats=1)
    return {"d": d, "m": m, "c": c, "ours_s": ours, "sherman_morrison_s": base, "speedup": base / ours}


def gflops() -> dict:
    """The dominant kernel of the dense path is the batched GᵀG; compare with one big fp32 GEMM."""
    n = 2048
    a, b = torch.randn(n, n, device=DEVICE), torch.randn(n, n, device=DEVICE)
    gemm = 2 * n**3 / timeit(lambda: a @ b) / 1e9
    g = gradients(270_000, 1000, 100)
    kernel = 2 * g.shape[0] * 100 * 100 * 1000 / timeit(lambda: g.mT @ g) / 1e9
    return {"gemm_gflops": gemm, "block_gram_gflops": kernel, "fraction": kernel / gemm}


def memory_child() -> None:
    c, m = 36_864, 1000
    fisher_block_inverse(torch.randn(1, 8, 64), LAM).diag()  # load BLAS/LAPACK before measuring
    g = torch.randn(1, m, c)
    before = rss_bytes("VmRSS")
    inv = fisher_block_inverse(g, LAM)
    inv.diag()
    peak = rss_bytes("VmHWM")
    print(peak - before, c * m * 4, type(inv).__name__)


def memory() -> dict:
    out = subprocess.run([sys.executable, __file__, "--memory-child"], capture_output=True, text=True, check=True)
    extra, budget, kind = out.stdout.split()
    return {
        "c": 36_864,
        "m": 1000,
        "form": kind,
        "peak_extra_bytes": int(extra),
        "c_m_4": int(budget),
        "ratio": int(extra) / int(budget),
    }


def main() -> None:
    if "--memory-child" in sys.argv:
        return memory_child()
    quick = "--quick" in sys.argv
    cases = [(27_000, 1000, 100), (27_000, 400, 1000)] if quick else [(270_000, 1000, 100), (270_000, 400, 1000)]
    rows = [speed(*case) for case in cases]
    for r in rows:
        print(
            f"inverse  d={r['d']:>7} m={r['m']:>5} c={r['c']:>5}: ours {r['ours_s']:.3f}s, "
            f"Sherman–Morrison {r['sherman_morrison_s']:.2f}s -> {r['speedup']:.1f}x faster"
        )
    f = gflops()
    print(
        f"kernel   block GᵀG {f['block_gram_gflops']:.1f} GFLOP/s vs fp32 GEMM {f['gemm_gflops']:.1f} GFLOP/s "
        f"-> {100 * f['fraction']:.0f}%"
    )
    mem = memory()
    print(
        f"memory   whole-layer c={mem['c']} m={mem['m']} ({mem['form']}): peak extra "
        f"{mem['peak_extra_bytes'] / 2**20:.1f} MiB = {mem['ratio']:.3f} x c·m·4"
    )
    print("saved", save("inverse_speed", [*rows, f, mem]))


if __name__ == "__main__":
    main()
