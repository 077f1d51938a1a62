"""Issue #12, "small files that allocate huge memory" and "NaN/Inf ONNX weights", end to end over HTTP on SQLite and
PostgreSQL: each bad file is a problem document with the numbers (413 ``limit-exceeded``, or 422), never a 500, and
nothing is written. Reuses the world and the check of ``test_api_bad_inputs.py`` (same snapshot of rows and files
around the request alone); a case may change settings for its request (a low validation memory, a low cap).

Also here: the API process never parses an upload (every byte is parsed in the validation child): it never opens
the staged file to read it, and its RSS stays flat while a 300 MB ONNX-looking upload is received and refused.
"""

from __future__ import annotations

import io
import json
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import save as st_save

import test_api_bad_inputs as bad
from _api_testkit import assert_problem
from _hf_models import zip_bytes
from _model_bombs import BOMBS, GENERATORS, NON_FINITE, bomb, fill, generators_graph, i64, onnx_graph, over_memory_graph
from test_api_bad_inputs import INVALID, Case, World, dataset_upload, mlp_state, model_upload, stored

# the world of test_api_bad_inputs.py (its fixtures, one more instance for this module)
world, private_tempdir = bad.world, bad.private_tempdir

LIMIT = "limit-exceeded"
CONSTANTS_CAP = r"over the limit of 134,217,728 \(ARBORIST_MAX_CONSTANT_ELEMENTS\)"
MEMORY = r"validating the file needs more memory than its limit of \d+ MiB \(ARBORIST_VALIDATION_MEMORY_MB, "


@dataclass(frozen=True)
class SettingsCase(Case):
    settings: tuple[tuple[str, Any], ...] = ()  # the server's settings for this request


def onnx_upload(proto: onnx.ModelProto) -> Callable[[World], bad.Send]:
    return model_upload(proto.SerializeToString(), "model.onnx")


def parquet_over_memory() -> bytes:
    """200 KB of parquet that decodes to 300 MB (three row groups of 8M constant rows)."""
    rows = 2**23
    table = pa.table({"f0": pa.array(np.zeros(rows, np.float32)), "label": pa.array(np.zeros(rows, np.int64))})
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, table.schema, compression="zstd") as w:
        for _ in range(3):
            w.write_table(table, row_group_size=rows)
    return buf.getvalue()


HUGE_ARCH = {"in_features": 50000, "hidden": [30000]}  # the issue's: 1.5e9 parameters from a 10 KB file
BIG_ARCH = {"in_features": 20000, "hidden": [10000]}  # 2e8 parameters: within the cap, 800 MB if it were built

