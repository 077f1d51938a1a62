"""Persistence: engine/session factory (``base``), tables (``models``), data functions (``crud``), migrations."""
