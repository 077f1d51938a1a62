"""Run checkpoints in the artifact store, under ``checkpoints/<job id>/``, so that any worker can resume a job.

Every store, a local directory or object storage, is written through the store's public API only
(``put_file``, ``get_file``, ``open``, ``delete``): a worker on another host resumes from what it reads there.
Each generation is a safetensors file ``state-<n>.safetensors`` (each ``put`` atomic itself), committed by
``latest.json`` written last, which names it: a reader sees the previous complete checkpoint or the new one,
never half of one. The generation number comes from the store's ``latest.json``, never from local state.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file
from torch import Tensor

from core.io.model_files import save_state_dict
from core.runs.checkpoint import Checkpointer
from core.runs.numerics import json_bytes
from core.service.artifacts import ArtifactStore


class StoreCheckpointer:
    """Checkpoints in an artifact store; ``scratch`` is a local directory for the file being written or read."""

    def __init__(self, store: ArtifactStore, prefix: str, scratch: Path):
        self.store, self.prefix, self.scratch = store, prefix, Path(scratch)

    def save(self, tensors: dict[str, Tensor], meta: dict) -> None:
        previous = self._remote_latest()
        generation = int((previous or {}).get("generation", 0)) + 1
        name = f"state-{generation}.safetensors"
        self.scratch.mkdir(parents=True, exist_ok=True)
        local = save_state_dict(tensors, self.scratch / name)
        tensors_key = f"{self.prefix}/{name}"
        try:
            self.store.put_file(tensors_key, local)
        finally:
            local.unlink(missing_ok=True)
        latest = {"generation": generation, "tensors": name, "meta": meta}
        try:
            self.store.put_stream(f"{self.prefix}/latest.json", [json_bytes(latest)])
        except BaseException:
            self.store.delete(tensors_key)  # not committed: no orphan beside the previous checkpoint
            raise
        if previous and previous["tensors"] != name:
            self.store.delete(f"{self.prefix}/{previous['tensors']}")

    def _remote_latest(self) -> dict | None:
        try:
            with self.store.open(f"{self.prefix}/latest.json") as fh:
                return json.loads(fh.read())
        except FileNotFoundError:
            return None

    def load(self) -> tuple[dict[str, Tensor], dict] | None:
        latest = self._remote_latest()
        if latest is None:
            return None
        self.scratch.mkdir(parents=True, exist_ok=True)
        local = self.scratch / latest["tensors"]
        self.store.get_file(f"{self.prefix}/{latest['tensors']}", local)
        try:
            return load_file(local), latest["meta"]
        finally:
            local.unlink(missing_ok=True)


def checkpoint_prefix(job_id: str) -> str:
    return f"checkpoints/{job_id}"


def checkpointer_for(store: ArtifactStore, job_id: str, scratch: Path) -> Checkpointer:
    """The job's checkpointer; ``scratch`` is a local directory it may use for the file in transit."""
    return StoreCheckpointer(store, checkpoint_prefix(job_id), scratch / "checkpoint")


def delete_checkpoint(store: ArtifactStore, job_id: str) -> None:
    store.delete_tree(checkpoint_prefix(job_id))
