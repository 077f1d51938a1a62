"""What the pruned model's folder is rebuilt from (kept in memory: the upload's folder is gone by then)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["HFSource"]


@dataclass
class HFSource:
    """What the pruned model's folder is rebuilt from: the upload's small files (config, tokenizer, sentence-
    transformers files) as bytes, and which tensor names each weight file held."""

    files: dict[str, bytes]
    shards: dict[str, list[str]]
    index: str | None = None
    model_type: str = ""
    head: str = "base"
    pooling: str | None = None
    details: dict = field(default_factory=dict)
