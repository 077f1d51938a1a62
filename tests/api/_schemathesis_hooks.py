"""Schemathesis hooks for ``test_api_schemathesis.py`` (loaded by path from its config): one extra check.

``positive_data_acceptance`` allows a 422 where validity depends on more than the request (a file's content, rows
that must exist). Such a 422 is ``invalid-input``. A schema-valid request refused as *malformed* (422
``validation-error``) is a lie of the document when the refusal is one a schema states: a type, a bound, a length,
a pattern, an enum, a missing or extra field (pydantic generated the document from those very constraints, so a
mismatch means the document was changed or a parameter is described wrongly, e.g. ``null`` for a header). A rule
between fields (``value_error``: "metric 'accuracy' needs loss 'cross_entropy'", "end_epoch must be ≥
start_epoch") is not something JSON Schema says; it is described in prose, and allowed here.
"""

from __future__ import annotations

import json

import schemathesis

PROBLEMS = "https://arborist.dev/problems/"
#: the pydantic error types of a validator's own rule (not of a constraint the schema states)
CROSS_FIELD_RULES = frozenset({"value_error", "assertion_error"})


@schemathesis.check
def document_describes_requests(ctx, response, case) -> bool | None:
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 422:
        return None
    try:
        problem = json.loads(response.content)
    except ValueError:
        return None
    if not isinstance(problem, dict) or problem.get("type") != PROBLEMS + "validation-error":
        return None
    if any(e.get("type") not in CROSS_FIELD_RULES for e in problem.get("errors") or [{}]):
        raise AssertionError(
            f"a request valid by the OpenAPI document was refused as malformed: {problem.get('detail')}; the "
            f"document must describe what the validator takes (errors: {problem.get('errors')})"
        )
    return None