CASES = [
    *(
        SettingsCase(
            f"model/onnx-bomb/{name}",
            onnx_upload(bomb(name)),
            413,
            LIMIT,
            rf"node '{node}'.*{CONSTANTS_CAP}",
            errors=(("model", "nodes", node),),
        )
        for name, (_, _, node, _) in BOMBS.items()
    ),
    SettingsCase(
        "model/onnx-generators-unsupported",
        onnx_upload(generators_graph()),
        422,
        INVALID,
        rf"^unsupported ONNX op\(s\): {', '.join(GENERATORS)}$",
    ),
    *(
        SettingsCase(
            f"model/onnx-non-finite/{name}",
            onnx_upload(proto),
            422,
            INVALID,
            rf"^the weights hold NaN or Inf values in 1 tensor\(s\): {key.replace('.', '[.]')}$",
            errors=(("state_dict", key),),
        )
        for name, (proto, key) in NON_FINITE.items()
    ),
    SettingsCase(
        "model/arch-kwargs-1.5e9-parameters",
        model_upload(st_save(mlp_state()), arch_kwargs=json.dumps(HUGE_ARCH)),
        413,
        LIMIT,
        r"^architecture 'mlp' with .* has 1,500,330,010 parameters, over the limit of 268,435,456 "
        r"\(ARBORIST_MAX_MODEL_PARAMETERS\)$",
        errors=(("arch_kwargs",),),
    ),
    SettingsCase(
        "model/arch-kwargs-compared-before-building",
        model_upload(st_save(mlp_state()), arch_kwargs=json.dumps(BIG_ARCH)),
        422,
        INVALID,
        r"^the weights do not match the architecture: shape mismatches 3: layers\.1\.weight "
        r"\(file \[32, 64\], model \[10000, 20000\]\)",
        errors=(("state_dict", "layers.1.weight"),),
        settings=(("validation_memory_mb", 128),),  # the 800 MB model could not be built: it is not
    ),
    SettingsCase(
        "model/onnx-over-validation-memory",
        onnx_upload(over_memory_graph()),
        413,
        LIMIT,
        MEMORY + r".*converting ConstantOfShape node 'big': DefaultCPUAllocator: can't allocate memory: "
        r"you tried to allocate 536870912 bytes",
        errors=(("file",),),
        settings=(("validation_memory_mb", 128),),
    ),
    SettingsCase(
        "dataset/parquet-over-validation-memory",
        dataset_upload(parquet_over_memory(), "data.parquet"),
        413,
        LIMIT,
        MEMORY + r".*cannot read the parquet file: malloc of size \d+ failed",
        settings=(("validation_memory_mb", 128),),
    ),
    SettingsCase(
        "model/parameter-cap-setting",
        model_upload(st_save(mlp_state())),
        413,
        LIMIT,
        r"has 2,410 parameters, over the limit of 1,000 \(ARBORIST_MAX_MODEL_PARAMETERS\)",
        settings=(("max_model_parameters", 1000),),
    ),
    SettingsCase(
        "model/constant-cap-setting",
        onnx_upload(onnx_graph([fill("s", "c"), helper.make_node("Add", ["x", "c"], ["y"])], {"s": i64(4, 4)})),
        413,
        LIMIT,
        r"^ConstantOfShape node 'c' would build a \[4, 4\] tensor of 16 elements, over the limit of 10 ",
        settings=(("max_constant_elements", 10),),
    ),
    SettingsCase(
        "model/archive-files-setting",
        model_upload(zip_bytes({"config.json": b"{}", "a.txt": b"a", "b.txt": b"b"}), "model.zip"),
        413,
        LIMIT,
        r"^the archive holds 3 entries, over the limit of 2 \(ARBORIST_MAX_ARCHIVE_FILES\)$",
        settings=(("max_archive_files", 2),),
    ),
    SettingsCase(
        "model/archive-bytes-setting",
        model_upload(zip_bytes({"config.json": b"{}", "a.txt": b"a" * 100}), "model.zip"),
        413,
        LIMIT,
        r"^the archive declares 102 bytes once extracted, over the limit of 50 \(ARBORIST_MAX_ARCHIVE_BYTES\)$",
        settings=(("max_archive_bytes", 50),),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_memory_bad_input_is_a_problem_and_changes_nothing(
    world: World, case: SettingsCase, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in case.settings:
        monkeypatch.setattr(world.server.settings, name, value)
    bad.test_bad_input_is_a_problem_and_changes_nothing(world, case)


def test_the_bombs_are_small_files() -> None:
    """The point of the cases above: each payload is a few hundred bytes to a few KB."""
    assert max(len(bomb(name).SerializeToString()) for name in BOMBS) < 3000
    assert len(st_save(mlp_state())) < 20_000


# --- the API process never parses an upload -----------------------------------------------------------------------


class ReadsUnder:
    """An audit hook (``sys.addaudithook``: every ``open`` of this process, whatever the thread) that records files
    opened for reading under ``root`` while it is active. Hooks cannot be removed: it is switched off instead."""

    def __init__(self, root: Path):
        self.root, self.active, self.reads = str(root), False, []
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple) -> None:
        if not self.active or event != "open" or not isinstance(args[0], (str, bytes, Path)):
            return
        path, mode, flags = str(args[0] if not isinstance(args[0], bytes) else args[0].decode()), args[1], args[2]
        reading = ("r" in mode and "+" not in mode) if isinstance(mode, str) else (flags & 3) == 0
        if path.startswith(self.root) and reading:
            self.reads.append(path)


@pytest.fixture(scope="module")
def reads(world: World) -> ReadsUnder:
    return ReadsUnder(world.store_root)


def _onnx_model() -> bytes:
    init = numpy_helper.from_array(np.ones((4, 2), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [init],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_api_process_never_opens_an_upload_to_read_it(world: World, reads: ReadsUnder) -> None:
    """Models (safetensors, ONNX, a bomb) and a dataset are received, validated and registered or refused: the API
    process writes each file and moves it, the child reads it. The hook is checked to see reads first."""
    (world.store_root / "probe").write_bytes(b"x")
    reads.active = True
    try:
        (world.store_root / "probe").read_bytes()
        assert reads.reads == [str(world.store_root / "probe")], "the audit hook does not see reads"
        reads.reads.clear()
        c = world.client
        ok = [
            c.post("/v1/models", files={"file": ("m.onnx", _onnx_model())}),
            c.post(
                "/v1/models",
                files={"file": ("m.safetensors", st_save(mlp_state()))},
                data={"arch": "mlp", "arch_kwargs": json.dumps(bad.MLP_KWARGS)},
            ),
            c.post("/v1/datasets", files={"file": ("d.npz", bad.classification_npz(n=50))}),
        ]
        refused = c.post("/v1/models", files={"file": ("b.onnx", bomb("constant-of-shape").SerializeToString())})
    finally:
        reads.active = False
        (world.store_root / "probe").unlink()
    assert [r.status_code for r in ok] == [201, 201, 201], [r.text for r in ok]
    assert_problem(refused, 413, LIMIT)
    assert reads.reads == [], f"the API process read uploaded files: {reads.reads}"
    for r, kind in zip(ok, ("models", "models", "datasets")):
        assert c.delete(f"/v1/{kind}/{r.json()['id']}").status_code == 204


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


class PeakRss:
    """Samples this process's RSS (the API server runs in it) every 5 ms while active."""

    def __init__(self) -> None:
        self.peak, self._stop = _rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_bytes())

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _onnx_looking(path: Path, mib: int) -> None:
    """A real ONNX protobuf with a ``mib`` MiB initializer and no nodes: parsing it takes its size in memory (twice,
    with the copy ``onnx.load`` makes), and it is not a model we accept (422)."""
    weights = numpy_helper.from_array(np.zeros(mib * 2**20 // 4, np.float32), "w")
    graph = helper.make_graph([], "g", [], [helper.make_tensor_value_info("w", TensorProto.FLOAT, None)], [weights])
    path.write_bytes(helper.make_model(graph).SerializeToString())


def test_api_rss_stays_flat_for_a_300mb_onnx_upload(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The body streams to disk and only the child parses it: the API process's RSS does not grow by the file's
    size (it would by 300-600 MB if ``onnx.load`` ran there)."""
    monkeypatch.setattr(world.server.settings, "max_upload_bytes", 512 * 2**20)
    path = world.tmp / "big.onnx"
    _onnx_looking(path, 300)
    size = path.stat().st_size
    before = stored(world.server, *world.roots())
    try:
        with open(path, "rb") as f, PeakRss() as rss:
            start = _rss_bytes()
            resp = world.client.post("/v1/models", files={"file": ("big.onnx", f)}, timeout=120)
    finally:
        path.unlink()
    body = assert_problem(resp, 422, INVALID)
    assert "unrecognised model file" in body["detail"]
    growth = rss.peak - start
    assert growth < 100 * 2**20, f"API RSS grew by {growth / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB upload"
    assert stored(world.server, *world.roots()) == before
