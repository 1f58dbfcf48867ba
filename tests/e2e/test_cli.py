"""`flywheel ingest` as a user runs it: JSON counts, one-line errors, exit codes."""

from __future__ import annotations

import gzip
import json
import shutil

import pytest

pytestmark = pytest.mark.e2e


@pytest.fixture
def ws(tmp_path, repo_root):
    """A workspace: the shipped params.yaml and nothing else (not a DVC repository, so nothing is tracked)."""
    root = tmp_path / "ws"
    root.mkdir()
    shutil.copy(repo_root / "params.yaml", root / "params.yaml")
    return root


def _events(make_event, n, **overrides):
    return "".join(
        json.dumps(make_event(feedback={"type": "thumbs", "value": "up" if i % 2 else "down"}, **overrides)) + "\n"
        for i in range(n)
    )


def test_ingest_prints_json_counts(ws, sh, make_event, repo_root):
    (ws / "batch.jsonl").write_text(_events(make_event, 3) + "not json\n" + _events(make_event, 1))
    proc = sh(["flywheel", "ingest", "batch.jsonl", str(repo_root / "data/demo/native-batch.jsonl"), "--json"], ws)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    counts = json.loads(lines[0])
    assert {k: counts[k] for k in ("read", "accepted", "duplicates", "quarantined")} == {
        "read": 49,
        "accepted": 48,
        "duplicates": 0,
        "quarantined": 1,
    }
    assert counts["pii_redacted"] == {"card": 1, "email": 1, "iban": 1, "ip": 1}
    assert counts["quarantine"].startswith(str(ws / "data" / "quarantine"))
    assert "failed_checks" not in counts
    assert len(list((ws / "data" / "raw").glob("date=*/batch-*.parquet"))) == 1

    again = sh(["flywheel", "ingest", "batch.jsonl", "--json"], ws)
    assert again.returncode == 0
    assert json.loads(again.stdout)["duplicates"] == 4


