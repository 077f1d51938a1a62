"""Corrections to the OpenAPI document FastAPI generates, where it would describe what the wire does not carry.

An optional query or header parameter (``after: int | None = None``) is documented as ``anyOf: [integer, null]``.
No such parameter can be JSON ``null``: it is present (and then a string the validator parses as the type) or
absent. A client generated from the document (schemathesis is one) sends the text ``null``, which the API rightly
refuses as not an integer; so the document drops the ``null`` branch: "absent" is ``required: false``.
"""

from __future__ import annotations

from typing import Any

_WIRE_LOCATIONS = ("query", "header", "path", "cookie")


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with a ``{"type": "null"}`` alternative of its ``anyOf`` removed (one left: inlined)."""
    options = schema.get("anyOf")
    if not isinstance(options, list) or {"type": "null"} not in options:
        return schema
    rest = [o for o in options if o != {"type": "null"}]
    out = {k: v for k, v in schema.items() if k != "anyOf"}
    if len(rest) == 1:
        return {**rest[0], **out}
    return {**out, "anyOf": rest}


def parameters_as_sent(document: dict[str, Any]) -> dict[str, Any]:
    """Rewrites every operation's query, header, path and cookie parameters of ``document`` as they are sent (in
    place); returns it."""
    for path_item in document.get("paths", {}).values():
        for operation in path_item.values():
            if not isinstance(operation, dict):
                continue
            for parameter in operation.get("parameters", []):
                if parameter.get("in") in _WIRE_LOCATIONS and isinstance(parameter.get("schema"), dict):
                    parameter["schema"] = _without_null(parameter["schema"])
    return document
