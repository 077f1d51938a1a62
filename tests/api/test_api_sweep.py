"""What killed processes leave in the artifact store is swept when the API starts (``api.housekeeping``).

A server killed mid-upload left a 104 MB ``.tmp-`` file; one killed while validating left a 208 MB staged file with
no row; nothing ever deleted them. Planted here as such a kill leaves them, with their ages set, in the store of
an API that then starts (a real uvicorn on SQLite and PostgreSQL): the old leftovers go, and nothing else does,
neither what is younger than the grace period (another process may still be writing or validating it) nor any
file that a row refers to or that is not a leftover at all.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn

from _net import free_port
from api.main import create_app
from core.service.artifacts import ArtifactStore
from core.service.db import inputs
from core.service.settings import Settings

GRACE_S = 600.0
HEX = "0123456789abcdef" * 2


@contextmanager
def running(settings: Settings) -> Iterator[None]:
    """The API on ``settings`` under a real uvicorn, started (lifespan included) and stopped."""
    app = create_app(settings.model_copy(update={"queue_backend": "null"}))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield
    finally:
        srv.should_exit = True
        thread.join(10)


def _plant(root: Path, key: str, age_s: float, size: int = 1000) -> Path:
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_startup_sweeps_old_leftovers_and_nothing_else(server, account, tmp_path):
    root = tmp_path / "artifacts"
    t = account.tenant.id
    with server.session() as s:  # an input file with a row: never swept, however old
        kept_model = inputs.create_model(
            session=s, tenant=account.tenant, name="m", format="onnx", size=1, sha256="0" * 64,
            path=f"models/{t}/mdl_{HEX[:28]}.onnx",
        ).path  # fmt: skip
    old, young = GRACE_S * 2, GRACE_S / 2
    swept = [
        f"staging/{t}/{HEX}.npz",  # staged, never registered
        f"staging/{t}/{HEX}.safetensors.tmp-{HEX}",  # an upload cut short
        f"jobs/job_{HEX[:28]}/pruned.safetensors.tmp-{HEX}",  # an artifact cut short
        f"checkpoints/job_{HEX[:28]}/.latest.json.ab_cd123.tmp",  # an atomic write cut short (core.io.files)
        f"datasets/{t}/ds_{HEX[:28]}.npz",  # moved into place, its row never inserted
    ]
    kept = [
        kept_model,
        f"staging/{t}/{HEX[:30]}.npz",  # young: maybe still being validated
        f"models/{t}/mdl_{HEX[1:29]}.safetensors.tmp-{HEX}",  # young: maybe still being written
        f"datasets/{t}/ds_{HEX[1:29]}.npz",  # young: maybe its row is being inserted
        f"jobs/job_{HEX[:28]}/report.json",  # a job's artifact: not an input, not a leftover
        f"checkpoints/job_{HEX[:28]}/latest.json",
        f"checkpoints/job_{HEX[:28]}/notes.tmp",  # "tmp" in a name does not make a leftover
    ]
    ages = {**dict.fromkeys(swept, old), **dict.fromkeys(kept, old)}
    ages.update(dict.fromkeys(kept[1:4], young))
    for key, age in ages.items():
        _plant(root, key, age)

    settings = server.settings.model_copy(update={"artifact_root": str(root), "staging_grace_s": GRACE_S})
    with running(settings):
        deadline = time.monotonic() + 20
        while any((root / k).exists() for k in swept) and time.monotonic() < deadline:
            time.sleep(0.1)
    assert [k for k in swept if (root / k).exists()] == []
    assert [k for k in kept if not (root / k).exists()] == []


def test_sweep_without_a_database_keeps_input_files(tmp_path):
    """A sweep that cannot tell whether an input file is referenced keeps it (the store alone: no ``orphaned``)."""
    store = ArtifactStore(str(tmp_path))
    staged = _plant(tmp_path, "staging/t/abc.npz", 10, size=4096)
    model = _plant(tmp_path, "models/t/mdl.onnx", 10)
    swept = store.sweep(5)
    assert swept.keys == ["staging/t/abc.npz"] and swept.bytes == 4096
    assert not staged.exists() and model.exists()
