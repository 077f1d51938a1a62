"""Tenants and their API keys, and authentication: which tenant a bearer key belongs to."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, and_, bindparam, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, joinedload

from core.errors import NotFound, Unauthorized
from core.service.db.base import utcnow
from core.service.db.tables import ApiKey, Job, Tenant, is_id
from core.service.names import check_name

KEY_PREFIX = "arb"


def get_or_create_tenant(*, session: Session, name: str) -> Tenant:
    check_name(name, ["tenant"])
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is not None:
        return tenant
    tenant = Tenant(name=name)
    session.add(tenant)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        tenant = session.scalars(select(Tenant).where(Tenant.name == name)).one()
    return tenant


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_api_key(*, session: Session, tenant: Tenant, name: str | None = None) -> tuple[ApiKey, str]:
    """A new key for ``tenant``: returns the row and the plaintext key (shown once, never stored)."""
    if name is not None:
        check_name(name, ["name"])
    prefix = secrets.token_hex(6)
    key = f"{KEY_PREFIX}_{prefix}_{secrets.token_urlsafe(32)}"
    row = ApiKey(tenant_id=tenant.id, prefix=prefix, key_hash=hash_key(key), name=name)
    session.add(row)
    session.commit()
    return row, key


def revoke_api_key(*, session: Session, prefix: str) -> ApiKey:
    row = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix)) if "\x00" not in prefix else None
    if row is None:
        raise NotFound(f"No API key with prefix {prefix!r}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.commit()
    return row


def list_api_keys(*, session: Session, tenant: Tenant | None = None) -> list[ApiKey]:
    """Every tenant's keys (an admin's listing), or only ``tenant``'s."""
    stmt = select(ApiKey).order_by(ApiKey.created_at)
    if tenant is not None:
        stmt = stmt.where(ApiKey.tenant_id == tenant.id)
    return list(session.scalars(stmt))


def key_prefix(token: str) -> str:
    """The public prefix of a well-formed key (``arb_<prefix>_<secret>``); ``Unauthorized`` otherwise."""
    parts = token.split("_", 2)
    if "\x00" in token or len(parts) != 3 or parts[0] != KEY_PREFIX or not parts[1] or not parts[2]:
        raise Unauthorized("Malformed API key")
    return parts[1]


def _check_key(token: str, key_hash: str | None, revoked_at: datetime | None) -> None:
    if key_hash is None or not hmac.compare_digest(key_hash, hash_key(token)):
        raise Unauthorized("Invalid API key")
    if revoked_at is not None:
        raise Unauthorized("API key revoked")


def authenticate(*, session: Session, token: str) -> Tenant:
    """The tenant owning the bearer ``token``; ``Unauthorized`` if it is malformed, unknown or revoked."""
    prefix = key_prefix(token)
    # One round trip: the key and its tenant together (every authenticated request runs this).
    row = session.scalar(
        select(ApiKey).options(joinedload(ApiKey.tenant, innerjoin=True)).where(ApiKey.prefix == prefix)
    )
    _check_key(token, row and row.key_hash, row and row.revoked_at)
    assert row is not None
    return row.tenant


_KEYS, _JOBS = ApiKey.__table__, Job.__table__
#: The key by its prefix, and the job if it is this key's tenant's. Built once (SQLAlchemy then keys its compiled
#: form on this very object), over tables rather than mapped classes, so no ORM step runs.
_AUTHENTICATED_JOB = (
    select(_KEYS.c.key_hash, _KEYS.c.revoked_at, _KEYS.c.tenant_id.label("key_tenant_id"), *_JOBS.c)
    .select_from(
        _KEYS.outerjoin(_JOBS, and_(_JOBS.c.id == bindparam("job_id"), _JOBS.c.tenant_id == _KEYS.c.tenant_id))
    )
    .where(_KEYS.c.prefix == bindparam("prefix"))
)
_JOB_KEYS = tuple(column.key for column in _JOBS.c)


def authenticated_job(
    *, conn: Connection, token: str, job_id: str, on_key: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """``authenticate`` then ``jobs.get`` (same errors, same tenant scoping) in one round trip, on a bare connection:
    the job's columns by name. For the status poll, the API's hottest path, where the ORM's bookkeeping and a
    second query cost more than the lookups themselves. ``on_key(tenant id)`` runs once the key is valid, before
    the job is looked at (the key's rate limit)."""
    row = conn.execute(
        _AUTHENTICATED_JOB, {"prefix": key_prefix(token), "job_id": job_id if is_id(job_id) else ""}
    ).one_or_none()
    _check_key(token, row and row[0], row and row[1])
    assert row is not None
    if on_key is not None:
        on_key(row[2])
    job = dict(zip(_JOB_KEYS, row[3:]))
    if job["id"] is None:
        raise NotFound(f"Job {job_id!r} not found")
    return job


def tenant_name(*, conn: Connection, tenant_id: str) -> str:
    """A tenant's name by id, on a bare connection."""
    return str(conn.execute(select(Tenant.name).where(Tenant.id == tenant_id)).scalar_one())
