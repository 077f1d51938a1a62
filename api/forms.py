"""Reading the text fields of a multipart upload, as strictly as a JSON body is read."""

from __future__ import annotations

import json
from typing import Any

from core.errors import InvalidInput
from core.service.names import MAX_NAME_LENGTH, check_name, name_problem


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


def default_name(filename: str | None, fallback: str, loc: list[str | int]) -> str:
    """The name of an input that was not named: the stem of its file's name (at most 200 characters), else
    ``fallback``. A file name that holds control characters is refused (422 at ``loc``) rather than changed."""
    if filename:
        stem = filename.rsplit("/", 1)[-1].rsplit("\\", 1)[-1]
        stem = stem.rsplit(".", 1)[0] if "." in stem else stem
        stem = stem.strip()[:MAX_NAME_LENGTH]
        if stem:
            problem = name_problem(stem)
            if problem is not None:
                raise InvalidInput(
                    f"the file's name {problem}: send a name field",
                    errors=[{"loc": loc, "msg": f"file name {problem}", "type": "string_pattern_mismatch"}],
                )
            return stem
    return fallback


def input_name(fields: dict[str, str], filename: str | None, fallback: str) -> str:
    """The ``name`` form field of an upload (checked as every name is: ``core.service.names``), else the name
    derived from the uploaded file's name (``default_name``)."""
    name = form_text(fields, "name", max_length=MAX_NAME_LENGTH)
    if name is not None:
        return check_name(name, ["body", "name"])
    return default_name(filename, fallback, ["body", "file"])
