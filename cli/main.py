"""``arborist``: local pruning runs, the service's client commands, the embedded service, keys and migrations."""

from __future__ import annotations

import click

from cli.admin import db, keys
from cli.local import compare, dataset, prune, train
from cli.remote import datasets, jobs, models
from cli.usage import usage


@click.group()
def main() -> None:
    """Arborist: WoodFisher pruning as a service."""


for command in (prune, compare, train, dataset, models, datasets, jobs, keys, db, usage):
    main.add_command(command)

try:  # the embedded service lives in cli/serve.py
    from cli.serve import serve

    main.add_command(serve)
except ImportError:  # pragma: no cover
    pass
