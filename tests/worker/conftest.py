"""Worker tests without a broker: a migrated SQLite database, a local artifact store with a digits MLP and the
digits data in it, and a factory for queued jobs."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sqlalchemy.orm import Session, sessionmaker

from _pg import fresh_schema, schema_url
from core.io.data import builtin_dataset
from core.io.model_files import save_state_dict
from core.io.zoo import build_model
from core.runs.spec import PruneSpec
from core.service.artifacts import ArtifactStore
from core.service.db import inputs, jobs, migrate, outputs, tenants
from core.service.db.base import make_engine, make_sessionmaker
from core.service.db.tables import Job, Model, Tenant
from core.service.settings import Settings

MLP_KWARGS = {"in_features": 64, "hidden": [32], "num_classes": 10}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny models on shared, busy cores: a second intra-op thread only adds contention (often 5-10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits_blobs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("worker-digits")
    data = builtin_dataset("digits")
    torch.manual_seed(0)
    model = build_model("mlp", **MLP_KWARGS)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        for i in range(0, len(data.x_train), 64):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(data.x_train[i : i + 64]), data.y_train[i : i + 64])
            loss.backward()
            opt.step()
    model_path = save_state_dict(model.state_dict(), directory / "m.safetensors")
    data_path = directory / "d.npz"
    np.savez(data_path, x=data.x_train.numpy(), y=data.y_train.numpy())
    return model_path, data_path


@dataclass
class World:
    settings: Settings
    sessions: sessionmaker[Session]
    store: ArtifactStore
    tenant: Tenant
    model_id: str
    dataset_id: str

    def job(self, spec: dict[str, Any] | None = None, **model_overrides: Any) -> str:
        spec = spec or {
            "sparsity": 0.8,
            "fisher": {"samples": 64, "lambda": 1e-3},
            "finetune": {"epochs": 2},
            "device": "cpu",
        }
        spec_json = PruneSpec.model_validate(spec).model_dump(mode="json", by_alias=True)
        model_id = self.model_id
        if model_overrides:
            with self.sessions() as s:
                base = inputs.get(Model, session=s, tenant=self.tenant, id=self.model_id)
                model_id = inputs.create_model(
                    session=s,
                    tenant=self.tenant,
                    name="m2",
                    format=base.format,
                    size=base.size,
                    sha256=base.sha256,
                    path=base.path,
                    arch=base.arch,
                    arch_kwargs=model_overrides.get("arch_kwargs", base.arch_kwargs),
                ).id
        with self.sessions() as s:
            job, _ = jobs.create(
                session=s, tenant=self.tenant, model_id=model_id, dataset_id=self.dataset_id, spec=spec_json
            )
            return job.id

    def get(self, job_id: str) -> Job:
        with self.sessions() as s:
            return jobs.get(session=s, tenant=self.tenant, job_id=job_id)

    def events(self, job_id: str) -> list[tuple[str, dict]]:
        with self.sessions() as s:
            return [(e.type, e.data or {}) for e in outputs.list_events(session=s, job_id=job_id, limit=10_000)]


@pytest.fixture
def world_factory(tmp_path: Path, digits_blobs: tuple[Path, Path]) -> Iterator[Callable[..., World]]:
    engines = []

    def make(database_url: str | None = None, **settings: Any) -> World:
        url = database_url or f"sqlite:///{tmp_path / f'w-{uuid.uuid4().hex[:6]}.db'}"
        migrate.upgrade(url)
        s = Settings(
            _env_file=None,
            database_url=url,
            artifact_root=str(tmp_path / "artifacts"),
            **{"heartbeat_timeout_s": 30.0, "job_nice": 0, **settings},
        )  # jobs run in this process
        engine = make_engine(url)
        engines.append(engine)
        sessions = make_sessionmaker(engine)
        store = ArtifactStore(s.artifact_root)
        model_path, data_path = digits_blobs
        msize, msha = store.put_file("models/t/m.safetensors", model_path)
        dsize, dsha = store.put_file("datasets/t/d.npz", data_path)
        with sessions() as session:
            tenant = tenants.get_or_create_tenant(session=session, name=f"t-{uuid.uuid4().hex[:6]}")
            model = inputs.create_model(
                session=session,
                tenant=tenant,
                name="m",
                format="safetensors",
                size=msize,
                sha256=msha,
                path="models/t/m.safetensors",
                arch="mlp",
                arch_kwargs=MLP_KWARGS,
            )
            ds = inputs.create_dataset(
                session=session, tenant=tenant, name="d", format="npz", size=dsize, path="datasets/t/d.npz", sha256=dsha
            )
        return World(s, sessions, store, tenant, model.id, ds.id)

    yield make
    for engine in engines:
        engine.dispose()


@pytest.fixture
def world(world_factory: Callable[..., World]) -> World:
    return world_factory()


@pytest.fixture(scope="session")
def pg_schema_url() -> Iterator[Callable[[str, int], str]]:
    """A fresh PostgreSQL schema; yields ``url(host, port)`` so a test can route through a proxy."""
    with fresh_schema("arb_worker") as schema:
        yield lambda host=None, port=None: schema_url(schema, host, port)
