"""Structured pruning of Llama-style Hugging Face models (Llama, Mistral, Qwen2): FFN units and attention heads
(whole key/value groups), against oracles: the masked dense model in float64, a least-squares brute force for the
OBS choice and update, and ``from_pretrained`` of the exported folder (transformers builds it from config.json
alone). Tiny random models from ``tests/_hf_models.py``: hidden 16, 4 query heads of head_dim 6, FFN 24, 2 layers."""

from __future__ import annotations

import copy
import json
import zipfile

import pytest
import torch

from _hf_models import jsonl, sentences, write_model, zip_folder
from core.engine.structured.groups import attention_shape, find_families, head_config
from core.engine.structured.prune import prune_structured
from core.engine.structured.saliency import column_groups
from core.engine.structured.shrink import unit_index

pytestmark = pytest.mark.usefixtures("one_thread")


def _causal_lm(tmp_path, kind):
    from transformers import AutoModelForCausalLM

    folder = write_model(tmp_path / kind, kind)
    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").double().eval()


def _masked(model, families, results):
    """``model`` with each removed unit's consumer columns zeroed (q/k/v rows and gate/up rows left as they are)."""
    model = copy.deepcopy(model)
    for fam, res in zip(families, results, strict=True):
        consumer = model.get_submodule(fam.consumer)
        idx = unit_index(torch.tensor(res.removed, dtype=torch.long), fam.units, consumer.weight.shape[1])
        with torch.no_grad():
            consumer.weight.index_fill_(1, idx, 0.0)
    return model


@pytest.mark.parametrize(
    ("kind", "kv", "biases"), [("llama", 4, False), ("llama_gqa", 2, False), ("qwen2", 2, True), ("mistral", 2, False)]
)
def test_llama_style_families(tmp_path, kind, kv, biases):
    model = _causal_lm(tmp_path, kind)
    heads = find_families(model, "heads")
    assert [f.name for f in heads] == ["model.layers.0", "model.layers.1"]
    fam = heads[0]
    assert fam.units == kv and fam.consumer == "model.layers.0.self_attn.o_proj"  # a unit is a key/value group
    names = [s.name.removeprefix("model.layers.0.self_attn.") for s in fam.slices]
    expected = [f"{p}_proj.{t}" for p in "qkv" for t in (("weight", "bias") if biases else ("weight",))]
    assert names == [*expected, "o_proj.weight"]
    assert [s.dim for s in fam.slices] == [0] * len(expected) + [1]
    neurons = find_families(model, "neurons")
    assert [(f.units, f.consumer) for f in neurons] == [(24, f"model.layers.{i}.mlp.down_proj") for i in (0, 1)]
    assert [s.name.rsplit(".", 2)[-2] for s in neurons[0].slices] == ["gate_proj", "up_proj", "down_proj"]
    assert find_families(model, "channels") == []


