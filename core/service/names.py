"""What the name of a stored thing (a model, a dataset, a tenant, an API key) may hold.

One rule on every database: no control characters (C0, DEL, C1) and no lone surrogates. PostgreSQL refuses a NUL
in text and cannot encode a surrogate, SQLite stores both; a control character in a name also ends up in logs and
terminals. Checked where a name enters (the API's forms and bodies, the CLI) and again where a row is made.
"""

from __future__ import annotations

import unicodedata

from core.errors import InvalidInput

MAX_NAME_LENGTH = 200
#: the rule as a JSON Schema / pydantic pattern (the surrogate range cannot be written in one, and JSON cannot
#: carry a lone surrogate to a JSON body anyway: pydantic refuses it as invalid UTF-8)
NAME_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]*$"
#: a name as an OpenAPI form field
NAME_FIELD = {"type": "string", "maxLength": MAX_NAME_LENGTH, "pattern": NAME_PATTERN}
_REFUSED_CATEGORIES = frozenset({"Cc", "Cs"})


def name_problem(value: str) -> str | None:
    """Why ``value`` cannot be a name, or ``None`` when it can."""
    for ch in value:
        if unicodedata.category(ch) in _REFUSED_CATEGORIES:
            return f"holds the control character U+{ord(ch):04X}"
    if len(value) > MAX_NAME_LENGTH:
        return f"is longer than {MAX_NAME_LENGTH} characters"
    return None


def check_name(value: str, loc: list[str | int]) -> str:
    """``value`` if it is a valid name, else ``InvalidInput`` (422) naming the field at ``loc``."""
    problem = name_problem(value)
    if problem is not None:
        field = str(loc[-1]) if loc else "name"
        raise InvalidInput(
            f"{field} {problem}", errors=[{"loc": list(loc), "msg": problem, "type": "string_pattern_mismatch"}]
        )
    return value
