"""Alembic environment: the URL comes from ``-x url=...``, the config attribute ``url``, or ``Settings``."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection

from core.service.db.base import make_engine
from core.service.db.tables import Base

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _url() -> str:
    x = context.get_x_argument(as_dictionary=True)
    if x.get("url"):
        return x["url"]
    if config.attributes.get("url"):
        return str(config.attributes["url"])
    from core.service.settings import get_settings

    return get_settings().database_url


def _configure(**kwargs: object) -> None:
    url = kwargs.pop("url_for_dialect")
    context.configure(
        target_metadata=target_metadata,
        compare_type=True,
        render_as_batch=str(url).startswith("sqlite"),
        **kwargs,  # type: ignore[arg-type]
    )


def run_migrations_offline() -> None:
    url = _url()
    _configure(url=url, url_for_dialect=url, literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection, url: str) -> None:
    _configure(connection=connection, url_for_dialect=url)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection, str(connection.engine.url))
        return
    url = _url()
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            _run(conn, url)
            conn.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
