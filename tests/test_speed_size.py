"""Latency and size in every report: bounded timing, the compressed-tensors sparse formats (round trip and the
format itself, against the library's own bit unpacking) and a run's ``speed`` / ``size`` sections."""

import json

import onnx
import pytest
import torch
from compressed_tensors.utils import pack_bitmasks, unpack_bitmasks
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from core.errors import Canceled
from core.io.compressed import (
    BITMASK,
    SPARSE_24,
    compress_state,
    decompress_state,
    read_compressed,
    write_compressed,
)
from core.io.onnx.export import export_onnx
from core.runs.checkpoint import DirectoryCheckpointer
from core.runs.run import RunHooks, execute
from core.runs.sizes import compressed_format
from core.runs.spec import PruneSpec
from core.runs.speed import (
    CUDA_24,
    ORT_CPU,
    TORCH_CPU,
    LatencyConfig,
    batches,
    dense_onnx,
    kernel,
    measure,
    time_call,
)


def _sparse(shape, fraction, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g)
    return t * (torch.rand(shape, generator=g) >= fraction)


def _two_four(rows, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(rows * cols // 4, 4, generator=g)
    drop = torch.rand(t.shape, generator=g).argsort(dim=1)[:, :2]
    t.scatter_(1, drop, 0.0)
    t[0] = 0.0  # a group with no weight at all
    t[1, 1:] = 0.0  # and one with a single weight
    return t.reshape(rows, cols)


# -- timing ----------------------------------------------------------------------------------------
def test_time_call_stops_at_max_repeats_and_times_at_least_once():
    calls = []
    out = time_call(lambda: calls.append(1), budget_s=60.0, max_repeats=5)
    assert len(calls) == 6 and out["repeats"] == 5  # one warm-up, then max_repeats despite a large budget
    assert 0 < out["min_ms"] <= out["median_ms"]
    calls.clear()
    out = time_call(lambda: calls.append(1), budget_s=0.0, max_repeats=50)
    assert len(calls) == 2 and out["repeats"] == 1  # no budget: the warm-up and one timed call


def test_batches_are_capped_by_the_examples_and_deduplicated():
    x = torch.arange(10.0).reshape(10, 1)
    got = batches(x, (1, 32, 64))
    assert list(got) == ["batch_1", "batch_10"] and torch.equal(got["batch_10"], x)


def test_measure_reports_every_runtime_and_batch_or_why_not(tmp_path):
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x = torch.randn(20, 8, dtype=torch.float64)  # the run's dtype; measured in float32 like the artifacts
    config = LatencyConfig(budget_s=0.05, batch_sizes=(1, 32), max_repeats=3)
    out = measure(model, x, config, [TORCH_CPU, ORT_CPU])  # no graph: ONNX Runtime says so
    assert set(out[TORCH_CPU]) == {"batch_1", "batch_20"}
    assert all(1 <= r["repeats"] <= 3 and r["median_ms"] > 0 for r in out[TORCH_CPU].values())
    assert out[ORT_CPU] == {"error": "no ONNX graph to run"}
    export_onnx(model, x[:1].float(), tmp_path / "m.onnx")
    out = measure(model, x, config, [ORT_CPU], tmp_path / "m.onnx")
    assert set(out[ORT_CPU]) == {"batch_1", "batch_20"} and all(r["repeats"] <= 3 for r in out[ORT_CPU].values())


def test_dense_onnx_puts_the_dense_weights_back_and_refuses_a_foreign_name(tmp_path):
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    export_onnx(model, torch.randn(1, 8), tmp_path / "m.onnx")
    dense = {"0.weight": torch.randn(16, 8)}
    graph = onnx.load_model_from_string(dense_onnx(tmp_path / "m.onnx", dense)).graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    assert torch.equal(torch.from_numpy(inits["0.weight"].copy()), dense["0.weight"])
    with pytest.raises(ValueError, match="no initializer"):
        dense_onnx(tmp_path / "m.onnx", {"0.weight": torch.randn(8, 16)})  # the wrong shape


def test_kernel_verdicts():
    assert kernel(None, TORCH_CPU, False)["verdict"] == "size only"
    assert kernel("block:4x4", ORT_CPU, False)["verdict"] == "size only"
    assert kernel("2:4", TORCH_CPU, False)["verdict"] == "size only"
    assert kernel("2:4", CUDA_24, False)["faster"] is True
    assert kernel(None, TORCH_CPU, True)["faster"] is True  # smaller shapes: less work everywhere


# -- the compressed formats ------------------------------------------------------------------------
def test_bitmask_round_trip_and_format_per_the_library(tmp_path):
    linear, conv = _sparse((16, 40), 0.9), _sparse((6, 3, 3, 3), 0.8, seed=1)
    state = {"a.weight": linear, "a.bias": torch.randn(16), "c.weight": conv, "d.weight": torch.randn(4, 4)}
    tensors, done = compress_state(state, ["a.weight", "c.weight"], BITMASK)
    assert done == ["a.weight", "c.weight"]
    assert torch.equal(tensors["a.bias"], state["a.bias"]) and torch.equal(tensors["d.weight"], state["d.weight"])
    for prefix, t in (("a", linear), ("c", conv.reshape(6, 27))):  # a conv kernel as its (out, in·kh·kw) matrix
        assert tensors[f"{prefix}.shape"].tolist() == list(t.shape) and tensors[f"{prefix}.shape"].dtype == torch.int64
        assert torch.equal(tensors[f"{prefix}.compressed"], t[t != 0])  # row-major non-zeros
        assert tensors[f"{prefix}.bitmask"].dtype == torch.uint8
        assert tensors[f"{prefix}.bitmask"].shape == (*t.shape[:-1], (t.shape[-1] + 7) // 8)
        assert torch.equal(tensors[f"{prefix}.bitmask"], pack_bitmasks(t != 0))  # the library's packing
        assert torch.equal(unpack_bitmasks(tensors[f"{prefix}.bitmask"], list(t.shape)), t != 0)
        counts = (t != 0).sum(dim=-1)
        assert torch.equal(tensors[f"{prefix}.row_offsets"], torch.cumsum(counts, 0) - counts)
    back = decompress_state(tensors, BITMASK, done, {"c.weight": [6, 3, 3, 3]})
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    written = write_compressed(tmp_path / "c.safetensors", state, ["a.weight", "c.weight"], BITMASK)
    assert written == {"format": BITMASK, "compressed": ["a.weight", "c.weight"], "kept_dense": []}
    back = read_compressed(tmp_path / "c.safetensors")  # the file's metadata restores the kernel's shape
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_two_four_round_trip_and_format_per_the_library():
    w = _two_four(8, 32)
    not_24 = _sparse((8, 32), 0.3, seed=2)  # more than 2 of 4 kept somewhere: stays dense, never truncated
    state = {"b.weight": w, "e.weight": not_24}
    tensors, done = compress_state(state, ["b.weight", "e.weight"], SPARSE_24)
    assert done == ["b.weight"] and torch.equal(tensors["e.weight"], not_24)
    assert tensors["b.shape"].tolist() == [[8], [32]]
    assert tensors["b.compressed"].shape == (8, 16)
    keep = unpack_bitmasks(tensors["b.bitmask"], [8, 32])
    assert (keep.reshape(-1, 4).sum(dim=1) == 2).all() and not (w.ne(0) & ~keep).any()
    assert torch.equal(tensors["b.compressed"].flatten(), w[keep])
    back = decompress_state(tensors, SPARSE_24, done)
    assert torch.equal(back["b.weight"], w) and torch.equal(back["e.weight"], not_24)
    kernel4d = _two_four(8, 36, seed=3).reshape(8, 4, 3, 3)  # N:M groups run along the flattened input (in·kh·kw)
    tensors, done = compress_state({"k.weight": kernel4d}, ["k.weight"], SPARSE_24)
    assert done == ["k.weight"] and tensors["k.shape"].tolist() == [[8], [36]]
    back = decompress_state(tensors, SPARSE_24, done, {"k.weight": [8, 4, 3, 3]})
    assert torch.equal(back["k.weight"], kernel4d)


def test_a_pruned_tensor_the_format_cannot_name_stays_dense_and_is_listed(tmp_path):
    state = {"fc1_w": _sparse((8, 8), 0.9)}  # an ONNX upload's initializer name: the format needs '<layer>.weight'
    written = write_compressed(tmp_path / "c.safetensors", state, ["fc1_w"], BITMASK)
    assert written["compressed"] == [] and written["kept_dense"] == ["fc1_w"]
    assert torch.equal(read_compressed(tmp_path / "c.safetensors")["fc1_w"], state["fc1_w"])


def test_compressed_format_follows_the_pattern():
    assert compressed_format(None) == compressed_format("unstructured") == compressed_format("block:4x4") == BITMASK
    assert compressed_format("2:4") == SPARSE_24 and compressed_format("4:8") == BITMASK


# -- a run -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("pattern", "fmt"), [(None, BITMASK), ("2:4", SPARSE_24)])
def test_a_run_reports_speed_and_size_and_writes_the_compressed_weights(digits, digits_mlp, tmp_path, pattern, fmt):
    spec = {"method": "magnitude", "sparsity": 0.9} if pattern is None else {"method": "magnitude", "pattern": pattern}
    config = LatencyConfig(budget_s=0.2, batch_sizes=(1, 32), max_repeats=5)
    result = execute(PruneSpec(**spec), digits_mlp, digits, tmp_path / "out", latency=config)
    report = json.loads(result.artifacts["report"].read_text())
    assert report["phases"]["seconds"]["latency"] > 0
    speed = report["speed"]
    assert set(speed["runtimes"]) == {TORCH_CPU, ORT_CPU}  # no CUDA here
    for rt in speed["runtimes"].values():
        for which in ("dense", "pruned"):
            assert set(rt[which]) == {"batch_1", "batch_32"}
            assert all(1 <= m["repeats"] <= 5 and m["median_ms"] > 0 for m in rt[which].values())
        assert set(rt["speedup"]) == {"batch_1", "batch_32"}
        assert rt["verdict"] == "size only" and rt["faster"] is False
    size = report["size"]
    pruned, compressed = result.artifacts["pruned"], result.artifacts["compressed"]
    assert size["compressed_format"] == fmt and size["layers_compressed"] == 2 and size["layers_kept_dense"] == []
    assert size["pruned_safetensors_bytes"] == pruned.stat().st_size == size["dense_safetensors_bytes"]
    assert size["compressed_bytes"] == compressed.stat().st_size < size["pruned_safetensors_bytes"]
    assert size["compressed_to_dense"] == size["compressed_bytes"] / size["dense_safetensors_bytes"]
    with safe_open(str(compressed), framework="pt") as f:
        assert f.metadata()["sparsity_format"] == fmt
    back, want = read_compressed(compressed), load_file(pruned)
    assert back.keys() == want.keys() and all(torch.equal(back[k], want[k]) for k in want)


def test_latency_off_measures_nothing(digits, digits_mlp, tmp_path):
    spec = PruneSpec(method="magnitude", sparsity=0.5)
    result = execute(spec, digits_mlp, digits, tmp_path / "out", latency=LatencyConfig(budget_s=0.0))
    assert result.report["speed"] is None and "latency" not in result.report["phases"]["seconds"]
    assert result.report["size"]["compressed_bytes"] > 0


@pytest.mark.parametrize("structure", ["unstructured", "neurons"])
def test_export_onnx_false_writes_no_graph_and_measures_pytorch_only(digits, digits_mlp, tmp_path, structure):
    """``export.onnx: false`` (for a large transformer the export takes minutes): no model.onnx, no ONNX Runtime
    numbers, everything else as usual, in the unstructured and the structured run."""
    spec = PruneSpec(method="magnitude", sparsity=0.5, structure=structure, export={"onnx": False})
    config = LatencyConfig(budget_s=0.2, batch_sizes=(1, 32), max_repeats=3)
    result = execute(spec, digits_mlp, digits, tmp_path / "out", latency=config)
    report = json.loads(result.artifacts["report"].read_text())
    assert "onnx" not in result.artifacts and not list((tmp_path / "out").glob("*.onnx"))
    assert report["onnx_error"] is None and report["spec"]["export"] == {"onnx": False}
    assert set(report["speed"]["runtimes"]) == {TORCH_CPU}
    assert result.artifacts["pruned"].stat().st_size > 0


def test_a_resumed_run_keeps_the_dense_latency_from_its_start(digits, digits_mlp, tmp_path):
    spec = PruneSpec(
        method="magnitude",
        sparsity=0.8,
        mode="gradual",
        schedule={"initial_sparsity": 0.4, "start_epoch": 0, "end_epoch": 1, "frequency": 1},
        finetune={"epochs": 2, "batch_size": 256},
    )
    config = LatencyConfig(budget_s=0.1, max_repeats=3)

    class StopAfterFirstCheckpoint(RunHooks):
        def __init__(self):
            self.checkpoints = 0

        def event(self, kind, data):
            self.checkpoints += kind == "checkpoint"

        def cancelled(self):
            return self.checkpoints >= 1

    ckpt = DirectoryCheckpointer(tmp_path / "ck")
    with pytest.raises(Canceled):
        execute(spec, digits_mlp, digits, tmp_path / "out", StopAfterFirstCheckpoint(), ckpt, latency=config)
    result = execute(spec, digits_mlp, digits, tmp_path / "out", None, ckpt, latency=config)
    runtimes = result.report["speed"]["runtimes"]
    assert set(runtimes[TORCH_CPU]["dense"]) == {"batch_1", "batch_32"}  # measured before the interruption
    assert "resumed" in runtimes[ORT_CPU]["dense"]["error"] and runtimes[ORT_CPU]["speedup"] == {}
    assert set(runtimes[ORT_CPU]["pruned"]) == {"batch_1", "batch_32"}
    assert result.report["size"]["dense_safetensors_bytes"] == result.artifacts["pruned"].stat().st_size
