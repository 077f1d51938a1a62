"""Run checkpoints in the artifact store, under ``checkpoints/<job id>/``, so that any worker can resume a job.

A local store holds a ``DirectoryCheckpointer``'s files in place; a remote one gets them mirrored from a local
scratch directory (``StoreCheckpointer``).
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

from core.runs.checkpoint import Checkpointer, DirectoryCheckpointer
from core.service.artifacts import ArtifactStore


class StoreCheckpointer:
    """A ``DirectoryCheckpointer`` in a local scratch directory, mirrored to a remote artifact store after each
    save (tensors first, ``latest.json`` last: the commit point) and fetched from it on load."""

    def __init__(self, store: ArtifactStore, prefix: str, scratch: Path):
        self.store, self.prefix, self.scratch = store, prefix, Path(scratch)
        self.local = DirectoryCheckpointer(self.scratch)

    def save(self, tensors: dict[str, Tensor], meta: dict) -> None:
        previous = self._remote_latest()
        self.local.save(tensors, meta)
        latest = json.loads((self.scratch / "latest.json").read_text())
        tensors_key = f"{self.prefix}/{latest['tensors']}"
        self.store.put_file(tensors_key, self.scratch / latest["tensors"])
        try:
            self.store.put_file(f"{self.prefix}/latest.json", self.scratch / "latest.json")
        except BaseException:
            if not previous or previous["tensors"] != latest["tensors"]:
                self.store.delete(tensors_key)  # not committed: no orphan beside the previous checkpoint
            raise
        if previous and previous["tensors"] != latest["tensors"]:
            self.store.delete(f"{self.prefix}/{previous['tensors']}")

    def _remote_latest(self) -> dict | None:
        key = f"{self.prefix}/latest.json"
        if not self.store.exists(key):
            return None
        with self.store.open(key) as fh:
            return json.loads(fh.read())

    def load(self) -> tuple[dict[str, Tensor], dict] | None:
        latest = self._remote_latest()
        if latest is None:
            return None
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.store.get_file(f"{self.prefix}/{latest['tensors']}", self.scratch / latest["tensors"])
        (self.scratch / "latest.json").write_text(json.dumps(latest))
        return self.local.load()


def checkpoint_prefix(job_id: str) -> str:
    return f"checkpoints/{job_id}"


def checkpointer_for(store: ArtifactStore, job_id: str, scratch: Path) -> Checkpointer:
    """The job's checkpointer; ``scratch`` is a local directory it may use (a remote store's local copy)."""
    local = store.local_path(f"{checkpoint_prefix(job_id)}/latest.json")
    if local is not None:
        return DirectoryCheckpointer(local.parent)
    return StoreCheckpointer(store, checkpoint_prefix(job_id), scratch / "checkpoint")


def delete_checkpoint(store: ArtifactStore, job_id: str) -> None:
    store.delete_tree(checkpoint_prefix(job_id))
