"""The service traces its answers to MLflow and attaches the feedback on them as assessments (serve.tracing): the
trace carries the redacted conversation, the model version, variant, latency and token counts; thumbs, ratings
and corrections appear on it; tracing off writes nothing; erasing a user removes their traces; and
``ingest --from mlflow`` does not take the service's own assessments a second time (export stores them)."""

from __future__ import annotations

import json

import mlflow
import pytest
from svc_helpers import dumps, event, make_config, start_api

from flywheel.data.sources import mlflow_assessment_lines
from flywheel.redact import redact
from flywheel.tracing_store import ANSWER_TAG, EVENT_KEY, USER_KEY, erase_user, experiment_id

EXPERIMENT = "flywheel-service"


def _traces(uri: str) -> list:
    exp = experiment_id(uri, EXPERIMENT)
    if exp is None:
        return []
    return mlflow.MlflowClient(uri).search_traces(locations=[exp], max_results=500)


def _chat(api, text: str, user: str | None = None) -> dict:
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": 3}
    if user:
        body["user"] = user
    r = api.client.post("/v1/chat/completions", json=body, headers=api.h("chat"))
    assert r.status_code == 200, r.text
    return r.json()


def test_answers_become_traces_and_feedback_their_assessments(tmp_path, tiny_models):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = make_config(tmp_path, tiny_models, tracking_uri=uri)
    with start_api(config) as api:
        a1 = _chat(api, "my mail is jane.doe@example.com, how do I water a fern?", user="jane@example.com")
        a2 = _chat(api, "and a cactus?", user="bob")
        version = a1["model_version"]
        feedback = [
            event(1, answer_id=a1["id"], model_version=version, user_id="jane@example.com"),
            event(2, answer_id=a1["id"], model_version=version, feedback={"type": "rating", "value": 4}),
            event(
                3,
                answer_id=a2["id"],
                model_version=version,
                user_id="jane@example.com",  # jane corrects bob's answer
                feedback={"type": "correction", "text": "Water it monthly; call me at 555-123-4567."},
            ),
            event(4),  # names no answer: stored, attached to no trace
        ]
        for e in feedback:
            r = api.client.post("/v1/feedback", content=dumps(e), headers=api.h("feedback"))
            assert r.status_code == 200 and r.json()["status"] == "stored", r.text
    # the lifespan's end wrote everything queued
    traces = {t.info.tags[ANSWER_TAG]: t for t in _traces(uri)}
    assert set(traces) == {a1["id"], a2["id"]}
    t1, t2 = traces[a1["id"]], traces[a2["id"]]
    assert t1.info.tags["model_version"] == version and t1.info.tags["variant"] == "champion"
    assert "jane.doe@example.com" not in t1.data.request and "[EMAIL]" in t1.data.request
    assert t1.info.trace_metadata[USER_KEY] != "jane@example.com"  # pseudonymised, as in the feedback store
    answer = json.loads(t1.data.response)["choices"][0]["message"]["content"]
    assert answer == redact(a1["choices"][0]["message"]["content"]) and t1.info.execution_time_ms >= 0
    usage = t1.info.token_usage
    assert usage["input_tokens"] == a1["usage"]["prompt_tokens"]
    assert usage["output_tokens"] == a1["usage"]["completion_tokens"]
    got = {(a.name, a.feedback.value if a.feedback else a.expectation.value) for a in t1.info.assessments}
    assert got == {("thumbs", True), ("rating", 4)}
    assert {a.source.source_type for a in t1.info.assessments} == {"HUMAN"}
    assert {a.metadata[EVENT_KEY] for a in t1.info.assessments} == {"svc-1", "svc-2"}
    (correction,) = t2.info.assessments
    assert correction.name == "expected_response" and "[PHONE]" in correction.expectation.value
    # ingest from this experiment leaves the service's own feedback to `flywheel export`; a reviewer's label
    # made in the MLflow UI (no event id) is new feedback
    lines, counts = mlflow_assessment_lines(uri, EXPERIMENT)
    assert lines == [] and counts["skipped_from_service"] == 3
    mlflow.set_tracking_uri(uri)
    source = mlflow.entities.AssessmentSource(source_type="HUMAN", source_id="reviewer-1")
    mlflow.log_feedback(trace_id=t2.info.trace_id, name="thumbs", value=False, source=source)
    lines, counts = mlflow_assessment_lines(uri, EXPERIMENT)
    assert len(lines) == 1 and counts["skipped_from_service"] == 3
    # the user's data leaves MLflow with an erase: their trace, and their assessments on others' traces
    from flywheel.data.erase import forms

    done = erase_user(uri, EXPERIMENT, forms("jane@example.com"))
    assert (done.traces, done.assessments) == (1, 1)
    left = {t.info.tags[ANSWER_TAG]: t for t in _traces(uri)}
    assert set(left) == {a2["id"]}
    assert [a.source.source_id for a in left[a2["id"]].info.assessments] == ["reviewer-1"]


