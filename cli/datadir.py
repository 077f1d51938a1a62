"""The data directory of the embedded mode (``arborist serve --data-dir``), shared by ``serve`` and the admin commands.

One place says where a data directory keeps its database, so ``arborist keys create --data-dir DIR`` opens the
database ``arborist serve --data-dir DIR`` migrated and serves, wherever each command is run from.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

DEFAULT_DATA_DIR = "./data"
DATABASE_FILE = "arborist.db"


def database_path(data_dir: Path) -> Path:
    """The SQLite file of a data directory (absolute: the URL must not depend on the shell's directory)."""
    return data_dir.expanduser().resolve() / DATABASE_FILE


def database_url(data_dir: Path) -> str:
    """The database URL of a data directory: ``sqlite:///<data-dir>/arborist.db``."""
    return f"sqlite:///{database_path(data_dir)}"


def data_dir_option(default: str | None, help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The ``--data-dir`` option, the same type on every command that takes it."""
    return click.option(
        "--data-dir",
        "data_dir",
        default=default,
        show_default=default is not None,
        type=click.Path(file_okay=False, path_type=Path),
        help=help_text,
    )