def _bad_input(ws, case):
    if case == "missing file":
        return ["nope.jsonl"]
    if case == "directory":
        (ws / "adir").mkdir()
        return ["adir"]
    if case == "corrupt gzip":
        data = gzip.compress("".join(f'{{"n": {i * 7919 % 10007}}}\n' for i in range(2000)).encode())
        (ws / "bad.jsonl.gz").write_bytes(data[: len(data) // 2])  # cut short mid-stream
        return ["bad.jsonl.gz"]
    if case == "empty file":
        (ws / "empty.jsonl").write_bytes(b"")
        return ["empty.jsonl"]
    if case == "unknown format":
        (ws / "x.jsonl").write_text("{}\n")
        return ["--format", "parquet", "x.jsonl"]
    if case == "file in the wrong format":
        (ws / "data.csv").write_text("id,rating\n1,5\n2,3\n")
        return ["data.csv"]
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case, words",
    [
        ("missing file", ["cannot read", "nope.jsonl"]),
        ("directory", ["cannot read", "adir"]),
        ("corrupt gzip", ["cannot read", "bad.jsonl.gz"]),
        ("empty file", ["empty input"]),
        ("unknown format", ["unknown format 'parquet'"]),
        ("file in the wrong format", ["no line of the input is a valid native event", "invalid JSON"]),
    ],
)
def test_ingest_refuses_bad_input_with_one_line(ws, sh, case, words):
    proc = sh(["flywheel", "ingest", *_bad_input(ws, case)], ws)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    for word in words:
        assert word in lines[0]
    assert "Traceback" not in proc.stderr
    assert not list(ws.glob("data/raw/date=*/*.parquet"))


def test_quarantined_batch_exits_1_naming_the_check(ws, sh, make_event):
    (ws / "same.jsonl").write_text(_events(make_event, 30, response="One answer for everyone."))
    proc = sh(["flywheel", "ingest", "same.jsonl", "--json"], ws)
    assert proc.returncode == 1
    counts = json.loads(proc.stdout)
    assert counts["accepted"] == 0 and counts["quarantined"] == 30
    assert any("share of duplicate answers" in f for f in counts["failed_checks"])
    assert "batch quarantined whole" in proc.stderr
    assert (
        "expect_column_proportion_of_unique_values_to_be_between(answer_hash) [share of duplicate answers]"
        in proc.stderr
    )
    assert "data_docs/index.html" in proc.stderr
    assert not list(ws.glob("data/raw/date=*/*.parquet"))


USER_APP = r'''
import sys
import mlflow
from mlflow.entities import AssessmentSource

mlflow.set_tracking_uri(sys.argv[1])
mlflow.set_experiment("support-bot")


@mlflow.trace
def answer(messages: list) -> dict:  # an OpenAI-style chat call, traced as a user's app would trace it
    question = messages[-1]["content"]
    return {"choices": [{"message": {"role": "assistant", "content": f"About {question}: restart it."}}]}


def traced(question: str, session: str) -> str:
    answer([{"role": "user", "content": question}])
    return mlflow.get_last_active_trace_id()


human = AssessmentSource(source_type="HUMAN", source_id="user-42")
judge = AssessmentSource(source_type="LLM_JUDGE", source_id="gpt-judge")
t1, t2, t3, t4 = (traced(q, s) for q, s in [("the router", "s1"), ("the modem", "s1"), ("wifi", "s2"), ("dns", "s3")])
mlflow.flush_trace_async_logging()  # traces are written off the calling thread
mlflow.log_feedback(trace_id=t1, name="user_thumbs", value=True, source=human)
mlflow.log_feedback(trace_id=t2, name="user_thumbs", value=False, source=human)
mlflow.log_feedback(trace_id=t3, name="rating", value=4, source=human)
mlflow.log_expectation(trace_id=t2, name="expected_response", value="Unplug the modem for 30 s.", source=human)
mlflow.log_feedback(trace_id=t4, name="relevance", value=0.2, source=judge)  # a judge: not user feedback
mlflow.log_feedback(trace_id=t4, name="rating", value=9, source=human)  # no mapping: quarantined with why
print(t1, t2, t3, t4)
'''


def test_ingest_from_mlflow_turns_the_human_assessments_on_traces_into_events_once(ws, sh, tmp_path):
    """A user's app (another process) traces its calls and logs human feedback with MLflow's own API;
    `flywheel ingest --from mlflow` turns exactly the human assessments into events (thumbs, rating, a
    correction), quarantines the one it cannot map, skips the judge's, and a second run finds nothing new."""
    import sys

    store = f"sqlite:///{tmp_path / 'app-traces.db'}"
    app = tmp_path / "app.py"
    app.write_text(USER_APP)
    logged = sh([sys.executable, str(app), store], tmp_path)
    assert logged.returncode == 0, logged.stderr[-3000:]
    cmd = ["flywheel", "ingest", "--from", "mlflow", "--experiment", "support-bot", "--tracking-uri", store, "--json"]
    first = sh(cmd, ws)
    assert first.returncode == 0, first.stderr[-3000:]
    counts = json.loads(first.stdout.strip().splitlines()[-1])
    assert {k: counts[k] for k in ("read", "accepted", "duplicates", "quarantined", "skipped_not_human")} == {
        "read": 5,
        "accepted": 4,
        "duplicates": 0,
        "quarantined": 1,
        "skipped_not_human": 1,
    }, counts
    import pyarrow.parquet as pq

    rows = [r for f in (ws / "data" / "raw").glob("date=*/batch-*.parquet") for r in pq.read_table(f).to_pylist()]
    kinds = sorted((r["feedback_type"], r["thumbs"] or r["rating"] or r["correction"]) for r in rows)
    assert kinds == [("correction", "Unplug the modem for 30 s."), ("rating", 4), ("thumbs", "down"), ("thumbs", "up")]
    assert all(r["event_id"].startswith("mlflow-") and r["model_version"] for r in rows)
    assert {json.loads(r["prompt"])[-1]["content"] for r in rows} == {"the router", "the modem", "wifi"}
    assert any("About the router: restart it." == r["response"] for r in rows)
    reasons = [json.loads(x) for f in (ws / "data" / "quarantine").rglob("*.jsonl") for x in f.read_text().splitlines()]
    assert len(reasons) == 1 and "is not a thumbs (boolean, up/down) nor a 1-5 rating" in reasons[0]["reason"]
    again = sh(cmd, ws)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout.strip().splitlines()[-1])["read"] == 0  # the watermark: nothing new


