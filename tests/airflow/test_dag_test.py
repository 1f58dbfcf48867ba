"""``dag.test()`` of the DAGs in one tiny-profile workspace (the runs build on each other, in file order):
a first run trains and promotes, a second one with no new feedback ends early, a broken batch fails
``validate`` naming the expectation, feedback captured in the store is exported into the raw store and
the asset carries the export's counts, and a rollback."""

from __future__ import annotations

import json

import pytest

from tests.airflow.airflow_helpers import (
    airflow_env,
    broken_batch,
    capture_feedback,
    champion,
    dag_test,
    init_airflow,
    make_workspace,
    raw_event_ids,
    sh,
    version_tags,
)

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(3600)]

STAGES = ["base_models", "resolve_champion", "validate", "prepare", "train_reward", "train_policy", "evaluate", "bless"]


def _xcom(run: dict, key: str):
    value = run["xcom"].get(key)
    return json.loads(value) if isinstance(value, str) and value[:1] in "{[" else value


@pytest.fixture(scope="module")
def ws(tmp_path_factory, repo_root):
    base = tmp_path_factory.mktemp("dagtest")
    root = make_workspace(base / "repo", repo_root)
    env = airflow_env(base / "airflow-home", root)
    init_airflow(env, root)
    return root, env


def test_continuous_improvement_trains_and_promotes(ws):
    root, env = ws
    assert champion(root) == "1"
    run, out = dag_test("continuous_improvement", env, root)
    assert run["state"] == "success", out[-6000:]
    tasks = run["tasks"]
    assert all(tasks[s] == "success" for s in ["check_feedback", *STAGES, "record_training", "release"]), tasks
    assert tasks["approve_release"] == "skipped" and tasks["record_rejection"] == "skipped"
    decision = _xcom(run, "check_feedback.decision")
    assert decision["retrain"] and decision["new_events"] == 164 and decision["loop_run_id"]
    assert champion(root) == "2"
    tags = version_tags(root, "policy", "2")
    assert tags["airflow_run_id"] == run["run_id"] and tags["loop_run_id"] == decision["loop_run_id"]
    assert (root / "reports/orchestration/last_training.json").is_file()
    assert "bless" in (root / "dvc.lock").read_text()


def test_no_new_feedback_ends_the_run_early_with_the_reason(ws):
    root, env = ws
    run, out = dag_test("continuous_improvement", env, root)
    assert run["state"] == "success", out[-6000:]
    assert run["tasks"].pop("check_feedback") == "success"
    assert set(run["tasks"].values()) == {"skipped"}
    decision = _xcom(run, "check_feedback.decision")
    assert not decision["retrain"] and decision["reason"].startswith("not retraining: 0 new events")
    assert "STOP: not retraining: 0 new events" in out


def test_dry_run_decides_and_runs_nothing(ws):
    root, env = ws
    lock = (root / "dvc.lock").read_text()
    run, out = dag_test("continuous_improvement", env, root, conf={"dry_run": True, "force": True})
    assert run["state"] == "success", out[-6000:]
    assert run["tasks"].pop("check_feedback") == "success" and set(run["tasks"].values()) == {"skipped"}
    assert _xcom(run, "check_feedback.decision")["reason"].startswith("dry run, would retrain: forced")
    assert (root / "dvc.lock").read_text() == lock and champion(root) == "2"


def test_broken_batch_fails_validate_naming_the_expectation(ws):
    root, env = ws
    sh(["flywheel", "ingest", str(broken_batch(root / "broken.jsonl"))], root)
    before = champion(root)
    run, out = dag_test("continuous_improvement", env, root, conf={"force": True})
    assert run["state"] == "failed", out[-6000:]
    tasks = run["tasks"]
    assert tasks["base_models"] == tasks["resolve_champion"] == "success" and tasks["validate"] == "failed"
    downstream = ["prepare", "train_reward", "train_policy", "evaluate", "bless", "record_training", "release"]
    assert all(tasks[t] == "upstream_failed" for t in downstream), tasks
    assert "stage 'validate' (dvc repro) failed (exit " in out, out[-6000:]
    failed_expectation = "expect_column_mean_to_be_between(new_response_chars) [answer-length drift vs previous window]"
    assert failed_expectation + ": observed" in out, out[-6000:]
    assert champion(root) == before


def test_feedback_ingest_exports_captured_feedback_and_emits_the_asset(ws):
    root, env = ws
    before = raw_event_ids(root)
    ids = capture_feedback(root, 6, "dagtest")
    run, out = dag_test("feedback_ingest", env, root)
    tasks = {"export_feedback": "success", "ingest_traces": "skipped"}  # no trace store configured
    assert run["state"] == "success" and run["tasks"] == tasks, out[-4000:]
    assert "no trace store configured (params.yaml ingest.traces.experiment is empty)" in out
    (event,) = run["asset_events"]
    assert event["new_events"] == event["exported"] == 6 and event["duplicates"] == 0, event
    after = raw_event_ids(root)
    assert len(after) == len(before) + 6 and set(ids) <= set(after)
    assert (root / "data/raw.dvc").read_text().count("md5") >= 1
    # nothing new since: the task is skipped and no asset event says otherwise
    again, out = dag_test("feedback_ingest", env, root)
    assert again["tasks"] == {"export_feedback": "skipped", "ingest_traces": "skipped"}, out[-4000:]
    assert again["asset_events"] == [] and raw_event_ids(root) == after


def test_feedback_ingest_pulls_the_human_assessments_of_the_configured_trace_store(ws, tmp_path):
    """params ingest.traces names the MLflow experiment a user's app traces to: the DAG's ingest_traces task
    turns the human assessments logged there (by another process, with MLflow's own API) into a raw-store batch
    and announces it on the feedback asset; the next run finds nothing new (the watermark) and is skipped."""
    import sys

    import yaml

    from tests.e2e.test_cli import USER_APP

    root, env = ws
    store = f"sqlite:///{tmp_path / 'app-traces.db'}"
    (tmp_path / "app.py").write_text(USER_APP)
    sh([sys.executable, str(tmp_path / "app.py"), store], tmp_path)
    original = (root / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["ingest"]["traces"] = {"experiment": "support-bot", "tracking_uri": store}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        before = raw_event_ids(root)
        run, out = dag_test("feedback_ingest", env, root)
        assert run["tasks"] == {"export_feedback": "skipped", "ingest_traces": "success"}, out[-4000:]
        (event,) = run["asset_events"]
        assert event["new_events"] == event["accepted"] == 4 and event["quarantined"] == 1, event
        new = [i for i in raw_event_ids(root) if i not in before]
        assert len(new) == 4 and all(i.startswith("mlflow-") for i in new)
        again, out = dag_test("feedback_ingest", env, root)
        assert again["tasks"] == {"export_feedback": "skipped", "ingest_traces": "skipped"}, out[-4000:]
        assert again["asset_events"] == [] and "no new assessments on 'support-bot'" in out
    finally:
        (root / "params.yaml").write_text(original)


def test_rollback_dag_moves_the_champion_back(ws):
    root, env = ws
    assert champion(root) == "2"
    run, out = dag_test("rollback", env, root, conf={"model": "policy", "to": ""})
    assert run["state"] == "success", out[-4000:]
    assert champion(root) == "1"
