"""Bearer API keys: ``Authorization: Bearer arb_<prefix>_<secret>`` → tenant. 401 problem otherwise."""

from __future__ import annotations

from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from core.errors import Unauthorized
from core.service.db import tenants
from core.service.db.tables import Tenant

bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key created with `arborist keys create --tenant NAME`.",
)


def bearer_token(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None or not credentials.credentials:
        raise Unauthorized("Missing bearer API key")
    return credentials.credentials


def tenant_from_credentials(session: Session, credentials: HTTPAuthorizationCredentials | None) -> Tenant:
    return tenants.authenticate(session=session, token=bearer_token(credentials))
