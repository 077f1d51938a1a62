"""Validation of a Hugging Face upload (the MiniLM zip) in the validation child, with and without transformers
preloaded by the fork server (``core.io.hf.warm`` in ``api.isolation.PRELOAD``).

For each variant a fresh process starts the fork server (timed: the preload is paid there, once per API process),
times what a child pays to import ``transformers.modeling_utils`` and the BERT module, then validates the MiniLM
zip ``--repeats`` times with ``run_isolated(validate_model_upload, ...)``, exactly what ``POST /v1/models`` runs
once the file is staged; it prints the minimum and median wall time per upload and the ratio.
Usage: .venv/bin/python bench/hf_validation.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
sys.path[:0] = [{root!r}, {tests!r}]
import api.isolation as iso
from core.io.hf.validate import validate_model_upload
if not {preload}:
    iso.PRELOAD = [m for m in iso.PRELOAD if not m.startswith("core.io.hf")]
t = time.perf_counter()
iso.run_isolated(len, "x")  # starts the fork server (its preload)
start = time.perf_counter() - t
IMPORT = ("(lambda t: (__import__('transformers.modeling_utils'), __import__('transformers.models.bert.modeling_bert'),"
          " __import__('time').perf_counter() - t)[-1])(__import__('time').perf_counter())")
imports = [iso.run_isolated(eval, IMPORT) for _ in range({repeats})]  # what a child pays to import them
times = []
for _ in range({repeats}):
    t = time.perf_counter()
    info = iso.run_isolated(validate_model_upload, {zip!r}, "huggingface")
    times.append(time.perf_counter() - t)
print(json.dumps({{"server_start_s": start, "validation_s": times, "import_s": imports, "arch": info.arch}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from _hf_models import minilm_dir, zip_folder

    with tempfile.TemporaryDirectory() as tmp:
        archive = zip_folder(minilm_dir(), Path(tmp) / "minilm.zip")
        out = {}
        for preload in (False, True):
            code = CHILD.format(root=str(ROOT), tests=str(ROOT / "tests"), preload=preload, repeats=args.repeats,
                                zip=str(archive))  # fmt: skip
            env = os.environ | {"PYTHONPATH": str(ROOT)}  # the fork server imports this checkout's modules too
            run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp,
                                 env=env)  # fmt: skip
            out["with" if preload else "without"] = json.loads(run.stdout.strip().splitlines()[-1])
    for k, v in out.items():
        v |= {"min_s": min(v["validation_s"]), "median_s": statistics.median(v["validation_s"])}
        print(f"{k:>8} preload: fork server start {v['server_start_s']:.1f} s, transformers import in a child "
              f"{statistics.median(v['import_s']):.2f} s, validation min {v['min_s']:.2f} s, median "
              f"{v['median_s']:.2f} s ({v['arch']})")  # fmt: skip
    print(f"median validation without / with: {out['without']['median_s'] / out['with']['median_s']:.1f}x")
    sys.path.insert(0, str(ROOT))
    from bench._util import save

    print("saved", save("hf_validation", [{"preload": k, **v} for k, v in out.items()]))


if __name__ == "__main__":
    main()