@pytest.mark.parametrize("kind", ["llama", "llama_gqa", "qwen2"])
@pytest.mark.parametrize("structure", ["heads", "neurons"])
def test_shrunk_llama_equals_the_masked_model(tmp_path, kind, structure):
    """Rotary embeddings act on each head's head_dim alone: removing whole heads is exact, in float64."""
    model = _causal_lm(tmp_path, kind)
    ids = torch.randint(0, 30, (3, 9), generator=torch.Generator().manual_seed(0))
    families = find_families(model, structure)
    shrunk = copy.deepcopy(model)
    results = prune_structured(shrunk, find_families(shrunk, structure), 0.5, None, saliency="l2")
    reference = _masked(model, families, results)
    with torch.no_grad():
        got, want = shrunk(input_ids=ids).logits, reference(input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(reference(input_ids=ids).logits, model(input_ids=ids).logits)  # it removed something
    layer = shrunk.model.layers[1]
    heads, kv, _ = attention_shape(model.model.layers[1])
    if structure == "heads":
        assert attention_shape(layer) == (heads // 2, kv // 2, 6)
        assert layer.self_attn.num_key_value_groups == heads // kv  # the ratio stays integral and unchanged
        config = {"num_attention_heads": heads // 2, "num_key_value_heads": kv // 2, "head_dim": 6}
        assert head_config(shrunk, families) == config
    else:
        mlp = layer.mlp
        assert mlp.gate_proj.out_features == mlp.up_proj.out_features == mlp.down_proj.in_features == 12


def test_obs_heads_choice_and_update_equal_the_least_squares_brute_force(tmp_path):
    """The first layer's heads (its input Hessian comes from the dense model): the greedy OBS order equals an exact
    least-squares search over the head groups of o_proj's inputs, and o_proj's kept columns equal that fit."""
    from test_structured import _lstsq_loss

    model = _causal_lm(tmp_path, "llama")
    ids = torch.randint(0, 30, (8, 10), generator=torch.Generator().manual_seed(1))
    o_proj = model.model.layers[0].self_attn.o_proj
    seen = []
    handle = o_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    x, w = seen[0], o_proj.weight.detach().clone()
    groups = column_groups(4, 24)
    chosen: list[int] = []
    for _ in range(2):  # brute force: every remaining head's exact cost given the ones already removed
        costs = {
            g: _lstsq_loss(x, w, [c for k in [*chosen, g] for c in groups[k].tolist()])[0]
            for g in range(4)
            if g not in chosen
        }
        chosen.append(min(costs, key=costs.get))
    _, oracle = _lstsq_loss(x, w, [c for k in chosen for c in groups[k].tolist()])
    shrunk = copy.deepcopy(model)
    results = prune_structured(shrunk, find_families(shrunk, "heads"), 0.5, ids, saliency="obs", damp=0.0)
    assert results[0].removed == chosen
    kept = sorted(set(range(4)) - set(chosen))
    torch.testing.assert_close(
        shrunk.model.layers[0].self_attn.o_proj.weight, oracle[:, groups[kept].flatten()], rtol=1e-7, atol=1e-9
    )
    q_rows = groups[kept].flatten()  # the kept heads' q rows (4 query heads, one per key/value head)
    torch.testing.assert_close(
        shrunk.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight[q_rows]
    )


@pytest.mark.parametrize(("kind", "structure"), [("llama_gqa", "heads"), ("qwen2", "heads"), ("llama", "neurons")])
def test_llama_job_exports_a_config_that_from_pretrained_loads_to_the_masked_model(tmp_path, kind, structure):
    """An OBS job (core.runs): ``hf_model.zip``'s config.json states the smaller widths, ``from_pretrained`` loads
    it with no missing, unexpected or mismatched weights, and it computes what the dense model computes with the
    removed units' consumer columns zeroed and the job's updated consumer weights in the kept ones (float64)."""
    from transformers import AutoModelForCausalLM

    from core.runs.hf_job import load_hf_job
    from core.runs.run import execute
    from core.runs.spec import PruneSpec

    folder = write_model(tmp_path / kind, kind)
    data = tmp_path / "d.jsonl"
    data.write_bytes(jsonl([{"text": t} for t in sentences(20)]))
    spec = PruneSpec(method="obc", sparsity=0.5, structure=structure, fisher={"samples": 8}, device="cpu")
    run_spec, model, ds = load_hf_job(spec, zip_folder(folder, tmp_path / "m.zip"), data, "jsonl")
    result = execute(run_spec, model, ds, tmp_path / "out")
    st = result.report["structure"]
    heads, kv = (4, 4) if kind == "llama" else (4, 2)
    expected = (
        {"num_attention_heads": heads // 2, "num_key_value_heads": kv // 2, "head_dim": 6}
        if structure == "heads"
        else {"intermediate_size": 12}
    )
    assert st["hf_config"] == expected
    zipfile.ZipFile(result.artifacts["hf_model"]).extractall(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert {k: config[k] for k in expected} == expected and "quantization_config" not in config
    loaded, info = AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf",
        output_loading_info=True,
        attn_implementation="eager",  # sdpa differs by 1e-8 in float64
    )
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    dense = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").double().eval()
    loaded = loaded.double().eval()
    for i, layer in enumerate(st["layers"]):  # the masked dense model: removed columns zero, kept ones updated
        name = "self_attn.o_proj" if structure == "heads" else "mlp.down_proj"
        consumer = dense.get_submodule(f"model.layers.{i}.{name}")
        kept = sorted(set(range(layer["units"])) - set(layer["removed"]))
        cols = unit_index(torch.tensor(kept), layer["units"], consumer.in_features)
        with torch.no_grad():
            new = torch.zeros_like(consumer.weight)
            new[:, cols] = loaded.get_submodule(f"model.layers.{i}.{name}").weight
            consumer.weight.copy_(new)
    ids = ds.x_train[:4, 0].long()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=1e-10, atol=1e-10)


def test_heads_of_other_hugging_face_models_are_refused_before_queueing():
    from core.errors import InvalidInput
    from core.runs.preflight import check_job
    from core.runs.spec import PruneSpec

    spec = PruneSpec(method="obc", sparsity=0.5, structure="heads")
    common = {"arch": None, "num_examples": 100, "input_shape": [3, 16], "num_classes": None, "has_val": False}
    for model_type in ("bert", "gpt2"):
        with pytest.raises(InvalidInput, match=f"Llama-style.*model_type llama, mistral, qwen2.*'{model_type}'") as e:
            check_job(spec, arch_kwargs={"model_type": model_type}, model_format="huggingface", **common)
        assert e.value.errors[0]["loc"] == ["spec", "structure"]
    for model_type in ("llama", "mistral", "qwen2"):
        assert check_job(spec, arch_kwargs={"model_type": model_type}, model_format="huggingface", **common) is None


def test_heads_that_round_to_no_group_are_refused(tmp_path):
    """Multi-query attention (one key/value head: its query heads are one group, which stays) and a sparsity that
    rounds to no group are a 422 on ``spec.sparsity``, not a job that removes nothing."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from core.errors import InvalidInput
    from core.runs.spec import PruneSpec
    from core.runs.structured import check_structure

    def llama(kv):
        config = LlamaConfig(
            vocab_size=30, hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=kv, head_dim=4,
        )  # fmt: skip
        return LlamaForCausalLM(config)

    spec = PruneSpec(method="obc", sparsity=0.5, structure="heads")
    with pytest.raises(InvalidInput, match="single key/value head") as e:
        check_structure(llama(1), spec)
    assert e.value.errors[0]["loc"] == ["spec", "sparsity"]
    with pytest.raises(InvalidInput, match=r"rounds to none; raise the sparsity above 0\.25"):
        check_structure(llama(2), spec.model_copy(update={"sparsity": 0.2}))
    assert [f.units for f in check_structure(llama(2), spec)] == [2]


def test_llama_heads_run_resumes_from_its_checkpoint_to_the_uninterrupted_weights(tmp_path):
    """Stopped after the prune's checkpoint: the resumed attempt shrinks the freshly loaded dense Llama to the kept
    key/value groups (no attribute of the attention changes: it infers its head counts from the widths), loads the
    checkpoint and ends with the uninterrupted run's weights."""
    from safetensors.torch import load_file

    from core.errors import Canceled
    from core.runs.checkpoint import DirectoryCheckpointer
    from core.runs.hf_job import load_hf_job
    from core.runs.run import execute
    from core.runs.spec import PruneSpec
    from test_structured import _StopAfter

    archive = zip_folder(write_model(tmp_path / "m", "llama_gqa"), tmp_path / "m.zip")
    data = tmp_path / "d.jsonl"
    data.write_bytes(jsonl([{"text": t} for t in sentences(20)]))
    spec = PruneSpec(
        method="obc", sparsity=0.5, structure="heads", fisher={"samples": 8}, finetune={"epochs": 1}, device="cpu"
    )

    def job(out, hooks, ck):
        run_spec, model, ds = load_hf_job(spec, archive, data, "jsonl")
        return execute(run_spec, model, ds, tmp_path / out, hooks, ck)

    whole = job("a", _StopAfter(), DirectoryCheckpointer(tmp_path / "ck_a"))
    ck = DirectoryCheckpointer(tmp_path / "ck_b")
    with pytest.raises(Canceled):
        job("b", _StopAfter(1), ck)
    hooks = _StopAfter()
    resumed = job("b", hooks, ck)
    assert "resumed" in hooks.events and "pruned" not in hooks.events
    a, b = load_file(whole.artifacts["pruned"]), load_file(resumed.artifacts["pruned"])
    assert a.keys() == b.keys() and a["model.layers.0.self_attn.k_proj.weight"].shape == (6, 16)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert resumed.report["structure"]["hf_config"] == whole.report["structure"]["hf_config"]
