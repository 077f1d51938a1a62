"""Admin commands, mounted by ``cli/main.py``: ``keys create|revoke|list`` and ``db upgrade|downgrade|current``.

The database URL comes from Settings (``ARBORIST_DATABASE_URL`` / ``.env``) unless ``--url`` is given.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import click
from sqlalchemy.orm import Session

from core.service.settings import get_settings

URL_OPTION = click.option("--url", "url", default=None, help="database URL (default: Settings.database_url)")


def _url(url: str | None) -> str:
    return url or get_settings().database_url


@contextmanager
def _session(url: str | None) -> Iterator[Session]:
    from core.service.db.base import make_engine, make_sessionmaker

    engine = make_engine(_url(url))
    try:
        with make_sessionmaker(engine)() as session:
            yield session
    finally:
        engine.dispose()


@click.group("keys", help="Manage API keys.")
def keys() -> None:
    pass


@keys.command("create")
@click.option("--tenant", required=True, help="tenant name (created if it does not exist)")
@click.option("--name", default=None, help="a label for the key")
@URL_OPTION
def keys_create(tenant: str, name: str | None, url: str | None) -> None:
    """Create a key for TENANT and print it once (only its hash is stored)."""
    from core.errors import InvalidInput
    from core.service.db import tenants

    with _session(url) as session:
        try:
            t = tenants.get_or_create_tenant(session=session, name=tenant)
            row, key = tenants.create_api_key(session=session, tenant=t, name=name)
        except InvalidInput as exc:  # a name with control characters (core.service.names)
            raise click.BadParameter(exc.detail) from None
        click.echo(key)
        click.echo(f"tenant={t.name} prefix={row.prefix} (store the key now: it is not shown again)", err=True)


@keys.command("revoke")
@click.argument("prefix")
@URL_OPTION
def keys_revoke(prefix: str, url: str | None) -> None:
    """Revoke the key with public PREFIX (the part after ``arb_``)."""
    from core.errors import NotFound
    from core.service.db import tenants

    with _session(url) as session:
        try:
            row = tenants.revoke_api_key(session=session, prefix=prefix)
        except NotFound as exc:
            raise click.ClickException(exc.detail) from None
        click.echo(f"revoked {row.prefix} at {row.revoked_at.isoformat() if row.revoked_at else '?'}")


@keys.command("list")
@click.option("--tenant", default=None, help="only this tenant's keys")
@URL_OPTION
def keys_list(tenant: str | None, url: str | None) -> None:
    """List keys (prefix, tenant, state); never the keys themselves."""
    from sqlalchemy import select

    from core.service.db import tenants
    from core.service.db.tables import Tenant

    with _session(url) as session:
        t = session.scalar(select(Tenant).where(Tenant.name == tenant)) if tenant else None
        if tenant and t is None:
            raise click.ClickException(f"no tenant named {tenant!r}")
        for k in tenants.list_api_keys(session=session, tenant=t):
            state = f"revoked {k.revoked_at.isoformat()}" if k.revoked_at else "active"
            click.echo(f"{k.prefix}\t{k.tenant.name}\t{k.name or ''}\t{state}")


@click.group("db", help="Database migrations (Alembic).")
def db() -> None:
    pass


@db.command("upgrade")
@click.argument("revision", default="head")
@URL_OPTION
def db_upgrade(revision: str, url: str | None) -> None:
    """Migrate up to REVISION (default: head)."""
    from core.service.db import migrate

    migrate.upgrade(_url(url), revision)
    click.echo(f"database at {migrate.current(_url(url))}")


@db.command("downgrade")
@click.argument("revision")
@URL_OPTION
def db_downgrade(revision: str, url: str | None) -> None:
    """Migrate down to REVISION ("base" drops every table, "-1" one step)."""
    from core.service.db import migrate

    migrate.downgrade(_url(url), revision)
    click.echo(f"database at {migrate.current(_url(url))}")


@db.command("current")
@URL_OPTION
def db_current(url: str | None) -> None:
    """Print the database's revision."""
    from core.service.db import migrate

    click.echo(migrate.current(_url(url)) or "(unmigrated)")


def register(group: click.Group) -> None:
    """Mount the admin groups on the main CLI."""
    group.add_command(keys)
    group.add_command(db)
