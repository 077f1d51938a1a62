"""Run checkpoints: tensors in safetensors, the rest in JSON, committed by an atomic rename.

``latest.json`` is written last and names the generation's tensor file, so a reader sees either
the previous complete checkpoint or the new one — never half of one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file
from torch import Tensor

from core.io.files import atomic_write
from core.io.model_files import save_state_dict
from core.runs.numerics import json_bytes


class Checkpointer(Protocol):
    def save(self, tensors: dict[str, Tensor], meta: dict) -> None: ...

    def load(self) -> tuple[dict[str, Tensor], dict] | None: ...


class DirectoryCheckpointer:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def save(self, tensors: dict[str, Tensor], meta: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        previous = self._latest()
        generation = (previous or {}).get("generation", 0) + 1
        name = f"state-{generation}.safetensors"
        save_state_dict(tensors, self.root / name)  # atomic itself: complete, or no file at all
        try:
            latest = {"generation": generation, "tensors": name, "meta": meta}
            atomic_write(self.root / "latest.json", json_bytes(latest))  # strict JSON; on failure: as it was
        except BaseException:
            # Not committed: the previous generation stays the latest; its successor must not linger.
            (self.root / name).unlink(missing_ok=True)
            raise
        if previous:
            (self.root / previous["tensors"]).unlink(missing_ok=True)

    def _latest(self) -> dict | None:
        path = self.root / "latest.json"
        return json.loads(path.read_text()) if path.exists() else None

    def load(self) -> tuple[dict[str, Tensor], dict] | None:
        latest = self._latest()
        if latest is None:
            return None
        return load_file(self.root / latest["tensors"]), latest["meta"]


def optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    """Split an optimizer state dict into tensors and JSON."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"opt.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
