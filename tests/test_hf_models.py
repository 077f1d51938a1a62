"""Hugging Face models in and out (core level): the adapter against transformers' and sentence-transformers' own
outputs and losses (float64 oracles), the objectives' data, the hf_model.zip round trip, and every refused input
(each a specific error, nothing left in the temporary directory)."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import stat
import tarfile
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
from torch.func import functional_call, grad, vmap

from _hf_models import folder_entries, minilm_dir, sentences, tar_folder, write_model, zip_bytes, zip_folder
from core.errors import InvalidInput, TooLarge, UnsafeFormat
from core.io.data.text import TextData, read_text_dataset, text_format
from core.io.hf import ArchiveLimits, load_hf_archive, load_hf_folder
from core.io.hf.adapter import block_linear_names
from core.io.hf.export import write_hf_zip
from core.io.hf.prepare import prepare_text_job


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {k: write_model(root / k, k) for k in ("bert", "bert_cls", "bert_mlm", "gpt2")}


def _prepare(folder: Path, texts: list[str], labels=None, **kw):
    loaded = load_hf_folder(folder, need_tokenizer=True)
    args = {"max_length": 16, "packing": None, "objective": "auto", "mask_fraction": 0.15, "seed": 0} | kw
    return loaded, prepare_text_job(loaded, TextData(texts=texts, labels=labels), **args)


def _leftovers() -> set[str]:
    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("arborist-hf-")}


# --------------------------------------------------------------------------------------------- adapter vs oracles


def test_causal_lm_objective_is_the_models_own_loss_with_its_gradient(tiny: dict[str, Path]) -> None:
    """MSE(sqrt(nll), 0) of the adapter = GPT-2's own next-token loss, and its gradient (transformers computes its loss
    in float32 whatever the model's dtype: the tolerances are float32's)."""
    loaded, prep = _prepare(tiny["gpt2"], sentences(6), packing=False)
    model = prep.model.double()
    x = prep.data.x_train[:1].double()
    ids, att = x[:, 0].long(), x[:, 1].long()
    labels = torch.where(att == 1, ids, torch.full_like(ids, -100))
    hf = loaded.built.model
    own = hf(input_ids=ids, attention_mask=att, labels=labels).loss
    ours = torch.nn.functional.mse_loss(model(x), torch.zeros(1, 1, dtype=torch.float64))
    assert torch.allclose(ours, own.double(), rtol=1e-6), (float(ours), float(own))
    params = dict(model.named_parameters())
    g_own = torch.autograd.grad(own, list(params.values()), allow_unused=True)
    g_ours = torch.autograd.grad(ours, list(params.values()), allow_unused=True)
    for name, a, b in zip(params, g_own, g_ours, strict=True):
        if a is None:
            assert b is None or not b.abs().any(), name
        else:
            assert torch.allclose(a.double(), b, rtol=1e-4, atol=1e-7), name


def test_vmap_per_example_gradients_equal_a_loop(tiny: dict[str, Path]) -> None:
    """The engine's vmap(grad) over the adapter (padding masks differ per example) equals one grad per example."""
    _, prep = _prepare(tiny["bert"], sentences(5, seed=3))
    model = prep.model.double().eval()
    x, y = prep.data.x_train.double(), prep.data.y_train.double() + 0.1
    assert (x[:, 1] == 0).any(), "the examples should have padding"
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p, xb, yb):
        return torch.nn.functional.mse_loss(functional_call(model, p, (xb,)), yb)

    batched = vmap(grad(loss), in_dims=(None, 0, 0))(params, x[:, None], y[:, None])
    for i in range(len(x)):
        single = grad(loss)(params, x[i : i + 1], y[i : i + 1])
        for n in single:
            assert torch.allclose(batched[n][i], single[n], atol=1e-10), (i, n)


def test_classifier_logits_match_transformers(tiny: dict[str, Path]) -> None:
    texts = sentences(4, seed=1)
    loaded, prep = _prepare(tiny["bert_cls"], texts, labels=[0, 1, 2, 0])
    assert prep.objective == "classification" and prep.loss == "cross_entropy"
    x = prep.data.x_train
    with torch.no_grad():
        ours = prep.model(x)
        own = loaded.built.model(input_ids=x[:, 0].long(), attention_mask=x[:, 1].long()).logits
    assert torch.allclose(ours, own, atol=1e-6)


