"""Issue #14: an imported ONNX transformer of (input_ids, attention_mask) runs as a job on a pre-tokenized .jsonl:
the packed module gives the graph's own outputs, a run prunes it (distillation without labels, cross-entropy with
them) and the pruned model goes out as ONNX with the upload's two inputs; text data without a tokenizer is a 422."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from _hf_onnx import IdsAndMask, batch, bert_classifier, export, gpt2
from core.engine.grads import Loss
from core.errors import InvalidInput
from core.io.onnx import onnx_to_torch
from core.runs.hf_job import check_pairing
from core.runs.onnx_job import load_onnx_text_job
from core.runs.run import Run
from core.runs.spec import PruneSpec

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::UserWarning")

SPEC = {"sparsity": 0.5, "fisher": {"samples": 4, "block_size": 16, "recompute": 1, "lambda": 1e-6}}


def _rows(n: int, labels: bool, seed: int = 0) -> list[dict]:
    ids, mask = batch(n, 9, seed=seed)
    rows = []
    for i in range(n):
        k = int(mask[i].sum())
        row = {"input_ids": ids[i, :k].tolist(), "attention_mask": [1] * k}
        rows.append(row | ({"label": i % 3} if labels else {}))
    return rows


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def bert_onnx(tmp_path_factory) -> Path:
    return export(IdsAndMask(bert_classifier()).eval(), batch(2, 8), tmp_path_factory.mktemp("o") / "b.onnx",
                  dynamo=False)  # fmt: skip


def test_classifier_job_prunes_and_exports_with_the_uploads_inputs(tmp_path: Path, bert_onnx: Path) -> None:
    data = _write(tmp_path / "d.jsonl", _rows(24, labels=True))
    spec, model, ds = load_onnx_text_job(PruneSpec.model_validate(SPEC), bert_onnx, data, "jsonl")
    assert spec.loss is Loss.CROSS_ENTROPY and spec.metric == "accuracy" and ds.num_classes == 3
    # the packed tensor gives the graph's own outputs, as onnxruntime computes them on the padded inputs
    ids, mask = ds.x_train[:5, :9].long(), ds.x_train[:5, 9:].long()
    want = ort.InferenceSession(str(bert_onnx)).run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(model(ds.x_train[:5]).numpy(), want[0], atol=2e-5, rtol=1e-4)
    result = Run(spec, model, ds, tmp_path / "out").execute()
    assert result.report["onnx_error"] is None and result.report["sparsity"]["pruned_layers"] == pytest.approx(0.5)
    # the pruned graph takes the upload's inputs, has the masks' zeros and computes what the pruned module does
    session = ort.InferenceSession(str(result.artifacts["onnx"]))
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    again = onnx_to_torch(result.artifacts["onnx"]).eval()
    with torch.no_grad():
        got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        np.testing.assert_allclose(got, model(ds.x_train[:5]).numpy(), atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(again(ids, mask).numpy(), got, atol=2e-5, rtol=1e-4)


def test_unlabelled_job_distils_the_dense_outputs(tmp_path: Path) -> None:
    onnx_path = export(IdsAndMask(gpt2()).eval(), batch(2, 8), tmp_path / "g.onnx", dynamo=False)
    data = _write(tmp_path / "d.jsonl", _rows(16, labels=False))
    spec, model, ds = load_onnx_text_job(PruneSpec.model_validate(SPEC), onnx_path, data, "jsonl")
    assert spec.loss is Loss.MSE and spec.fisher.kind.value == "true" and tuple(ds.y_train.shape) == (16, 9, 100)
    result = Run(spec, model, ds, tmp_path / "out").execute()
    before, after = result.report["metrics"]["before"]["validation"], result.report["metrics"]["after"]["validation"]
    assert before["cosine"] == pytest.approx(1.0) and before["loss"] == pytest.approx(0.0, abs=1e-10)
    assert 0.0 < after["cosine"] < 1.0 and after["loss"] > 0.0


def test_text_data_without_a_tokenizer_is_refused(tmp_path: Path, bert_onnx: Path) -> None:
    text = _write(tmp_path / "t.jsonl", [{"text": "the quick brown fox"}] * 4)
    with pytest.raises(InvalidInput, match="ONNX model has no tokenizer"):
        load_onnx_text_job(PruneSpec(sparsity=0.5), bert_onnx, text, "jsonl")
    with pytest.raises(InvalidInput, match="ONNX model has no tokenizer"):
        check_pairing("onnx", "txt")
    check_pairing("onnx", "jsonl")  # pre-tokenized .jsonl: the job decides, once it reads the rows
    with pytest.raises(InvalidInput, match="objective"):
        load_onnx_text_job(PruneSpec(sparsity=0.5, text={"objective": "masked_lm"}), bert_onnx, text, "jsonl")


def test_a_graph_input_the_data_lacks_is_named(tmp_path: Path) -> None:
    from _onnx_ops import f32, graph, node

    path = tmp_path / "odd.onnx"
    path.write_bytes(graph([node("Add", ["input_ids", "pixels"])], {"input_ids": f32(2, 3), "pixels": f32(2, 3)})
                     .SerializeToString())  # fmt: skip
    data = _write(tmp_path / "d.jsonl", _rows(4, labels=False))
    with pytest.raises(InvalidInput, match=r"inputs \['pixels'\] are not in a pre-tokenized dataset"):
        load_onnx_text_job(PruneSpec(sparsity=0.5), path, data, "jsonl")


def test_named_inputs_npz_feeds_a_two_input_graph(tmp_path: Path) -> None:
    """Float and int data for several inputs in general: an .npz of ``x.<name>`` arrays (any order) and ``y`` is
    packed into one float tensor, the graph gets each input by name in its own dtype (a float input and an int64
    one here), and a run prunes it; names that are not the graph's are a 422 naming both."""
    from onnx import TensorProto, helper, numpy_helper

    from core.io.data import load_dataset
    from core.runs.onnx_job import bind_named_inputs

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(6, 3)).astype(np.float32), "fc.weight")
    nodes = [helper.make_node("Cast", ["ids"], ["idsf"], to=TensorProto.FLOAT),
             helper.make_node("Concat", ["feats", "idsf"], ["cat"], axis=1),
             helper.make_node("MatMul", ["cat", "fc.weight"], ["out"])]  # fmt: skip
    g = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("feats", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 2])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3])], [w],
    )  # fmt: skip
    model_path = tmp_path / "m.onnx"
    model_path.write_bytes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    feats, ids = rng.normal(size=(40, 4)).astype(np.float32), rng.integers(0, 9, size=(40, 2))
    np.savez(tmp_path / "d.npz", **{"x.ids": ids, "x.feats": feats}, y=rng.integers(0, 3, size=40))
    data = load_dataset(tmp_path / "d.npz")
    assert data.named_inputs == (("ids", (2,)), ("feats", (4,))) and tuple(data.x_train.shape) == (40, 6)
    model = bind_named_inputs(onnx_to_torch(model_path).eval(), data)
    want = ort.InferenceSession(str(model_path)).run(None, {"feats": feats[:5], "ids": ids[:5]})[0]
    with torch.no_grad():
        np.testing.assert_allclose(model(data.x_train[:5]).numpy(), want, atol=1e-5, rtol=1e-5)
    result = Run(PruneSpec.model_validate(SPEC | {"sparsity": 0.5}), model, data, tmp_path / "out").execute()
    assert result.report["sparsity"]["pruned_layers"] == pytest.approx(0.5, abs=0.1)
    np.savez(tmp_path / "bad.npz", **{"x.ids": ids, "x.pixels": feats}, y=rng.integers(0, 3, size=40))
    with pytest.raises(InvalidInput, match=r"named inputs \['ids', 'pixels'\] are not the ONNX model's inputs"):
        bind_named_inputs(onnx_to_torch(model_path), load_dataset(tmp_path / "bad.npz"))
