"""Public schema family per entity: ``*Create`` bodies in, ``*Public``/``*sPublic`` out.

Stored-only columns (paths, hashes of keys, idempotency data, task ids) never appear in a response.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Generic, Literal, Self, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, Field, computed_field

from core.runs.spec import PruneSpec
from core.service.db.tables import JobState
from core.service.names import MAX_NAME_LENGTH, NAME_PATTERN

T = TypeVar("T")


class Public(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    @classmethod
    def of(cls, row: Any) -> Self:
        """The public view of a stored row."""
        return cls.model_validate(row)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Problem(BaseModel):
    """RFC 9457 problem details (``application/problem+json``)."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(..., examples=["https://arborist.dev/problems/not-found"])
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    errors: list[dict[str, Any]] | None = Field(None, description="field errors: loc, msg, type")


class Page(BaseModel, Generic[T]):
    data: list[T]
    count: int = Field(..., description="total rows matching the filter")
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next page; null on the last")

    @classmethod
    def of(cls, rows: Any) -> Self:
        """A page of stored rows (``core.service.db.rows.Page``) in their public view."""
        item = get_args(cls.model_fields["data"].annotation)[0]
        return cls(data=[item.of(row) for row in rows.items], count=rows.count, next_cursor=rows.next_cursor)


# --- models -------------------------------------------------------------------------------------------------


class ModelPublic(Public):
    id: str
    name: str
    format: str
    arch: str | None
    arch_kwargs: dict[str, Any] | None
    size: int
    sha256: str
    num_parameters: int | None
    created_at: datetime
    tensor_names: dict[str, str] | None = Field(
        None,
        description="in the upload's response: how the file's tensor names (a plain nn.Sequential's, 0.weight …) "
        "were matched by order and shape to the architecture's (layers.1.weight …); null when they were its own",
    )


class ModelsPublic(Page[ModelPublic]):
    pass


class ModelRegister(_Body):
    """Registers a Hugging Face model folder (or its .zip / .tar.gz) under one of the server's allowed roots."""

    uri: str = Field(..., min_length=1, max_length=2048, examples=["file:///data/models/all-MiniLM-L6-v2"])
    name: str | None = Field(None, min_length=1, max_length=MAX_NAME_LENGTH, pattern=NAME_PATTERN)


# --- datasets -----------------------------------------------------------------------------------------------


class DatasetRegister(_Body):
    """Registers a dataset already stored under one of the server's allowed roots."""

    uri: str = Field(..., min_length=1, max_length=2048, examples=["file:///data/datasets/mnist.npz"])
    name: str | None = Field(None, min_length=1, max_length=MAX_NAME_LENGTH, pattern=NAME_PATTERN)
    format: Literal["npz", "safetensors", "parquet", "jsonl", "txt", "text_parquet"] | None = None


class DatasetPublic(Public):
    id: str
    name: str
    format: str
    source: Literal["upload", "uri"]
    uri: str | None
    size: int
    sha256: str | None
    num_examples: int | None
    input_shape: list[int] | None
    num_classes: int | None
    has_val: bool
    created_at: datetime

    @classmethod
    def of(cls, row: Any) -> Self:
        """The public view of a stored row: ``source`` says whether it was uploaded or registered by URI."""
        return cls.model_validate(
            {
                **{k: getattr(row, k) for k in cls.model_fields if k != "source"},
                "source": "uri" if row.uri else "upload",
            }
        )


class DatasetsPublic(Page[DatasetPublic]):
    pass


# --- jobs ---------------------------------------------------------------------------------------------------


class JobCreate(_Body):
    model_id: str = Field(..., min_length=1, max_length=64)
    dataset_id: str = Field(..., min_length=1, max_length=64)
    spec: PruneSpec
    priority: int = Field(
        0, ge=-100, le=100, description="within the tenant, higher starts first (between tenants: turns)"
    )


class JobPublic(Public):
    id: str
    model_id: str | None
    dataset_id: str | None
    spec: dict[str, Any]
    queue: str
    priority: int = 0
    state: JobState
    progress: float
    step: int | None
    sparsity: float | None
    message: str | None
    error: dict[str, Any] | None = Field(None, description="an RFC 9457 problem when the job failed")
    result: dict[str, Any] | None
    attempts: int
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    queue_position: int | None = Field(
        None,
        description="while queued: 1 + the queued jobs of the same queue created before it, of every tenant (an "
        "upper bound: tenants take turns, so a job may start before older jobs of a tenant with many queued)",
    )

    def _seconds(self, start: datetime, end: datetime | None) -> float:
        return round(max(((end or datetime.now(UTC)) - start).total_seconds(), 0.0), 3)

    @computed_field(description="seconds from creation until it started (until now while queued)")
    @property
    def queued_seconds(self) -> float:
        started = self.started_at if self.state is not JobState.QUEUED else None  # a requeued job waits again
        return self._seconds(self.created_at, started or self.finished_at)

    @computed_field(
        description="seconds from its (latest) start until it finished (until now while running); null if never started"
    )
    @property
    def running_seconds(self) -> float | None:
        if self.started_at is None or self.state is JobState.QUEUED:
            return None
        return self._seconds(self.started_at, self.finished_at)

    @computed_field(
        description="what the worker is doing now, while the job runs (e.g. 'pruning to 80.0%', "
        "'fine-tuning epoch 2/3', 'lambda sweep 3/8+'): its last progress message; null otherwise"
    )
    @property
    def phase(self) -> str | None:
        return self.message if self.state in (JobState.RUNNING, JobState.CANCELING) else None


class JobsPublic(Page[JobPublic]):
    pass


class MetricPublic(Public):
    step: int
    kind: str
    epoch: float | None
    sparsity: float | None
    loss: float | None
    metric: float | None
    seconds: float | None
    created_at: datetime


class MetricsPublic(BaseModel):
    data: list[MetricPublic]


METRIC_CSV_COLUMNS = list(MetricPublic.model_fields)


class ArtifactPublic(Public):
    name: str
    kind: str
    size: int
    sha256: str
    media_type: str
    created_at: datetime
    url: str


class ArtifactsPublic(BaseModel):
    data: list[ArtifactPublic]


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, bool] = Field(default_factory=dict)


class LimitUse(BaseModel):
    limit: float | None = Field(None, description="the tenant's limit (null: none)")
    used: int | None = Field(None, description="what the tenant uses now (not counted for rates)")


class UsagePublic(BaseModel):
    """The calling tenant's use of its limits (``core.service.limits``)."""

    tenant: str
    running_jobs: LimitUse
    queued_jobs: LimitUse
    stored_bytes: LimitUse
    requests_per_s: LimitUse
