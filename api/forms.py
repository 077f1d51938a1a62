"""Reading the text fields of a multipart upload, as strictly as a JSON body is read."""

from __future__ import annotations

import json
from typing import Any

from core.errors import InvalidInput


def form_json_object(fields: dict[str, str], name: str) -> dict[str, Any] | None:
    """A multipart text field holding a JSON object (absent or empty → None)."""
    raw = fields.get(name)
    if raw is None or not raw.strip():
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidInput(
            f"{name} is not valid JSON: {exc.msg}",
            errors=[{"loc": ["body", name], "msg": "invalid JSON", "type": "json_invalid"}],
        ) from None
    if not isinstance(value, dict):
        raise InvalidInput(
            f"{name} must be a JSON object",
            errors=[{"loc": ["body", name], "msg": "expected an object", "type": "dict_type"}],
        )
    return value


def reject_unknown_fields(fields: dict[str, str], allowed: tuple[str, ...]) -> None:
    """Multipart text fields are as strict as JSON bodies (``extra="forbid"``): a misspelt field is an error,
    not silently ignored."""
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        raise InvalidInput(
            f"unknown form field(s): {', '.join(unknown)}; allowed: file, {', '.join(allowed)}",
            errors=[
                {"loc": ["body", name], "msg": "Extra inputs are not permitted", "type": "extra_forbidden"}
                for name in unknown
            ],
        )


def form_text(fields: dict[str, str], name: str, *, max_length: int) -> str | None:
    value = fields.get(name)
    if value is None or not value.strip():
        return None
    value = value.strip()
    if "\x00" in value:
        raise InvalidInput(
            f"{name} contains a NUL character",
            errors=[{"loc": ["body", name], "msg": "NUL character", "type": "string_pattern_mismatch"}],
        )
    if len(value) > max_length:
        raise InvalidInput(
            f"{name} is longer than {max_length} characters",
            errors=[{"loc": ["body", name], "msg": f"at most {max_length} characters", "type": "string_too_long"}],
        )
    return value


def default_name(filename: str | None, fallback: str) -> str:
    if filename:
        stem = filename.rsplit("/", 1)[-1].rsplit("\\", 1)[-1]
        stem = stem.rsplit(".", 1)[0] if "." in stem else stem
        if stem.strip():
            return stem.strip()[:200]
    return fallback
