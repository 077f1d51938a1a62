"""Alembic migrations (see alembic.ini at the repository root and core.db.migrate)."""
