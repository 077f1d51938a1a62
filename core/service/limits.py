"""Tenant limits: what one tenant may hold at once, so that no tenant fills every worker or the store.

* ``running_jobs``: its jobs running at once; more wait in ``queued`` (the schedulers pass over a tenant at its
  limit: ``core.service.db.scheduling``), they are never refused for it;
* ``queued_jobs``: its jobs waiting; a submission beyond is refused (429 + Retry-After);
* ``stored_bytes``: its uploads plus its jobs' outputs in the artifact store; an upload beyond is refused (429);
* ``requests_per_s``: requests per second per API key (a token bucket with a one-second burst, per API process);
  beyond: 429 + Retry-After.

Defaults for every tenant are settings (``ARBORIST_TENANT_RUNNING_JOBS``, ...; none = no limit); the
``ARBORIST_TENANT_LIMITS`` setting overrides them per tenant name.
"""

from __future__ import annotations

from core.service.settings import Settings, TenantLimits

__all__ = ["TenantLimits", "limits_for", "running_caps"]


def limits_for(settings: Settings, tenant_name: str) -> TenantLimits:
    """The limits that apply to ``tenant_name``: its overrides over the settings' defaults."""
    defaults = {
        "running_jobs": settings.tenant_running_jobs,
        "queued_jobs": settings.tenant_queued_jobs,
        "stored_bytes": settings.tenant_stored_bytes,
        "requests_per_s": settings.tenant_requests_per_s,
    }
    override = settings.tenant_limits.get(tenant_name)
    if override is not None:
        defaults.update(override.model_dump(exclude_unset=True))
    return TenantLimits(**defaults)


def running_caps(settings: Settings) -> tuple[int | None, dict[str, int | None]]:
    """The running-jobs limit for every tenant (the default) and the tenants whose own differs, by name."""
    default = settings.tenant_running_jobs
    return default, {
        name: limits.running_jobs
        for name, limits in settings.tenant_limits.items()
        if "running_jobs" in limits.model_fields_set
    }
