"""The ``text`` part of the spec: how a text dataset is tokenized for a Hugging Face model, and the objective."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["TextSpec"]


class TextSpec(BaseModel):
    """``max_length``: tokens per example (longer texts are truncated, shorter ones padded to the longest);
    ``packing``: causal LMs only, concatenate the texts and cut ``max_length`` windows; ``objective``: ``auto`` picks
    it from the model's head and the data (core.io.hf.prepare); ``mask_fraction``: masked LM, the share of tokens
    masked (seeded by ``seed``)."""

    model_config = ConfigDict(extra="forbid")

    max_length: int = Field(128, ge=2, le=8192)
    packing: bool = False
    objective: Literal["auto", "classification", "causal_lm", "masked_lm", "distillation"] = "auto"
    mask_fraction: float = Field(0.15, gt=0.0, le=0.5, allow_inf_nan=False)
