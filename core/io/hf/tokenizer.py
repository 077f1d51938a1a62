"""The model's own tokenizer, from ``tokenizer.json``, or without one from ``vocab.txt`` (BERT's WordPiece) or
``vocab.json`` + ``merges.txt`` (GPT-2's byte-level BPE): never a pickle, never a sentencepiece ``.model``.

``tokenizers`` parses these files in Rust; nothing here runs code from the folder. The files-only tokenizers are
built the way transformers' fast tokenizers convert them: WordPiece with BERT's normaliser (``do_lower_case`` from
``tokenizer_config.json``, default true) and ``[CLS] … [SEP]``; byte-level BPE with GPT-2's pre-tokenizer
(``add_prefix_space`` from ``tokenizer_config.json``, default false) and no special tokens added.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from core.errors import InvalidInput
from core.io.hf.files import HFFolder

__all__ = ["TextTokenizer", "load_tokenizer"]


@dataclass
class TextTokenizer:
    """A ``tokenizers.Tokenizer`` and the ids the objectives need."""

    tokenizer: object
    pad_id: int
    mask_id: int | None
    eos_id: int | None

    def encode(self, texts: list[str], max_length: int, *, special: bool = True) -> list[object]:
        tok = self.tokenizer
        tok.no_padding()
        tok.enable_truncation(max_length=max_length)
        return tok.encode_batch(texts, add_special_tokens=special)


def _special(tok, names: list[str]) -> int | None:
    for name in names:
        i = tok.token_to_id(name)
        if i is not None:
            return int(i)
    return None


def _from_config(folder: HFFolder, key: str) -> str | None:
    if "tokenizer_config.json" not in folder.files:
        return None
    try:
        value = json.loads((folder.root / "tokenizer_config.json").read_text("utf-8")).get(key)
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _flag(folder: HFFolder, key: str, default: bool) -> bool:
    """A boolean of ``tokenizer_config.json`` (else config.json), ``default`` when neither holds one."""
    if "tokenizer_config.json" in folder.files:
        try:
            value = json.loads((folder.root / "tokenizer_config.json").read_text("utf-8")).get(key)
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            value = None
        if isinstance(value, bool):
            return value
    value = folder.config.get(key)
    return value if isinstance(value, bool) else default


def load_tokenizer(folder: HFFolder) -> TextTokenizer:
    """The folder's tokenizer; a folder without one, or a file ``tokenizers`` cannot read, is a 422."""
    from tokenizers import Tokenizer
    from tokenizers.implementations import BertWordPieceTokenizer, ByteLevelBPETokenizer

    if folder.tokenizer is None:
        raise InvalidInput(
            "the model folder has no tokenizer (tokenizer.json, vocab.txt, or vocab.json with merges.txt): text cannot "
            "be tokenized",
            errors=[{"loc": ["file", "tokenizer.json"], "msg": "missing", "type": "missing"}],
        )
    path = str(folder.root / folder.tokenizer)
    try:
        if folder.tokenizer == "tokenizer.json":
            tok = Tokenizer.from_file(path)
        elif folder.tokenizer == "vocab.txt":
            lower = _flag(folder, "do_lower_case", True)
            tok = BertWordPieceTokenizer(path, lowercase=lower)._tokenizer
        elif folder.tokenizer == "vocab.json" and "merges.txt" in folder.files:
            prefix = _flag(folder, "add_prefix_space", False)
            bpe = ByteLevelBPETokenizer(path, str(folder.root / "merges.txt"), add_prefix_space=prefix)
            tok = bpe._tokenizer  # its post-processor adds no special tokens, as GPT-2's does not
        else:
            need = "vocab.json and merges.txt" if folder.tokenizer in ("vocab.json", "merges.txt") else "tokenizer.json"
            raise InvalidInput(
                f"{folder.tokenizer} alone is not a tokenizer: a byte-level BPE needs {need} (or add tokenizer.json)",
                errors=[{"loc": ["file", folder.tokenizer], "msg": f"needs {need}", "type": "value_error"}],
            )
    except InvalidInput:
        raise
    except Exception as e:  # tokenizers raises plain Exceptions for malformed files
        raise InvalidInput(
            f"{folder.tokenizer} cannot be read by tokenizers: {e}",
            errors=[{"loc": ["file", folder.tokenizer], "msg": str(e)[:300], "type": "value_error"}],
        ) from e
    pad_name = _from_config(folder, "pad_token")
    eos_name = _from_config(folder, "eos_token")
    pad = _special(tok, [n for n in (pad_name, "[PAD]", "<pad>") if n])
    eos = _special(tok, [n for n in (eos_name, "</s>", "<|endoftext|>", "[SEP]") if n])
    cfg_pad = folder.config.get("pad_token_id")
    if pad is None:
        pad = cfg_pad if isinstance(cfg_pad, int) else (eos if eos is not None else 0)
    mask = _special(tok, [n for n in (_from_config(folder, "mask_token"), "[MASK]", "<mask>") if n])
    return TextTokenizer(tokenizer=tok, pad_id=int(pad), mask_id=mask, eos_id=eos)
