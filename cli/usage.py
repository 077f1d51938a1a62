"""``arborist usage``: every tenant's running and queued jobs and stored bytes, beside its limits (an admin's view
of the database; a tenant sees its own through ``GET /v1/usage``)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cli.admin import _session, database_options
from core.service.settings import get_settings


@click.command("usage")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per tenant instead of a table")
@database_options
def usage(as_json: bool, url: str | None, data_dir: Path | None) -> None:
    """Totals per tenant: running and queued jobs, stored bytes, each with its limit ('-': none)."""
    from sqlalchemy import select

    from core.service.db import usage as usage_db
    from core.service.db.tables import Tenant
    from core.service.limits import limits_for

    settings = get_settings()
    with _session(url, data_dir) as session:
        tenants = list(session.execute(select(Tenant.id, Tenant.name).order_by(Tenant.name)))
        used = usage_db.usage_by_tenant(session=session, tenant_ids=[t for t, _ in tenants])
    if not as_json:
        click.echo("tenant\trunning\tqueued\tstored_bytes\trequests_per_s")
    for tenant_id, name in tenants:
        row = usage_db.describe(limits_for(settings, name), used[tenant_id])
        if as_json:
            click.echo(json.dumps({"tenant": name, **row}))
            continue
        cells = [
            f"{row[k]['used']}/{'-' if row[k]['limit'] is None else row[k]['limit']}"
            for k in ("running_jobs", "queued_jobs", "stored_bytes")
        ]
        rate = row["requests_per_s"]["limit"]
        click.echo("\t".join([name, *cells, "-" if rate is None else f"{rate:g}"]))