def test_minilm_embedding_is_sentence_transformers_embedding() -> None:
    """The distillation output of the pre-trained MiniLM is what SentenceTransformer.encode gives (before its
    Normalize module): same tokenizer, same mean pooling of 1_Pooling."""
    from sentence_transformers import SentenceTransformer

    texts = ["A man is eating food.", "The cat sits outside on the warm stones of the garden wall."]
    loaded, prep = _prepare(minilm_dir(), texts, max_length=64)
    assert prep.objective == "distillation" and loaded.source.pooling == "mean"
    st = SentenceTransformer(str(minilm_dir()), device="cpu")
    ref = st.encode(texts, convert_to_tensor=True, normalize_embeddings=True)
    ours = torch.nn.functional.normalize(prep.data.y_train, dim=-1)
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()


def test_default_layers_are_the_block_linears(tiny: dict[str, Path]) -> None:
    _, prep = _prepare(tiny["bert_cls"], sentences(3), labels=[0, 1, 2])
    names = block_linear_names(prep.model)
    assert names and all(n.startswith("bert.encoder.layer.") for n in names)
    assert not any("classifier" in n or "pooler" in n or "embeddings" in n for n in names)
    _, gpt = _prepare(tiny["gpt2"], sentences(4), packing=True)
    assert set(block_linear_names(gpt.model)) == {
        f"transformer.h.{i}.{m}.weight"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }


# --------------------------------------------------------------------------------------------- objectives' data


def test_masked_lm_masking_is_seeded_and_never_touches_specials(tiny: dict[str, Path]) -> None:
    texts = sentences(20)
    _, a = _prepare(tiny["bert_mlm"], texts, seed=5)
    _, b = _prepare(tiny["bert_mlm"], texts, seed=5)
    _, c = _prepare(tiny["bert_mlm"], texts, seed=6)
    xa = a.data.x_train
    assert torch.equal(xa, b.data.x_train) and not torch.equal(xa, c.data.x_train)
    labels, ids = xa[:, 2].long(), xa[:, 0].long()
    masked = labels != -100
    assert masked.any(1).all(), "every example has a masked token"
    assert (ids[masked] == a.model.hf.config.vocab_size * 0 + 4).all()  # [MASK] is id 4 in the test tokenizer
    assert not masked[:, 0].any(), "[CLS] is never masked"


def test_causal_packing_cuts_full_windows(tiny: dict[str, Path]) -> None:
    texts = sentences(30)
    _, prep = _prepare(tiny["gpt2"], texts, packing=True, max_length=8)
    x = prep.data.x_train
    assert x.shape[1:] == (3, 8) and bool((x[:, 1] == 1).all())
    assert torch.equal(x[:, 2], x[:, 0])  # every token is a target (shifted inside the adapter)


