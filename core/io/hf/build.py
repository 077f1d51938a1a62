"""A transformers model from a checked folder: ``from_config`` on the ``meta`` device, weights from safetensors only.

The architecture's size comes from ``config.json``: it is built on the ``meta`` device first (no memory), its
parameters counted against :class:`~core.io.limits.LoadLimits`, its tensor names and shapes compared with the
safetensors headers (a config whose sizes do not match the weights is a 422 listing the mismatches). Only then
is it built on the CPU and the weights loaded into it, strictly: every tensor of the model comes from the files,
except weights tied to another one (``lm_head.weight`` tied to the embeddings) and buffers the model computes.
The attention runs eagerly (``attn_implementation="eager"``), which ``torch.func.vmap`` can batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn

from core.errors import InvalidInput
from core.io.hf.files import HFFolder
from core.io.limits import LoadLimits, check_limit
from core.io.model_files import check_shapes_match, load_state_dict, read_safetensors_header

__all__ = ["HEADS", "BuiltModel", "build_model", "head_of"]

#: the heads we build, from the suffix of ``config.architectures[0]``
HEADS = {
    "ForSequenceClassification": "sequence_classification",
    "ForCausalLM": "causal_lm",
    "LMHeadModel": "causal_lm",
    "ForMaskedLM": "masked_lm",
    "Model": "base",
}


@dataclass
class BuiltModel:
    model: nn.Module
    head: str
    architecture: str
    model_type: str
    num_parameters: int


def head_of(config: dict) -> tuple[str, str]:
    """``(head, architecture)`` from ``config.architectures`` (a base model when it names none)."""
    archs = config.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise InvalidInput(
            "config.json: architectures must be a list of names",
            errors=[{"loc": ["config.json", "architectures"], "msg": "not a list of names", "type": "value_error"}],
        )
    if not archs:
        return "base", "AutoModel"
    arch = archs[0]
    for suffix, head in HEADS.items():
        if arch.endswith(suffix):
            return head, arch
    detail = (
        f"config.json names the architecture {arch!r}: the heads accepted are base models, masked LM, causal LM and "
        "sequence classification (…Model, …ForMaskedLM, …ForCausalLM / …LMHeadModel, …ForSequenceClassification)"
    )
    raise InvalidInput(detail, errors=[{"loc": ["config.json", "architectures"], "msg": detail, "type": "value_error"}])


def _auto_class(head: str):
    import transformers

    return {
        "base": transformers.AutoModel,
        "masked_lm": transformers.AutoModelForMaskedLM,
        "causal_lm": transformers.AutoModelForCausalLM,
        "sequence_classification": transformers.AutoModelForSequenceClassification,
    }[head]


def _config(folder: HFFolder):
    from transformers import AutoConfig

    cfg = dict(folder.config)
    model_type = cfg.pop("model_type")
    try:
        config = AutoConfig.for_model(model_type, **cfg)
    except (ValueError, TypeError, KeyError, AttributeError, ArithmeticError, StrictDataclassError) as e:
        raise InvalidInput(f"config.json cannot be read as a {model_type!r} config: {e}") from e
    config._attn_implementation = "eager"
    return config


def _from_config(head: str, config) -> nn.Module:
    try:
        return _auto_class(head).from_config(config, attn_implementation="eager")
    except (
        ValueError,
        TypeError,
        KeyError,
        AttributeError,
        RuntimeError,
        IndexError,
        ArithmeticError,  # e.g. num_attention_heads 0
        StrictDataclassError,  # transformers' configs are strict dataclasses: a field of the wrong type
    ) as e:
        raise InvalidInput(f"cannot build the model from config.json: {e}") from e


def _tied(model: nn.Module) -> set[str]:
    """State-dict names whose tensor is another one's (tied weights): they need not be in the files."""
    seen: dict[int, str] = {}
    tied: set[str] = set()
    for name, t in model.state_dict(keep_vars=True).items():
        key = id(t)
        if key in seen:
            tied.add(name)
        else:
            seen[key] = name
    return tied


def build_model(folder: HFFolder, limits: LoadLimits) -> BuiltModel:
    """The model of ``folder`` (checked by :func:`core.io.hf.files.read_folder`) with its weights, in eval mode."""
    head, arch = head_of(folder.config)
    config = _config(folder)
    with torch.device("meta"):
        shapes = _from_config(head, config)
    count = sum(p.numel() for p in shapes.parameters())
    check_limit(
        count,
        limits.max_parameters,
        what=f"the {config.model_type} model of config.json has",
        unit="parameters",
        setting="ARBORIST_MAX_MODEL_PARAMETERS",
        loc=["config.json"],
    )
    found: dict[str, tuple[int, ...]] = {}
    owner: dict[str, str] = {}
    for shard in folder.shards:
        header = read_safetensors_header(folder.root / shard)
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if name in found:
                raise InvalidInput(f"the tensor {name!r} is in two weight files ({owner[name]} and {shard})")
            found[name], owner[name] = tuple(entry["shape"]), shard
    expected = {k: tuple(v.shape) for k, v in shapes.state_dict().items()}
    computed = {n for n, _ in shapes.named_buffers()}  # e.g. position_ids: the files may or may not hold them
    tied = _tied(shapes)
    check_shapes_match(
        {k: v for k, v in expected.items() if k not in tied and (k not in computed or k in found)},
        {k: v for k, v in found.items() if k not in computed or k in expected},
    )
    model = _from_config(head, config)
    state: dict[str, torch.Tensor] = {}
    for shard in folder.shards:
        state.update(load_state_dict(folder.root / shard))
    state = {k: v for k, v in state.items() if k in expected}
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise InvalidInput(f"the weights cannot be loaded into {arch}: {e}") from e
    model.eval()
    return BuiltModel(
        model=model,
        head=head,
        architecture=type(model).__name__ if arch == "AutoModel" else arch,
        model_type=config.model_type,
        num_parameters=count,
    )
