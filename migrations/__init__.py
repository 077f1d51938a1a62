"""Alembic migrations (see alembic.ini at the repository root and core.service.db.migrate)."""
