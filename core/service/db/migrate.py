"""Alembic's command API with the URL passed in (no alembic.ini needed): used by the CLI, tests and start-up."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from core.service.db.base import make_engine

MIGRATIONS_DIR = Path(__file__).resolve().parents[3] / "migrations"


def alembic_config(url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["configure_logger"] = False
    if url is not None:
        cfg.attributes["url"] = url
    return cfg


def upgrade(url: str | None = None, rev: str = "head") -> None:
    """Migrates ``url`` (default: ``Settings.database_url``) up to ``rev``."""
    command.upgrade(alembic_config(url), rev)


def downgrade(url: str | None, rev: str) -> None:
    """Migrates ``url`` down to ``rev`` (``"base"`` drops everything, ``"-1"`` one step)."""
    command.downgrade(alembic_config(url), rev)


def current(url: str) -> str | None:
    """The revision the database is at (``None`` when unmigrated)."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def head() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()
