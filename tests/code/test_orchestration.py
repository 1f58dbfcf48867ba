"""The orchestration decisions, without Airflow: threshold, watermark, commands and their failures."""

from __future__ import annotations

import shutil
import stat
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from flywheel import orchestration as orch
from flywheel.orchestration import OrchestrationParams, decide

P = OrchestrationParams(min_new_events=100, max_negative_rate_rise=0.1, min_events_for_rate=20)


@pytest.mark.parametrize("new, new_rate, trained_rate, force, retrain, words", [
    (100, 0.2, 0.2, False, True, "100 new events since the last training >= min_new_events 100"),
    (99, 0.2, 0.2, False, False, "99 new events since the last training < min_new_events 100"),
    (30, 0.45, 0.2, False, True, "negative-feedback rate rose by 0.250"),
    (30, 0.25, 0.2, False, False, "rise +0.050 <= 0.1"),
    (10, 0.9, 0.2, False, False, "< min_new_events 100"),       # too few events for the rate rule
    (5, None, None, True, True, "forced (the feedback threshold is skipped)"),
    (0, None, None, False, False, "0 new events"),
])
def test_decide(new, new_rate, trained_rate, force, retrain, words):
    d = decide(new, new_rate, trained_rate, P, force)
    assert d.retrain is retrain and words in d.reason, d.reason


def test_zero_threshold_still_needs_an_event():
    assert not decide(0, None, None, OrchestrationParams(min_new_events=0)).retrain
    assert decide(1, None, None, OrchestrationParams(min_new_events=0)).retrain


def test_unknown_key_fails_naming_it():
    params = SimpleNamespace(model_extra={"orchestration": {"min_new_event": 3}})
    with pytest.raises(orch.SettingsError, match="orchestration.min_new_event"):
        orch.orchestration_params(params)


def test_watermark_counts_only_batches_after_the_last_training(demo_store, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(demo_store.raw, raw)
    settings = SimpleNamespace(raw_store=raw, reports=tmp_path / "reports")
    ids = [r.batch_id for r in demo_store.results]
    first = orch.check_feedback(settings, P)
    assert first.retrain and first.new_events == 1530 and first.latest_batch == max(ids)

    mark = orch.record_training(settings, upto_batch=sorted(ids)[1], airflow_run_id="manual__1")
    assert mark["batches"] == 2 and mark["airflow_run_id"] == "manual__1"
    after = orch.check_feedback(settings, P)
    assert after.new_events == demo_store.results[2].accepted and after.trained_negative_rate == mark["negative_rate"]

    orch.record_training(settings, upto_batch=None)
    nothing = orch.check_feedback(settings, P)
    assert not nothing.retrain and nothing.new_events == 0 and "not retraining" in nothing.reason
    assert orch.check_feedback(settings, P, force=True).retrain


def test_stage_command_is_dvc_repro_of_one_stage():
    cmd = orch.stage_command("validate")
    assert Path(cmd[0]).name == "dvc" and cmd[1:] == ["repro", "--single-item", "validate"]


def test_failed_command_names_what_failed_with_its_stderr_tail(tmp_path):
    code = "import sys; print('working'); [print(f'line {i}', file=sys.stderr) for i in range(40)]; sys.exit(3)"
    lines = []
    with pytest.raises(orch.CommandFailed) as err:
        orch.run_command([sys.executable, "-c", code], tmp_path, orch.command_env(tmp_path), lines.append,
                         what="stage 'validate' (dvc repro)")
    message = str(err.value)
    assert message.startswith("stage 'validate' (dvc repro) failed (exit 3):")
    assert "line 39" in message and "line 14" not in message      # the tail only
    assert "working" in lines and "[stderr] line 0" in lines       # everything streamed to the log


def test_command_env_carries_the_run_ids(tmp_path):
    env = orch.command_env(tmp_path, "manual__2026", profile="tiny", loop_run_id="abc")
    assert env["FLYWHEEL_AIRFLOW_RUN_ID"] == env["AIRFLOW_CTX_DAG_RUN_ID"] == "manual__2026"
    assert env["FLYWHEEL_PROFILE"] == "tiny" and env["FLYWHEEL_PARENT_RUN_ID"] == "abc"
    assert env["FLYWHEEL_ROOT"] == str(tmp_path)


def _fake_flywheel(folder: Path, body: str) -> None:
    script = folder / "flywheel"
    script.write_text(f"#!{sys.executable}\nimport sys\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_export_missing_is_reported_as_unavailable(tmp_path, monkeypatch):
    _fake_flywheel(tmp_path, "print(\"Error: No such command 'export'.\", file=sys.stderr); sys.exit(2)")
    monkeypatch.setattr(orch, "console_script", lambda name: str(tmp_path / name))
    with pytest.raises(orch.ExportUnavailable, match="not available in this install"):
        orch.run_export(tmp_path, orch.command_env(tmp_path))


def test_export_without_a_flywheel_executable_is_a_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(orch, "console_script", lambda name: str(tmp_path / "no-such-bin" / name))
    with pytest.raises(orch.CommandFailed, match="no `flywheel` executable"):
        orch.run_export(tmp_path, orch.command_env(tmp_path))
    assert issubclass(orch.ExportUnavailable, orch.CommandFailed)


@pytest.mark.parametrize("body", [None, "print(\"Error: No such command 'export'.\", file=sys.stderr); sys.exit(2)"],
                         ids=["no-executable", "no-export-command"])
def test_the_export_task_fails_not_skips_on_a_broken_install(tmp_path, monkeypatch, body):
    """feedback_ingest's task: a missing executable or command fails it (a skip reads as "no new feedback")."""
    import importlib.util

    from airflow.sdk.exceptions import AirflowFailException

    if body:
        _fake_flywheel(tmp_path, body)
    monkeypatch.setattr(orch, "console_script", lambda name: str(tmp_path / name))
    monkeypatch.setattr(orch, "synced", lambda root, env, run_id, task_id, state, work, **kw: (work(), None))
    spec = importlib.util.spec_from_file_location("feedback_ingest_dag", Path(orch.__file__).parents[1] / "dags" /
                                                  "feedback_ingest.py")
    dag_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dag_module)
    monkeypatch.setattr(dag_module, "get_current_context", lambda: {"run_id": "manual__test", "outlet_events": {}})
    task = dag_module.feedback_ingest().task_dict["export_feedback"]
    with pytest.raises(AirflowFailException, match="flywheel"):
        task.python_callable()


def test_export_counts_are_its_last_json_line(tmp_path, monkeypatch):
    _fake_flywheel(tmp_path, "print('exporting'); print('{\"read\": 7, \"accepted\": 5, \"duplicates\": 2}')")
    monkeypatch.setattr(orch, "console_script", lambda name: str(tmp_path / name))
    counts = orch.run_export(tmp_path, orch.command_env(tmp_path))
    assert counts["accepted"] == 5 and orch.exported_events(counts) == 5
