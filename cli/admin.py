"""Admin commands, mounted by ``cli/main.py``: ``keys create|revoke|list`` and ``db upgrade|downgrade|current``.

The database URL is ``--url``; else ``--data-dir``'s database, the one ``arborist serve --data-dir`` uses
(``cli/datadir.py``); else Settings (``ARBORIST_DATABASE_URL`` / ``.env``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from sqlalchemy.orm import Session

from cli import datadir
from core.service.settings import get_settings


def database_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--url`` and ``--data-dir``: which database a command opens."""
    f = datadir.data_dir_option(None, "the data directory of 'arborist serve --data-dir' (its arborist.db)")(f)
    return click.option("--url", "url", default=None, help="database URL (default: Settings.database_url)")(f)


def _url(url: str | None, data_dir: Path | None = None, *, must_exist: bool = False) -> str:
    """``--url``, else the data directory's database (which must exist when ``must_exist``), else Settings'."""
    if url and data_dir is not None:
        raise click.UsageError("give --url or --data-dir, not both")
    if url:
        return url
    if data_dir is not None:
        path = datadir.database_path(data_dir)
        if must_exist and not path.is_file():
            raise click.ClickException(
                f"no database at {path}: start 'arborist serve --data-dir {data_dir}' once (it creates and "
                f"migrates it), or run 'arborist db upgrade --data-dir {data_dir}'"
            )
        return datadir.database_url(data_dir)
    return get_settings().database_url


@contextmanager
def _session(url: str | None, data_dir: Path | None) -> Iterator[Session]:
    from core.service.db.base import make_engine, make_sessionmaker

    engine = make_engine(_url(url, data_dir, must_exist=True))
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
@database_options
def keys_create(tenant: str, name: str | None, url: str | None, data_dir: Path | None) -> None:
    """Create a key for TENANT and print it once (only its hash is stored)."""
    from core.errors import InvalidInput
    from core.service.db import tenants

    with _session(url, data_dir) as session:
        try:
            t = tenants.get_or_create_tenant(session=session, name=tenant)
            row, key = tenants.create_api_key(session=session, tenant=t, name=name)
        except InvalidInput as exc:  # a name with control characters (core.service.names)
            raise click.BadParameter(exc.detail) from None
        click.echo(key)
        click.echo(f"tenant={t.name} prefix={row.prefix} (store the key now: it is not shown again)", err=True)


@keys.command("revoke")
@click.argument("prefix")
@database_options
def keys_revoke(prefix: str, url: str | None, data_dir: Path | None) -> None:
    """Revoke the key with public PREFIX (the part after ``arb_``)."""
    from core.errors import NotFound
    from core.service.db import tenants

    with _session(url, data_dir) as session:
        try:
            row = tenants.revoke_api_key(session=session, prefix=prefix)
        except NotFound as exc:
            raise click.ClickException(exc.detail) from None
        click.echo(f"revoked {row.prefix} at {row.revoked_at.isoformat() if row.revoked_at else '?'}")


@keys.command("list")
@click.option("--tenant", default=None, help="only this tenant's keys")
@database_options
def keys_list(tenant: str | None, url: str | None, data_dir: Path | None) -> None:
    """List keys (prefix, tenant, state); never the keys themselves."""
    from sqlalchemy import select

    from core.service.db import tenants
    from core.service.db.tables import Tenant

    with _session(url, data_dir) as session:
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
@database_options
def db_upgrade(revision: str, url: str | None, data_dir: Path | None) -> None:
    """Migrate up to REVISION (default: head)."""
    from core.service.db import migrate

    if data_dir is not None and url is None:
        datadir.database_path(data_dir).parent.mkdir(parents=True, exist_ok=True)
    target = _url(url, data_dir)
    migrate.upgrade(target, revision)
    click.echo(f"database at {migrate.current(target)}")


@db.command("downgrade")
@click.argument("revision")
@database_options
def db_downgrade(revision: str, url: str | None, data_dir: Path | None) -> None:
    """Migrate down to REVISION ("base" drops every table, "-1" one step)."""
    from core.service.db import migrate

    target = _url(url, data_dir, must_exist=True)
    migrate.downgrade(target, revision)
    click.echo(f"database at {migrate.current(target)}")


@db.command("current")
@database_options
def db_current(url: str | None, data_dir: Path | None) -> None:
    """Print the database's revision."""
    from core.service.db import migrate

    click.echo(migrate.current(_url(url, data_dir, must_exist=True)) or "(unmigrated)")


def register(group: click.Group) -> None:
    """Mount the admin groups on the main CLI."""
    group.add_command(keys)
    group.add_command(db)
