"""Job creation racing the deletion of its model or dataset, over HTTP, on SQLite and PostgreSQL.

Each round seeds a model and a dataset, then lets several clients create jobs for them while another deletes one
of the two, all released at once. Whoever wins, no job may be left that refers to an input that is gone: either
the deletion is refused (409, a job uses the input) or the creations are (422/409, the input is unknown).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import httpx
import pytest
from sqlalchemy import select

from core.service.db.tables import Dataset, Job, Model

ROUNDS = 12
CREATORS = 6


def _race(server, key: str, model_id: str, dataset_id: str, victim: str) -> tuple[list[httpx.Response], httpx.Response]:
    """``CREATORS`` job creations and one deletion of ``victim`` (``models`` or ``datasets``), released together."""
    barrier = threading.Barrier(CREATORS + 1)
    created: list[httpx.Response] = []
    deleted: list[httpx.Response] = []
    lock = threading.Lock()
    body = {"model_id": model_id, "dataset_id": dataset_id, "spec": {"sparsity": 0.5}}
    victim_id = model_id if victim == "models" else dataset_id

    def call(send: Callable[[httpx.Client], httpx.Response], out: list[httpx.Response]) -> None:
        with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
            barrier.wait()
            resp = send(c)
        with lock:
            out.append(resp)

    threads = []
    for _ in range(CREATORS):
        threads.append(threading.Thread(target=call, args=(lambda c: c.post("/v1/jobs", json=body), created)))
    threads.append(threading.Thread(target=call, args=(lambda c: c.delete(f"/v1/{victim}/{victim_id}"), deleted)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return created, deleted[0]


@pytest.mark.parametrize("victim", ["models", "datasets"])
def test_job_creation_racing_input_deletion_leaves_no_orphan_job(server, account, seed, victim):
    outcomes: dict[str, int] = {}
    for _ in range(ROUNDS):
        model_id, dataset_id = seed()
        created, deleted = _race(server, account.key, model_id, dataset_id, victim)
        assert deleted.status_code in (204, 409), deleted.text
        for resp in created:
            assert resp.status_code in (202, 409, 422), resp.text  # never a 500
        accepted = [r.json()["id"] for r in created if r.status_code == 202]
        outcomes[f"delete {deleted.status_code}"] = outcomes.get(f"delete {deleted.status_code}", 0) + 1
        if deleted.status_code == 204:
            assert not accepted, f"{len(accepted)} job(s) accepted for a deleted {victim[:-1]}"
        else:
            assert accepted, "the deletion was refused, so a job must have been created"
        with server.session() as s:
            jobs = s.scalars(select(Job).where(Job.tenant_id == account.tenant.id)).all()
            models = set(s.scalars(select(Model.id).where(Model.tenant_id == account.tenant.id)))
            datasets = set(s.scalars(select(Dataset.id).where(Dataset.tenant_id == account.tenant.id)))
        orphans = [(j.id, j.state.value) for j in jobs if j.model_id not in models or j.dataset_id not in datasets]
        assert not orphans, f"jobs whose model or dataset is gone: {orphans}"
    print(f"{server.db}: {outcomes}")
