"""One settings object for the API, the worker, Alembic and the CLI (env prefix ``ARBORIST_``, ``.env`` support)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, computed_field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

GiB = 1024**3
MiB = 1024**2

# Values that mark a secret nobody replaced; refused outside development.
PLACEHOLDERS = ("changethis", "changeme")


class TenantLimits(BaseModel):
    """One tenant's limits (``core.service.limits``); a field left out takes the settings' default (``None``
    there: no limit)."""

    model_config = ConfigDict(extra="forbid")

    running_jobs: int | None = Field(None, ge=1)
    queued_jobs: int | None = Field(None, ge=0)
    stored_bytes: int | None = Field(None, ge=0)
    requests_per_s: float | None = Field(None, gt=0)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ARBORIST_", env_file=".env", extra="ignore")

    environment: Literal["dev", "prod"] = "dev"
    api_title: str = "Arborist"

    database_url: str = "sqlite:///./data/arborist.db"
    artifact_root: str = Field("./data/artifacts", description="a local directory or any fsspec URL")
    broker_url: str | None = Field(None, description="Celery broker; None = embedded mode")
    queue_backend: Literal["celery", "embedded", "null"] | None = Field(
        None, description="how jobs reach workers (core.service.queue); default 'celery' with a broker, else 'embedded'"
    )
    data_allowed_roots: list[str] = Field(default_factory=lambda: ["./data/datasets"])

    # The API's connection pools. db_pool_size is also the number of requests that use the database at once (the
    # admission gate, below): connections beyond it (the overflow) are closed when returned, so the gated requests
    # never need them (at 8 concurrent status polls with SQLAlchemy's default of 5, one poll in ten opened a new
    # PostgreSQL connection); the overflow is left to what is not gated (an upload's insert, /metrics). Status
    # polls have a pool of their own (one short query each, no ping), with the same overflow. Per API process,
    # db_pool_size + db_read_pool_size + 2 × db_max_overflow must fit PostgreSQL's max_connections (defaults: 50
    # of 100).
    db_pool_size: int = Field(20, ge=1, description="connections the API keeps open for reuse (opened on demand)")
    db_read_pool_size: int = Field(10, ge=1, description="connections kept open for status polls (PostgreSQL)")
    db_max_overflow: int = Field(10, ge=0, description="extra connections each pool may open at peaks")
    # Admission control (api/admission.py): at most db_pool_size requests use the database at once (status polls:
    # db_read_pool_size), the others wait on the event loop, holding no thread and no connection. One that waits
    # longer than this is answered 503 + Retry-After; it is also the pools' checkout timeout (SQLAlchemy's default,
    # 30 s, kept a saturated API silent for that long).
    db_wait_timeout_s: float = Field(
        2.0, gt=0, le=60, description="seconds a request waits for a database connection before a 503"
    )

    max_upload_bytes: int = Field(2 * GiB, gt=0)
    max_json_bytes: int = Field(1 * MiB, gt=0)
    # What an uploaded file may become once loaded (a few KB can describe gigabytes): checked before anything is
    # allocated (core.io.limits), and the validation child's memory as the last line (api.isolation).
    max_model_parameters: int = Field(
        2**28, gt=0, description="parameters of an uploaded model (an architecture is counted before it is built)"
    )
    max_constant_elements: int = Field(
        2**27, gt=0, description="elements an ONNX graph's constants may expand to when it is imported (folding)"
    )
    max_archive_files: int = Field(1000, gt=0, description="entries of an uploaded model archive (.zip / .tar.gz)")
    max_archive_bytes: int = Field(
        8 * GiB, gt=0, description="bytes the entries of an uploaded model archive declare once extracted"
    )
    validation_memory_mb: int = Field(
        4096, ge=64, description="memory (MiB) a validation process may allocate, plus 4 bytes per byte of the file"
    )
    memory_budget_mb: float | None = Field(
        None, gt=0, description="MiB a job's memory plan may take, for every job (the lower of it and the spec's)"
    )
    latency_budget_s: float = Field(
        1.0, ge=0, le=600, description="seconds a job spends measuring dense vs pruned latency (0 = off)"
    )
    latency_batch_sizes: list[PositiveInt] = Field(
        [1, 32], min_length=1, description="batches the latency is measured at"
    )
    heartbeat_timeout_s: float = Field(300.0, gt=0)
    # Worker (see worker/): a job's time limit, how often the reaper looks for dead workers, and how many
    # attempts a job gets before the reaper gives up on it.
    job_time_limit_s: float = Field(24 * 3600.0, gt=0, description="a job is stopped (failed) after this long")
    reaper_interval_s: float = Field(30.0, gt=0, description="seconds between reaper sweeps")
    max_attempts: int = Field(3, ge=1, description="worker losses tolerated per job before it fails")
    # Jobs are batch work: on a host they share with the API, they take the CPU the API leaves (a status poll
    # waits on its CPU share, not on the job). Linux niceness 0-19; 0 leaves jobs at the API's priority.
    job_nice: int = Field(10, ge=0, le=19, description="CPU niceness of job processes (0 = the API's priority)")

    # Tenant limits (core/service/limits.py): these defaults apply to every tenant (None = no limit), and
    # ``tenant_limits`` overrides them per tenant name, e.g. '{"acme": {"queued_jobs": 50, "running_jobs": 4}}'.
    tenant_running_jobs: int | None = Field(None, ge=1, description="a tenant's jobs running at once")
    tenant_queued_jobs: int | None = Field(None, ge=0, description="a tenant's jobs waiting (beyond: 429)")
    tenant_stored_bytes: int | None = Field(None, ge=0, description="a tenant's uploads and outputs (beyond: 429)")
    tenant_requests_per_s: float | None = Field(None, gt=0, description="requests per second per API key")
    tenant_limits: dict[str, TenantLimits] = Field(default_factory=dict, description="per-tenant overrides")

    sse_poll_interval_s: float = Field(0.5, gt=0, le=30)
    sse_max_seconds: float = Field(900.0, gt=0, description="one events stream is closed after this long")
    auto_migrate: bool = Field(False, description="run `alembic upgrade head` when the app starts")
    # Files a killed process never finished (a staged upload, a temporary file, an input file whose row was never
    # inserted) are deleted when the API starts and then every this many seconds, once they are this old: longer
    # than any upload's validation, so nothing another API process is still writing is touched.
    staging_grace_s: float = Field(3600.0, gt=0, description="age at which unfinished files are swept")

    @field_validator("database_url")
    @classmethod
    def _normalise_driver(cls, v: str) -> str:
        for prefix in ("postgres://", "postgresql://"):
            if v.startswith(prefix):
                return "postgresql+psycopg://" + v[len(prefix) :]
        return v

    @model_validator(mode="after")
    def _no_placeholder_secrets(self) -> Settings:
        if self.environment != "dev":
            for name in ("database_url", "broker_url"):
                value = getattr(self, name) or ""
                if any(p in value.lower() for p in PLACEHOLDERS):
                    raise ValueError(f"{name} holds a placeholder secret; set a real one outside dev")
        return self

    @computed_field  # type: ignore[prop-decorator]
    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def queue_name(self) -> Literal["celery", "embedded", "null"]:
        if self.queue_backend:
            return self.queue_backend
        return "celery" if self.broker_url else "embedded"

    # --- passing settings to a child process ----------------------------------------------------------------

    def as_payload(self) -> dict[str, Any]:
        """The fields as JSON values (the computed ones left out): ``from_payload`` rebuilds these settings."""
        return self.model_dump(mode="json", exclude=set(type(self).model_computed_fields))

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> Settings:
        """The settings ``as_payload`` gave, whatever this process's environment and ``.env`` say."""
        return cls(_env_file=None, **payload)

    def to_env(self) -> dict[str, str]:
        """The fields as ``ARBORIST_*`` environment variables, for a child process that reads its own Settings."""
        return env_vars(self.as_payload())


def env_vars(values: Mapping[str, Any]) -> dict[str, str]:
    """Settings values by field name as ``ARBORIST_*`` environment variables: lists and dicts as JSON, ``None``
    left unset (the field's default)."""
    return {
        f"ARBORIST_{name.upper()}": json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        for name, value in values.items()
        if value is not None
    }


@lru_cache
def get_settings() -> Settings:
    return Settings()