def test_ingest_a_langfuse_export_from_the_command_line(ws, sh, repo_root):
    fixture = repo_root / "tests" / "fixtures" / "langfuse-export.json"
    proc = sh(["flywheel", "ingest", "--format", "langfuse", str(fixture), "--json"], ws)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {k: counts[k] for k in ("read", "accepted", "duplicates", "quarantined", "skipped_not_human")} == {
        "read": 8,
        "accepted": 5,
        "duplicates": 0,
        "quarantined": 3,
        "skipped_not_human": 1,
    }, counts
    again = sh(["flywheel", "ingest", "--format", "langfuse", str(fixture), "--json"], ws)
    assert json.loads(again.stdout.strip().splitlines()[-1])["duplicates"] == 5


def _annotated(tasks: list[dict], verdicts: dict[str, tuple[str, str | None]]) -> list[dict]:
    """A Label Studio JSON export of ``tasks``: per event id a (verdict, revised text) by one reviewer."""
    out = []
    for i, t in enumerate(tasks):
        verdict, revised = verdicts[t["data"]["event_id"]]
        result = [{"from_name": "verdict", "to_name": "feedback", "type": "choices", "value": {"choices": [verdict]}}]
        if revised:
            result.append({"from_name": "revised", "type": "textarea", "value": {"text": [revised]}})
        who = {"id": 1, "email": "reviewer@example.com"}
        out.append({"id": i + 1, **t, "annotations": [{"completed_by": who, "result": result, "was_cancelled": False}]})
    return out


def test_review_exports_corrections_and_low_ratings_and_imports_the_verdicts(ws, sh, make_event):
    """`flywheel review export` writes the corrections and low ratings as Label Studio tasks with the labeling
    interface; `review import` stores the verdicts of a Label Studio export (a task it cannot take is named,
    the others kept); reviewed events are not exported again; a file that is no export is refused."""
    events = [
        make_event(feedback={"type": "correction", "text": "Water it weekly."}),
        make_event(feedback={"type": "rating", "value": 1}),
        make_event(feedback={"type": "rating", "value": 5}),
        make_event(feedback={"type": "thumbs", "value": "down"}),
    ]
    (ws / "b.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    assert sh(["flywheel", "ingest", "b.jsonl"], ws).returncode == 0
    out = sh(["flywheel", "review", "export", "--out", "review/tasks.json", "--json"], ws)
    assert out.returncode == 0, out.stderr
    counts = json.loads(out.stdout)
    assert (counts["tasks"], counts["correction"], counts["rating"]) == (2, 1, 1)
    tasks = json.loads((ws / "review/tasks.json").read_text())
    assert {t["data"]["event_id"] for t in tasks} == {events[0]["event_id"], events[1]["event_id"]}
    assert '<Choices name="verdict"' in (ws / "review/tasks.xml").read_text()
    export = _annotated(
        tasks, {events[0]["event_id"]: ("approve", "Weekly, in the morning."), events[1]["event_id"]: ("reject", None)}
    )
    export.append({"id": 9, "data": {"event_id": "evt-erased"}, "annotations": export[0]["annotations"]})
    (ws / "export.json").write_text(json.dumps(export))
    got = sh(["flywheel", "review", "import", "export.json", "--json"], ws)
    assert got.returncode == 0, got.stderr
    summary = json.loads(got.stdout.splitlines()[0])
    assert {k: summary[k] for k in ("reviewed", "approved", "rejected", "revised", "refused")} == {
        "reviewed": 2,
        "approved": 1,
        "rejected": 1,
        "revised": 1,
        "refused": 1,
    }
    assert "refused: task 3 (evt-erased): no stored event with this event_id" in got.stderr
    assert summary["refusals"] == [got.stderr.strip()[len("refused: ") :]]
    stored = [json.loads(x) for x in (ws / "data/raw/reviews/reviews.jsonl").read_text().splitlines()]
    assert {r["verdict"] for r in stored} == {"approve", "reject"} and "reviewer@example.com" not in str(stored)
    again = sh(["flywheel", "review", "export", "--out", "review/tasks-2.json", "--json"], ws)
    assert json.loads(again.stdout)["tasks"] == 0
    (ws / "bad.json").write_text('{"not": "an export"}')
    bad = sh(["flywheel", "review", "import", "bad.json"], ws)
    assert bad.returncode == 2 and "bad.json: not a Label Studio JSON export: expected a list of tasks" in bad.stderr
