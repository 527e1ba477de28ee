"""The runtime's OpenAPI fuzzed through the real gateway with schemathesis (property-based): valid
and invalid inputs on every operation. No input may cause a 5xx, and every rejection is a 4xx with
a message a user can read (the `error` field).

Hypothesis drives schemathesis' strategies per operation directly: schemathesis' own pytest
plugin (from_fixture) does not run under this pytest version."""

from __future__ import annotations

import json
from typing import Any

import pytest
from gateway_stack import Stack, get_stack
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (requirements/dev.txt)")
from schemathesis import GenerationMode  # noqa: E402  (after the importorskip above)

# Per operation and mode: under a minute for both modes on an idle 2-core machine (tiny model, CPU).
MAX_EXAMPLES = 50


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest) -> Stack:
    return get_stack(request.config)


def check(stack: Stack, case: Any, failures: list[str]) -> None:
    response = case.call(base_url=stack.url, headers={"Authorization": f"Bearer {stack.token}"},
                         verify=str(stack.ca), timeout=300)
    where = (f"{case.method} {case.path} body={str(case.body)[:200]!r} -> {response.status_code} "
             f"{response.content[:200]!r}")
    if response.status_code >= 500:
        failures.append(where)
    elif response.status_code >= 400:
        try:
            message = json.loads(response.content).get("error")
        except (ValueError, AttributeError):
            message = None
        if not (isinstance(message, str) and message.strip()):
            failures.append("no message: " + where)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_no_input_makes_the_runtime_fail_and_every_rejection_explains_itself(stack: Stack, mode: Any) -> None:
    schema = schemathesis.openapi.from_url(f"{stack.url}/openapi.json", verify=str(stack.ca),
                                           headers={"Authorization": f"Bearer {stack.token}"})
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/images/generations", "/v1/models", "/readyz"}
    calls = 0
    fuzzed: list[str] = []
    for operation in operations:
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case: Any) -> None:
            nonlocal calls
            calls += 1
            check(stack, case, failures)

        try:
            fuzz()
        except Unsatisfiable:
            continue  # no invalid input exists for an operation without parameters or body
        fuzzed.append(operation.path)
    assert "/v1/images/generations" in fuzzed
    assert not failures, f"{len(failures)} of {calls} calls failed:\n" + "\n".join(dict.fromkeys(failures))
