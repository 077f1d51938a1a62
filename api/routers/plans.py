"""``POST /v1/jobs/plan``: what creating a job would check, without creating it (the dashboard shows the memory
plan before the job is submitted). The same checks as ``POST /v1/jobs`` (:func:`api.routers.jobs.preflight`):
the same 422 problems, located at the same fields; on success the plan of a pruning step and the budget it is
held to."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from api.deps import CurrentTenant, SessionDep, SettingsDep
from api.routers.jobs import check_budget_cap, preflight
from api.routing import JSONBodyRoute
from api.schemas import JobCreate
from core.runs.budget import effective_budget_mb
from core.service.db import inputs
from core.service.db.tables import Dataset, Model

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], route_class=JSONBodyRoute)


class PlanPublic(BaseModel):
    memory_plan: dict[str, Any] | None = Field(
        None,
        description="bytes of a pruning step: block_size, gradient_bytes, inverse_bytes, working_bytes, total_bytes; "
        "the Fisher path (streamed or buffered), its chunk and layer groups, why (reason), and how the block size "
        "was chosen (block_choice); null when the method takes no gradients or the model has no zoo architecture "
        "(ONNX, Hugging Face: planned by the run)",
    )
    budget_mb: float | None = Field(None, description="the budget the plan is held to (MiB); null without one")
    budget_source: str | None = Field(None, description="where that budget comes from")


@router.post("/plan", response_model=PlanPublic, name="plan_job")
def plan_job(body: JobCreate, session: SessionDep, tenant: CurrentTenant, settings: SettingsDep) -> PlanPublic:
    """The checks of ``POST /v1/jobs`` on this body and the memory plan, without creating a job."""
    check_budget_cap(body.spec, settings.memory_budget_mb)
    model = inputs.get(Model, session=session, tenant=tenant, id=body.model_id)
    dataset = inputs.get(Dataset, session=session, tenant=tenant, id=body.dataset_id)
    plan = preflight(body.spec, settings.memory_budget_mb)(model, dataset)
    budget, source = effective_budget_mb(body.spec, settings.memory_budget_mb)
    return PlanPublic(
        memory_plan=plan.as_dict() if plan else None,
        budget_mb=budget,
        budget_source=source if budget is not None else None,
    )
