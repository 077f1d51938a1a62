"""The structured WoodFisher prune's memory against its plan (issue #17), in a fresh process: a digits MLP whose
widest consumer is 512 × 256 (one block per row: 512 blocks of 256 × 256, 256 MiB in float64), pruned at 50 % of its
neurons with fisher.samples 512. Prints the plan's bytes, the measured peak of the prune over what the process held
when it began (``memory.step_peak_extra_bytes``) and their ratio, measured in the same run.

Usage: python bench/structured_memory.py [--hidden 256 512] [--samples 512]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._util import save
from core.io.data import builtin_dataset
from core.io.zoo import build_model
from core.runs.run import execute
from core.runs.spec import PruneSpec
from core.runs.speed import LatencyConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--samples", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = builtin_dataset("digits").split(0.2, 0)
    torch.manual_seed(0)
    model = build_model("mlp", in_features=64, hidden=args.hidden, num_classes=10)
    spec = PruneSpec(method="woodfisher", sparsity=0.5, structure="neurons", fisher={"samples": args.samples})
    out = Path(tempfile.mkdtemp(prefix="structured-memory-"))
    report = execute(spec, model, data, out, latency=LatencyConfig(budget_s=0)).report
    mem, plan = report["memory"], report["memory_plan"]
    row = {
        "hidden": args.hidden,
        "samples": args.samples,
        "block_choice": plan["block_choice"],
        "planned_bytes": plan["total_bytes"],
        "step_peak_extra_bytes": mem["step_peak_extra_bytes"],
        "measured_over_plan": mem["step_peak_extra_bytes"] / plan["total_bytes"],
        "seconds_obs": report["phases"]["seconds"].get("obs"),
    }
    print(row)
    print(save("structured_memory", [row]))


if __name__ == "__main__":
    main()
