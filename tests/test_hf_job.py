"""core.runs.hf_job: a stored archive and text dataset → the spec the run executes, the adapter and the tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _hf_models import jsonl, sentences, write_model, zip_folder
from core.engine.grads import Loss
from core.errors import InvalidInput
from core.runs.hf_job import load_hf_job
from core.runs.run import Run
from core.runs.spec import PruneSpec


def test_classifier_job_runs_and_exports(tmp_path: Path) -> None:
    archive = zip_folder(write_model(tmp_path / "cls", "bert_cls"), tmp_path / "cls.zip")
    data = tmp_path / "d.jsonl"
    data.write_bytes(jsonl([{"text": t, "label": i % 3} for i, t in enumerate(sentences(20))]))
    spec = PruneSpec(sparsity=0.5, fisher={"samples": 4, "block_size": 16, "recompute": 1})
    run_spec, model, ds = load_hf_job(spec, archive, data, "jsonl")
    assert run_spec.loss is Loss.CROSS_ENTROPY and run_spec.metric == "accuracy" and ds.num_classes == 3
    result = Run(run_spec, model, ds, tmp_path / "out").execute()
    assert "hf_model" in result.artifacts and result.report["sparsity"]["global"] > 0
    # the ONNX graph of the pruned adapter: ONNX Runtime gives its logits, and the report times both runtimes
    import onnxruntime as ort

    session = ort.InferenceSession(str(result.artifacts["onnx"]), providers=["CPUExecutionProvider"])
    x = ds.x_train[:5]
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert got.shape == expected.shape and abs(got - expected).max() < 1e-4
    assert result.report["onnx_error"] is None
    ort_speed = result.report["speed"]["runtimes"]["onnxruntime_cpu"]
    assert ort_speed["speedup"] and ort_speed["verdict"] == "size only"


def test_fisher_kind_per_objective(tmp_path: Path) -> None:
    """Token objectives refuse the true Fisher; distillation always uses it: its empirical gradients are all zero at
    the dense model (the residuals to the dense outputs are), which the engine confirms."""
    from core.engine.grads import fisher_gradients
    from core.engine.layout import BlockLayout

    data = tmp_path / "d.txt"
    data.write_text("\n".join(sentences(10)))
    lm = zip_folder(write_model(tmp_path / "g", "gpt2"), tmp_path / "g.zip")
    with pytest.raises(InvalidInput, match=r"fisher\.kind 'true'"):
        load_hf_job(PruneSpec(sparsity=0.5, fisher={"kind": "true"}), lm, data, "txt")
    encoder = zip_folder(write_model(tmp_path / "b", "bert"), tmp_path / "b.zip")
    run_spec, model, ds = load_hf_job(PruneSpec(sparsity=0.5), encoder, data, "txt")
    assert run_spec.loss is Loss.MSE and run_spec.metric == "loss" and run_spec.fisher.kind.value == "true"
    params = dict(model.named_parameters())
    layout = BlockLayout({n: tuple(params[n].shape) for n in model.default_prunable_names()}, 16)
    empirical = fisher_gradients(model, layout, ds.x_train, ds.y_train, m=4, loss="mse")
    true = fisher_gradients(model, layout, ds.x_train, ds.y_train, m=4, loss="mse", true_fisher=True)
    assert float(empirical.grads.abs().max()) < 1e-12 < float(true.grads.abs().max())


@pytest.mark.parametrize("kind", ["gpt2", "bert_mlm"])
def test_tokenizer_without_tokenizer_json(tmp_path: Path, kind: str) -> None:
    """vocab.json + merges.txt (GPT-2 byte-level BPE) and vocab.txt (BERT WordPiece) tokenize exactly as
    transformers' own (slow, pure-Python) tokenizers read from the same files, and the job runs on them."""
    from transformers import BertTokenizer, GPT2Tokenizer

    from core.io.hf.files import read_folder
    from core.io.hf.tokenizer import load_tokenizer

    folder = write_model(tmp_path / kind, kind, tokenizer_json=False)
    assert not (folder / "tokenizer.json").exists()
    texts = [*sentences(12, seed=3), "The Quick, brown fox!  jumps"]
    ours = load_tokenizer(read_folder(folder))
    oracle = (GPT2Tokenizer if kind == "gpt2" else BertTokenizer).from_pretrained(str(folder))
    assert [e.ids for e in ours.encode(texts, 64)] == [oracle(t)["input_ids"] for t in texts]
    assert ours.pad_id == oracle.pad_token_id if kind != "gpt2" else ours.eos_id == oracle.eos_token_id
    data = tmp_path / "d.txt"
    data.write_text("\n".join(texts))
    spec = PruneSpec(sparsity=0.5, fisher={"samples": 4, "block_size": 16, "recompute": 1})
    run_spec, model, ds = load_hf_job(spec, zip_folder(folder, tmp_path / "m.zip"), data, "txt")
    result = Run(run_spec, model, ds, tmp_path / "out").execute()
    assert result.report["metrics"]["after"]["validation"]["perplexity"] > 1.0


def test_merges_without_vocab_is_a_clear_refusal(tmp_path: Path) -> None:
    from core.io.hf.files import read_folder
    from core.io.hf.tokenizer import load_tokenizer

    folder = write_model(tmp_path / "g", "gpt2", tokenizer_json=False)
    (folder / "vocab.json").unlink()
    with pytest.raises(InvalidInput, match=r"merges\.txt alone is not a tokenizer: .* needs vocab\.json and merges"):
        load_tokenizer(read_folder(folder))


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_lambda_auto_on_a_hf_model(tmp_path: Path, kind: str) -> None:
    """λ 'auto' on a Hugging Face model: the calibration split is carved from the text examples (never the
    validation split), every λ of the grid is tried on it with the objective's metric, and the chosen one is the
    best there (distillation for the encoder: the lowest MSE to the dense embeddings; the causal LM: the lowest
    token loss)."""
    folder = write_model(tmp_path / kind, kind)
    data = tmp_path / "d.txt"
    data.write_text("\n".join(sentences(40)))
    spec = PruneSpec(sparsity=0.5, fisher={"samples": 4, "block_size": 16, "recompute": 1, "lambda": "auto",
                                            "lambda_grid": [1e-8, 1e-4, 1.0]})  # fmt: skip
    run_spec, model, ds = load_hf_job(spec, zip_folder(folder, tmp_path / "m.zip"), data, "txt")
    result = Run(run_spec, model, ds, tmp_path / "out").execute()
    report = result.report
    splits = report["metrics"]["splits"]
    assert splits["calibration"]["examples"] >= 1 and splits["calibration"]["used_for"] == "lambda 'auto'"
    assert splits["calibration"]["examples"] + splits["train"]["examples"] + splits["validation"]["examples"] == 40
    sweep = report["lambda_sweep"]
    assert {1e-8, 1e-4, 1.0} <= {s["lambda"] for s in sweep}
    best = min(sweep, key=lambda s: s["loss"])
    assert report["lambda"] == best["lambda"] and "lambda_sweep_png" in result.artifacts