def test_text_formats(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_text('{"text": "hello there", "label": 1}\n{"text": "hi", "label": 0}\n')
    (tmp_path / "b.txt").write_text("first line\n\nsecond line\n")
    pq.write_table(pa.table({"text": ["x y", "z"]}), tmp_path / "c.parquet")
    (tmp_path / "d.jsonl").write_text('{"input_ids": [1, 2, 3]}\n{"input_ids": [4], "attention_mask": [1]}\n')
    assert [text_format(tmp_path / n) for n in ("a.jsonl", "b.txt", "c.parquet")] == ["jsonl", "txt", "text_parquet"]
    assert read_text_dataset(tmp_path / "a.jsonl", "jsonl").labels == [1, 0]
    assert read_text_dataset(tmp_path / "b.txt", "txt").texts == ["first line", "second line"]
    assert read_text_dataset(tmp_path / "c.parquet", "text_parquet").texts == ["x y", "z"]
    assert read_text_dataset(tmp_path / "d.jsonl", "jsonl").input_ids == [[1, 2, 3], [4]]
    (tmp_path / "e.jsonl").write_text('{"text": "a", "label": 1}\n{"text": "b"}\n')
    with pytest.raises(InvalidInput, match="no label"):
        read_text_dataset(tmp_path / "e.jsonl", "jsonl")


# --------------------------------------------------------------------------------------------- models out


def test_hf_model_zip_round_trip(tiny: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    _, prep = _prepare(tiny["gpt2"], sentences(8), packing=True)
    names = prep.model.default_prunable_names()
    params = dict(prep.model.named_parameters())
    masks = {n: (torch.rand(params[n].shape, generator=torch.Generator().manual_seed(1)) > 0.5).float() for n in names}
    with torch.no_grad():
        for n, m in masks.items():
            params[n].mul_(m)
    path = write_hf_zip(tmp_path / "hf_model.zip", prep.model.source, prep.model.state_dict(), masks)
    out = tmp_path / "out"
    zipfile.ZipFile(path).extractall(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in tiny["gpt2"].iterdir())
    config = json.loads((out / "config.json").read_text())
    sc = config["quantization_config"]["sparsity_config"]
    assert sc["format"] == "dense" and sc["sparsity_structure"] == "unstructured"
    assert sorted(sc["targets"]) == sorted(n.removesuffix(".weight") for n in names)
    zeros = sum(int((m == 0).sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert sc["global_sparsity"] == pytest.approx(zeros)
    back = AutoModelForCausalLM.from_pretrained(out)
    own = dict(back.named_parameters())
    for n, p in prep.model.named_parameters():
        assert torch.equal(own[n], p), n


# --------------------------------------------------------------------------------------------- refused inputs


def _archive(tmp_path: Path, entries: dict[str, bytes]) -> Path:
    path = tmp_path / "m.zip"
    path.write_bytes(zip_bytes(entries))
    return path


def _refused(path: Path, cls: type[Exception], match: str, limits: ArchiveLimits | None = None) -> None:
    before = _leftovers()
    with pytest.raises(cls, match=match):
        load_hf_archive(path, archive_limits=limits or ArchiveLimits())
    assert _leftovers() == before, "the staging folder was left behind"


class _Marker:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_refusals(tiny: dict[str, Path], tmp_path: Path) -> None:
    good = folder_entries(tiny["bert"])
    config = json.loads(good["config.json"])

    def cfg(**kv) -> bytes:
        return json.dumps({**config, **kv}).encode()

    bin_only = {k: v for k, v in good.items() if k != "model.safetensors"} | {"pytorch_model.bin": pickle.dumps({})}
    _refused(_archive(tmp_path, bin_only), UnsafeFormat, r"pytorch_model.bin")
    _refused(_archive(tmp_path, good | {"config.json": cfg(auto_map={"AutoModel": "x.Y"})}), UnsafeFormat, "auto_map")
    _refused(
        _archive(tmp_path, good | {"config.json": cfg(model_type="no-such-model")}),
        InvalidInput,
        "transformers does not know",
    )
    _refused(_archive(tmp_path, good | {"tokenizer.json": pickle.dumps(_Marker())}), UnsafeFormat, "pickle")
    _refused(_archive(tmp_path, good | {"../evil.json": b"{}"}), UnsafeFormat, r"'\.\.'")
    _refused(_archive(tmp_path, good | {"/etc/evil.json": b"{}"}), UnsafeFormat, "absolute")
    index = {"metadata": {}, "weight_map": {"embeddings.word_embeddings.weight": "../model.safetensors"}}
    sharded = {k: v for k, v in good.items() if k != "model.safetensors"}
    sharded |= {"model.safetensors.index.json": json.dumps(index).encode()}
    _refused(_archive(tmp_path, sharded), UnsafeFormat, "shard must be a .safetensors file in the model folder")
    _refused(
        _archive(tmp_path, good | {"config.json": cfg(hidden_size=32, intermediate_size=64)}),
        InvalidInput,
        "do not match the architecture",
    )
    _refused(_archive(tmp_path, good | {"inner.zip": zip_bytes({"a": b"b"})}), UnsafeFormat, "nested")
    _refused(_archive(tmp_path, good | {"modeling_evil.py": b"import os"}), UnsafeFormat, "Python code")


def test_damaged_and_clashing_archives_and_configs_are_refused(tiny: dict[str, Path], tmp_path: Path) -> None:
    """What a careless or hostile archive holds beyond the named cases: each a 4xx error, never an unexpected one
    (which the API would answer with a 500), and no staging folder left behind."""
    good = folder_entries(tiny["bert"])
    config = json.loads(good["config.json"])

    def cfg(**kv) -> bytes:
        return json.dumps({**config, **kv}).encode()

    buf = io.BytesIO()  # config.json twice (zipfile only warns)
    with zipfile.ZipFile(buf, "w") as zf, pytest.warns(UserWarning, match="Duplicate name"):
        for k, v in good.items():
            zf.writestr(k, v)
        zf.writestr("config.json", good["config.json"])
    (tmp_path / "twice.zip").write_bytes(buf.getvalue())
    _refused(tmp_path / "twice.zip", InvalidInput, "appears twice")
    _refused(_archive(tmp_path, good | {"extra": b"x", "extra/inner.txt": b"y"}), InvalidInput, "clashes")
    damaged = bytearray(zip_bytes(good))
    at = damaged.find(b"model.safetensors") + 200  # inside that entry's deflated data
    damaged[at : at + 64] = bytes(64)
    (tmp_path / "damaged.zip").write_bytes(bytes(damaged))
    _refused(tmp_path / "damaged.zip", InvalidInput, "cannot be read")
    _refused(_archive(tmp_path, good | {"config.json": cfg(hidden_size="32")}), InvalidInput, "config")
    _refused(_archive(tmp_path, good | {"config.json": cfg(num_attention_heads=0)}), InvalidInput, "config")
    huge_int = b'{"model_type": "bert", "x": ' + b"1" * 5000 + b"}"
    _refused(_archive(tmp_path, good | {"config.json": huge_int}), InvalidInput, "not valid UTF-8 JSON")
    index = {"weight_map": {"embeddings.word_embeddings.weight": ["model.safetensors"]}}
    sharded = {k: v for k, v in good.items() if k != "model.safetensors"}
    _refused(
        _archive(tmp_path, sharded | {"model.safetensors.index.json": json.dumps(index).encode()}),
        InvalidInput,
        "must be file names",
    )
    tgz = tmp_path / "odd.tar.gz"  # an entry of an unknown type is refused at its header
    with tarfile.open(tgz, "w:gz") as tf:
        odd = tarfile.TarInfo("weird")
        odd.type = b"Z"
        tf.addfile(odd)
        for p in sorted(tiny["bert"].iterdir()):
            tf.add(p, p.name)
    _refused(tgz, UnsafeFormat, "not a regular file")


def test_symlink_entries_are_refused(tiny: dict[str, Path], tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for k, v in folder_entries(tiny["bert"]).items():
            zf.writestr(k, v)
        link = zipfile.ZipInfo("vocab.txt")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    (tmp_path / "link.zip").write_bytes(buf.getvalue())
    _refused(tmp_path / "link.zip", UnsafeFormat, "symbolic link")
    tgz = tmp_path / "link.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        for p in sorted(tiny["bert"].iterdir()):
            tf.add(p, p.name)
        info = tarfile.TarInfo("vocab.txt")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(info)
    _refused(tgz, UnsafeFormat, "link")


def test_bombs_are_refused_before_extraction(tiny: dict[str, Path], tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for k, v in folder_entries(tiny["bert"]).items():
            zf.writestr(k, v)
        with zf.open("padding.txt", "w", force_zip64=True) as f:  # 64 MiB of zeros, ~64 KiB compressed
            for _ in range(64):
                f.write(bytes(1 << 20))
    _refused(bomb, TooLarge, "zip bomb")
    _refused(bomb, TooLarge, "over the limit", ArchiveLimits(max_total_bytes=1 << 20))
    _refused(bomb, TooLarge, "entries", ArchiveLimits(max_files=3))


def test_zip_and_tar_and_wrapped_folder_load(tiny: dict[str, Path], tmp_path: Path) -> None:
    for path in (
        zip_folder(tiny["bert_cls"], tmp_path / "a.zip"),
        tar_folder(tiny["bert_cls"], tmp_path / "a.tgz"),
        zip_folder(tiny["bert_cls"], tmp_path / "b.zip", prefix="my-model/"),
    ):
        loaded = load_hf_archive(path)
        assert loaded.source.details["head"] == "sequence_classification"
        assert loaded.source.details["num_labels"] == 3
    shutil.rmtree(tmp_path)


def test_cli_packs_a_folder_the_server_accepts(tiny: dict[str, Path], tmp_path: Path) -> None:
    from cli.pack import packed

    with packed(tiny["bert"]) as archive:
        assert archive.suffix == ".zip" and archive != tiny["bert"]
        assert load_hf_archive(archive).source.details["head"] == "base"
    assert not archive.exists()
    link = tmp_path / "linked"
    shutil.copytree(tiny["bert"], link)
    (link / "extra.txt").symlink_to("/etc/passwd")
    with pytest.raises(ValueError, match="symbolic link"), packed(link):
        pass
