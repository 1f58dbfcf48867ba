"""Schemathesis against the service's own OpenAPI spec: requests generated from it, valid (positive) and malformed
(negative), with and without a valid token, never get a 5xx. Hypothesis drives schemathesis' strategies directly
(the schema is built from a fixture, so collecting the tests builds nothing)."""

from __future__ import annotations

import time

import pytest

# schemathesis is a dev dependency (infra/requirements-dev.txt): missing, it fails the run; it never skips silently
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from svc_helpers import make_config

from service.app import create_app
from service.auth import create_token

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_models):
    """(schema, admin token): the app's spec loaded through its ASGI interface, its lifespan running."""
    root = tmp_path_factory.mktemp("schemathesis")
    config = make_config(root, tiny_models, max_new_tokens=4, default_max_tokens=2, max_best_of=2, batch_window_ms=1)
    app = create_app(config)
    token, _ = create_token(app.state.svc.store, "admin")
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    with asgi.get_client(app) as client:
        for _ in range(300):
            if client.get("/readyz").status_code == 200:
                break
            time.sleep(0.1)
        yield schema, token
    asgi.shutdown_lifespans()


def _operations(schema) -> list:
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize("with_token", [True, False])
def test_no_5xx_for_generated_requests(served, mode, with_token):
    schema, token = served
    headers = {"Authorization": f"Bearer {token}"} if with_token else {}
    operations = _operations(schema)
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/feedback", "/v1/feedback/batch"}
    for op in operations:
        if mode is GenerationMode.NEGATIVE and not len(op.body):
            continue  # nothing to malform in a bodiless GET
        examples = 40 if with_token else 8

        @given(case=op.as_strategy(generation_mode=mode))
        @settings(
            max_examples=examples,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def check(case):
            case.call_and_validate(headers=headers, checks=[not_a_server_error])

        check()
