"""Fuzzing every operation of /openapi.json with schemathesis against a real server: over a thousand generated
requests (bodies included, valid and invalid), and not one 5xx."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.reliability.servers import mock_serve, record_figure, serve

pytestmark = pytest.mark.reliability

CASES_WITH_BODY = 90
"""Cases per operation and mode for operations with a request body (each mode: valid, then invalid data)."""
CASES_WITHOUT_BODY = 30
OPTIONS = ("--mock-type", "echo", "--mock-time-per-token", "0", "--max-concurrency", "8", "--max-queue", "64")


def fuzz_operation(operation: schemathesis.APIOperation, url: str, mode: GenerationMode, tally: Counter[str]) -> None:
    has_body = operation.body is not None and len(operation.body) > 0
    budget = CASES_WITH_BODY if has_body else CASES_WITHOUT_BODY
    session = requests.Session()

    @settings(
        max_examples=budget,
        phases=[Phase.generate],
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        response = case.call(base_url=url, session=session, timeout=30)
        tally[f"{operation.method.upper()} {operation.path}"] += 1
        tally["with body" if case.body is not None and has_body else "without body"] += 1
        assert response.status_code < 500, (case.as_curl_command(), response.status_code, response.text[:500])

    try:
        run()
    except Unsatisfiable:
        assert mode is GenerationMode.NEGATIVE  # nothing in this operation can be made invalid


def test_no_generated_request_gets_a_5xx(tmp_path: Path) -> None:
    tally: Counter[str] = Counter()
    with serve(mock_serve(*OPTIONS), tmp_path) as server:
        schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
        for result in schema.get_all_operations():
            operation = result.ok()
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                fuzz_operation(operation, server.url, mode, tally)
    total = tally.pop("with body") + tally.pop("without body", 0)
    record_figure("fuzz", {"cases": total, "per_operation": dict(sorted(tally.items()))})
    assert total >= 1000
