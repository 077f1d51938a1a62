"""Structured pruning of a Llama-style model (issue #17, heads and FFN units of Llama/Mistral/Qwen2), one run.

No pre-trained Llama is installable offline here, so the model is a RANDOMLY INITIALISED Llama (transformers'
``from_config``, seeded): 4 layers, hidden 512, 8 query heads of head_dim 64 on 4 key/value heads (grouped-query),
FFN 1536, a byte-level BPE vocabulary of 4096 trained on standard-library docstrings (as bench/hf_quality.py). Its
latency numbers are what a real model of this shape would give; its fidelity numbers only compare OBS with the L2
baseline on reconstructing this random model, not quality on a trained one.

Rows: 50 % of the key/value groups (``structure: heads``) and 50 % of the FFN units (``structure: neurons``), by the
service's own run (obc = OBS group saliency with the joint update; magnitude = L2 baseline), calibrated on
``--calibration`` sentences; the exported ``hf_model.zip`` is loaded with ``AutoModelForCausalLM.from_pretrained``
and compared with the dense model on 128 held-out sentences: mean KL(dense ‖ pruned) of the next-token
distributions and top-1 agreement. Latency: dense vs loaded pruned, batch 8 × 128 tokens, one torch thread, the
minimum over repeats of each, the two models' passes alternating, in this run.
Usage: python bench/structured_llama.py [--repeats 20] [--calibration 256]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._util import save, timeit
from bench.hf_quality import stdlib_sentences
from core.io.data.text import TextData
from core.io.hf import load_hf_folder
from core.io.hf.prepare import prepare_text_job
from core.runs.run import execute
from core.runs.spec import PruneSpec

SHAPE = {
    "hidden_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "intermediate_size": 1536,
    "max_position_embeddings": 256,
}


def _folder(texts: list[str]) -> Path:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    root = Path(tempfile.mkdtemp(prefix="llama-")) / "dense"
    root.mkdir()
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=4096, min_frequency=1, special_tokens=["<|endoftext|>"])
    bpe.save(str(root / "tokenizer.json"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=bpe.get_vocab_size(), bos_token_id=0, eos_token_id=0, pad_token_id=0, **SHAPE)
    LlamaForCausalLM(config).save_pretrained(root)
    return root


def _fidelity(dense, small, ids: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    with torch.inference_mode():
        p = F.log_softmax(dense(input_ids=ids, attention_mask=mask).logits.double(), -1)
        q = F.log_softmax(small(input_ids=ids, attention_mask=mask).logits.double(), -1)
    keep = mask.bool()
    kl = (p.exp() * (p - q)).sum(-1)[keep].mean()
    agree = (p.argmax(-1) == q.argmax(-1))[keep].double().mean()
    return float(kl), float(agree)


def _interleaved(dense, small, ids: torch.Tensor, repeats: int) -> tuple[float, float]:
    """The minimum over ``repeats`` of each model's forward, the two alternating (a shared machine's load changes
    over seconds: timing one model's repeats after the other's would compare different loads)."""
    mask = torch.ones_like(ids)
    best = [float("inf"), float("inf")]
    with torch.inference_mode():
        for _ in range(repeats):
            for i, model in enumerate((dense, small)):
                best[i] = min(best[i], timeit(lambda m=model: m(input_ids=ids, attention_mask=mask), 1))
    return best[0], best[1]


def main() -> None:
    from transformers import AutoModelForCausalLM

    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--calibration", type=int, default=256)  # ~4,800 tokens: more than down_proj's 1536 inputs
    args = ap.parse_args()
    torch.set_num_threads(1)
    texts = stdlib_sentences()
    root = _folder(texts)
    train, test = texts[: args.calibration], texts[args.calibration : args.calibration + 128]
    kw = {"max_length": 128, "packing": None, "objective": "auto", "mask_fraction": 0.15, "seed": 0}
    dense = AutoModelForCausalLM.from_pretrained(root, attn_implementation="eager").eval()
    held = prepare_text_job(load_hf_folder(root, need_tokenizer=True), TextData(texts=test, labels=None), **kw)
    ids, mask = held.data.x_train[:, 0].long(), held.data.x_train[:, 1].long()
    bench_ids = torch.randint(1, dense.config.vocab_size, (8, 128), generator=torch.Generator().manual_seed(0))
    rows = []
    for structure in ("heads", "neurons"):
        for method in ("obc", "magnitude"):
            loaded = load_hf_folder(root, need_tokenizer=True)
            prep = prepare_text_job(loaded, TextData(texts=train, labels=None), **kw)
            spec = PruneSpec(
                method=method, sparsity=0.5, structure=structure, fisher={"samples": args.calibration}, device="cpu"
            )
            out = Path(tempfile.mkdtemp(prefix=f"llama-{structure}-"))
            result = execute(spec, prep.model, prep.data, out)
            zipfile.ZipFile(result.artifacts["hf_model"]).extractall(out / "hf")
            small = AutoModelForCausalLM.from_pretrained(out / "hf", attn_implementation="eager").eval()
            kl, agree = _fidelity(dense, small, ids, mask)
            report = result.report
            row = {
                "model": "random-init Llama 4×512, 8 heads / 4 KV, FFN 1536",
                "method": method,
                "structure": f"{structure} 50 %",
                "hf_config": report["structure"]["hf_config"],
                "params_dense": report["parameters"]["dense"],
                "params": report["parameters"]["total"],
                "kl_to_dense": kl,
                "top1_agreement": agree,
                "prune_seconds": report["phases"]["seconds"].get("obs"),
                "calibration_sentences": args.calibration,
                "calibration_tokens": int(prep.data.x_train[:, 1].sum()),  # (before the validation split)
            }
            if method == "obc":
                td, ts = _interleaved(dense, small, bench_ids, args.repeats)
                row["torch_ms_b8_s128"] = [1e3 * td, 1e3 * ts]
                row["torch_speedup"] = td / ts
            print(row, flush=True)
            rows.append(row)
    print(save("structured_llama", rows))


if __name__ == "__main__":
    main()
