"""A bounded property-based run over the OpenAPI document: no 5xx, and every response matches its schema.

Driven with Hypothesis directly (one ``@given`` per operation) rather than through ``schema.parametrize``:
schemathesis' lazy pytest integration (``from_fixture``) touches a pytest-private attribute that pytest 9
removed, and the schema has to come from the live server that a session fixture starts.
"""

from __future__ import annotations

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from core.service.db import tenants

MAX_EXAMPLES = 10
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]


@pytest.fixture(scope="session")
def fuzz_key(server) -> str:
    with server.session() as s:
        tenant = tenants.get_or_create_tenant(session=s, name=f"fuzz-{server.db}")
        return tenants.create_api_key(session=s, tenant=tenant)[1]


@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
def test_openapi_conformance(server, fuzz_key, mode):
    schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")
    headers = {"Authorization": f"Bearer {fuzz_key}"}
    failures: list[str] = []
    operations = 0
    calls: dict[str, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @hypothesis.settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
        def exercise(case):  # called at once, in this iteration: the loop variable is the one meant
            calls[operation.label] = calls.get(operation.label, 0) + 1  # noqa: B023
            case.call_and_validate(base_url=server.base_url, headers=headers, checks=CHECKS, timeout=10)

        try:
            exercise()
        except hypothesis.errors.Unsatisfiable:
            continue
        except Exception as exc:  # noqa: BLE001 (collect every operation's failure, not just the first)
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}")
    assert operations >= 19
    assert not failures, "\n\n".join(failures)
    # negative mode has nothing to break in operations without parameters (/healthz, /readyz, /metrics)
    exercised = operations if mode is schemathesis.GenerationMode.POSITIVE else operations - 3
    assert len(calls) >= exercised and sum(calls.values()) >= 5 * len(calls), calls
