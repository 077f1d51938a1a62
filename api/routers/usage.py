"""/v1/usage: the calling tenant's running and queued jobs and stored bytes, each beside its limit."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import CurrentTenant, SessionDep, SettingsDep
from api.schemas import UsagePublic
from core.service.db import usage as usage_db
from core.service.limits import limits_for

router = APIRouter(prefix="/v1", tags=["usage"])


@router.get("/usage", response_model=UsagePublic)
def get_usage(session: SessionDep, tenant: CurrentTenant, settings: SettingsDep) -> UsagePublic:
    used = usage_db.usage(session=session, tenant=tenant)
    return UsagePublic(tenant=tenant.name, **usage_db.describe(limits_for(settings, tenant.name), used))
