"""core.runs.hf_job: a stored archive and text dataset → the spec the run executes, the adapter and the tensors."""

from __future__ import annotations

from pathlib import Path

import pytest

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
    assert "hf_model" in result.artifacts and "onnx" not in result.artifacts
    assert result.report["sparsity"]["global"] > 0


def test_true_fisher_is_refused_for_mse_objectives(tmp_path: Path) -> None:
    archive = zip_folder(write_model(tmp_path / "b", "bert"), tmp_path / "b.zip")
    data = tmp_path / "d.txt"
    data.write_text("\n".join(sentences(10)))
    spec = PruneSpec(sparsity=0.5, fisher={"kind": "true"})
    with pytest.raises(InvalidInput, match=r"fisher\.kind 'true'"):
        load_hf_job(spec, archive, data, "txt")
    run_spec, _, _ = load_hf_job(PruneSpec(sparsity=0.5), archive, data, "txt")
    assert run_spec.loss is Loss.MSE and run_spec.metric == "loss"
