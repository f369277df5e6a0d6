"""A bounded schemathesis run against the live server's /openapi.json: no 5xx, no schema violation."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
import httpx
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from meshserve.serve.config import ServeConfig
from tests.serve.conftest import make_engine, start_server


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_dir):
    # a short context bounds the work any generated request can ask for
    allm = make_engine(tiny_model_dir("llama"), max_model_len=96)
    srv = start_server(allm, ServeConfig(served_model_names=["tiny"], max_request_body_bytes=64 * 1024))
    yield srv
    srv.stop()
    allm.shutdown()


CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance, content_type_conformance]


@pytest.mark.slow
def test_openapi_fuzz(fuzz_server):
    # driven by hand (not schemathesis' pytest plugin, which lags behind pytest releases)
    api = schemathesis.openapi.from_url(fuzz_server.base_url + "/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/models"}
    for operation in operations:
        _fuzz(operation)
    assert fuzz_server.allm.is_running  # nothing a client sent broke the engine loop
    with httpx.Client(base_url=fuzz_server.base_url) as http:
        assert http.get("/health").status_code == 200


def _fuzz(operation) -> None:
    examples = 30 if operation.method.upper() == "POST" else 3

    @given(case=operation.as_strategy())
    @settings(max_examples=examples, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck),
              database=None)
    def check(case):
        response = case.call_and_validate(checks=CHECKS, timeout=60)
        assert response.status_code < 500, (operation.path, response.text)

    check()