def test_tracing_off_writes_no_trace(tmp_path, tiny_models):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = make_config(tmp_path, tiny_models, tracking_uri=uri, tracing={"enabled": False})
    with start_api(config) as api:
        assert api.svc.tracer is None
        _chat(api, "hello")
    assert _traces(uri) == []


def test_an_unreachable_tracking_store_never_fails_a_request(tmp_path, tiny_models, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    uri = "http://127.0.0.1:9"  # nothing listens there
    config = make_config(tmp_path, tiny_models, tracking_uri=uri)
    with start_api(config) as api:
        answer = _chat(api, "hello")
        e = event(9, answer_id=answer["id"], model_version=answer["model_version"])
        r = api.client.post("/v1/feedback", content=dumps(e), headers=api.h("feedback"))
        assert r.status_code == 200 and r.json()["status"] == "stored"
        tracer = api.svc.tracer
    assert tracer.written["failed"] == 2 and tracer.written["traces"] == 0


@pytest.mark.parametrize("queue", [1])
def test_a_full_queue_drops_traces_and_counts_them(tmp_path, tiny_models, queue):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = make_config(tmp_path, tiny_models, tracking_uri=uri, tracing={"max_queue": queue})
    with start_api(config) as api:
        tracer = api.svc.tracer
        tracer.stop()  # nothing drains the queue now
        for i in range(3):
            _chat(api, f"hello {i}")
        assert tracer.written["dropped"] == 2
        metrics = api.client.get("/metrics", headers=api.h()).text
        assert "flywheel_traces_dropped_total 2" in metrics


def test_the_trace_writer_ends_when_the_service_is_killed(tmp_path, repo_root):
    """A killed service never sends the writer its ``None``: the writer sees it is gone and ends (it used to wait
    on the queue for ever, one stray process per crash)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import sys, time\n"
        "from service.tracing import Tracer\n"
        "t = Tracer(sys.argv[1], 'flywheel-service', 10)\n"
        "t.start()\n"
        "print(t._process.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    service = subprocess.Popen(
        [sys.executable, "-c", script, f"sqlite:///{tmp_path / 'mlflow.db'}"],
        cwd=repo_root,
        env={**os.environ, "PYTHONPATH": str(repo_root)},
        stdout=subprocess.PIPE,
        text=True,
    )
    writer = int(service.stdout.readline())

    def alive(pid: int) -> bool:
        try:
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return state != "Z"

    assert alive(writer)
    os.kill(service.pid, signal.SIGKILL)
    service.wait()
    deadline = time.monotonic() + 90  # the writer may still be importing MLflow when the service dies
    while alive(writer) and time.monotonic() < deadline:
        time.sleep(0.5)
    try:
        assert not alive(writer), "the trace writer outlived the killed service"
    finally:
        if alive(writer):
            os.kill(writer, signal.SIGKILL)
