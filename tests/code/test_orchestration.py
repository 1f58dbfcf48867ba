"""The orchestration decisions, without Airflow: threshold, watermark, commands and their failures."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from shipped import shipped

from flywheel import orchestration as orch
from flywheel.orchestration import decide

P = shipped("orchestration", min_new_events=100, max_negative_rate_rise=0.1, min_events_for_rate=20)


@pytest.mark.parametrize(
    "new, new_rate, trained_rate, force, retrain, words",
    [
        (100, 0.2, 0.2, False, True, "100 new events since the last training >= min_new_events 100"),
        (99, 0.2, 0.2, False, False, "99 new events since the last training < min_new_events 100"),
        (30, 0.45, 0.2, False, True, "negative-feedback rate rose by 0.250"),
        (30, 0.25, 0.2, False, False, "rise +0.050 <= 0.1"),
        (10, 0.9, 0.2, False, False, "< min_new_events 100"),  # too few events for the rate rule
        (5, None, None, True, True, "forced (the feedback threshold is skipped)"),
        (0, None, None, False, False, "0 new events"),
    ],
)
def test_decide(new, new_rate, trained_rate, force, retrain, words):
    d = decide(new, new_rate, trained_rate, P, force)
    assert d.retrain is retrain and words in d.reason, d.reason


def test_zero_threshold_still_needs_an_event():
    assert not decide(0, None, None, shipped("orchestration", min_new_events=0)).retrain
    assert decide(1, None, None, shipped("orchestration", min_new_events=0)).retrain


def test_unknown_key_fails_naming_it(repo_root, tmp_path):
    import yaml

    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw["orchestration"]["min_new_event"] = 3
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    from flywheel.settings import SettingsError, load_params

    with pytest.raises(SettingsError, match="orchestration.min_new_event: unknown key"):
        load_params(tmp_path / "params.yaml")


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
        orch.run_command(
            [sys.executable, "-c", code],
            tmp_path,
            orch.command_env(tmp_path),
            lines.append,
            what="stage 'validate' (dvc repro)",
        )
    message = str(err.value)
    assert message.startswith("stage 'validate' (dvc repro) failed (exit 3):")
    assert "line 39" in message and "line 14" not in message  # the tail only
    assert "working" in lines and "[stderr] line 0" in lines  # everything streamed to the log


def test_command_env_carries_the_run_ids(tmp_path):
    env = orch.command_env(tmp_path, "manual__2026", profile="tiny", loop_run_id="abc")
    assert env["FLYWHEEL_AIRFLOW_RUN_ID"] == env["AIRFLOW_CTX_DAG_RUN_ID"] == "manual__2026"
    assert env["FLYWHEEL_PROFILE"] == "tiny" and env["FLYWHEEL_PARENT_RUN_ID"] == "abc"
    assert env["FLYWHEEL_ROOT"] == str(tmp_path)


# ---- a task's stage lives and dies inside the task's process tree ----------------------------------------------
# What `dvc repro --single-item X` is to a task: a parent (DVC) running the stage command, which starts a worker
# holding the task's pipes (a data-loader) and one that does not; every pid lands in a file.
_STAGE = """
import os, subprocess, sys, time
workers = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]),
           subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)]
with open(sys.argv[1], "a") as fh:
    fh.write(" ".join(str(p) for p in [os.getpid()] + [w.pid for w in workers]) + " ")
print("stage running", flush=True)
time.sleep(120)
"""
_DVC_LIKE = """
import os, subprocess, sys
with open(sys.argv[2], "a") as fh:
    fh.write(str(os.getpid()) + " ")
sys.exit(subprocess.run([sys.executable, "-c", sys.argv[1], sys.argv[2]]).returncode)
"""


def _stage_like(pids: Path) -> list[str]:
    return [sys.executable, "-c", _DVC_LIKE, _STAGE, str(pids)]


def _wait_for_tree(pids: Path, n: int = 4, wait: float = 60) -> list[int]:
    deadline = time.monotonic() + wait
    while True:
        found = pids.read_text().split() if pids.exists() else []
        if len(found) >= n:
            return [int(x) for x in found]
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    raise AssertionError(f"the stage-like tree did not start: {pids.read_text() if pids.exists() else 'no pids'}")


def _still_running(pids: list[int], wait: float = 10) -> list[int]:
    """The pids still alive after up to ``wait`` seconds (zombies count as gone: only their exit status is left)."""
    deadline = time.monotonic() + wait
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def test_a_timed_out_stage_stops_with_its_children_and_grandchildren(tmp_path, monkeypatch):
    """The DAG task's call (orchestration.run_stage) with a short timeout: the stage command, the stage it runs and
    their workers are all gone when it raises, and it raises promptly (a worker holding the pipes used to keep
    the task waiting for the whole stage while the stage ran on, killed only at its top)."""
    pids_file = tmp_path / "pids"
    monkeypatch.setattr(orch, "stage_command", lambda stage: _stage_like(pids_file))
    lines: list[str] = []
    t0 = time.monotonic()
    try:
        with pytest.raises(orch.CommandFailed, match=r"(?s)stage 'train' \(dvc repro\) failed .*killed after 8 s"):
            orch.run_stage(tmp_path, "train", orch.command_env(tmp_path), lines.append, timeout=8)
        took = time.monotonic() - t0
        pids = _wait_for_tree(pids_file, wait=0)
        assert _still_running(pids) == [], "the timed-out stage left processes behind"
        assert took < 40, f"run_stage took {took:.0f} s to give up"
        assert "stage running" in lines
    finally:
        _kill_all(_wait_for_tree(pids_file, wait=0) if pids_file.exists() else [])


class _TaskTimeout(Exception):
    """What Airflow's ``execution_timeout`` raises inside the task (AirflowTaskTimeout, from a SIGALRM)."""


def test_an_interrupted_task_stops_the_stage_tree(tmp_path):
    """The task's own timeout fires while it waits for the stage: the exception propagates, the tree is gone."""
    pids_file = tmp_path / "pids"

    def alarm(*_):
        raise _TaskTimeout("Timeout, PID: 1")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(8)
    try:
        with pytest.raises(_TaskTimeout):
            orch.run_command(_stage_like(pids_file), tmp_path, orch.command_env(tmp_path), lambda line: None)
        signal.alarm(0)
        assert _still_running(_wait_for_tree(pids_file, wait=0)) == []
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        _kill_all(_wait_for_tree(pids_file, wait=0) if pids_file.exists() else [])


def test_a_kill_of_the_task_reaches_the_stage_tree(tmp_path):
    """Airflow 3 runs each task in its own process group and signals the group (SIGINT, SIGTERM, SIGKILL): the
    stage and its workers are in it (no session or group of their own), so they go with the task."""
    pids_file = tmp_path / "pids"
    task = (
        "import sys; from pathlib import Path; from flywheel import orchestration as orch; "
        "orch.run_command(sys.argv[1:], Path.cwd(), orch.command_env(Path.cwd()), lambda line: None)"
    )
    proc = subprocess.Popen([sys.executable, "-c", task, *_stage_like(pids_file)], cwd=tmp_path, start_new_session=True)
    try:
        pids = _wait_for_tree(pids_file)
        assert {os.getpgid(pid) for pid in pids} == {proc.pid}, "the stage left the task's process group"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert _still_running(pids) == []
    finally:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        _kill_all(_wait_for_tree(pids_file, wait=0) if pids_file.exists() else [])


def test_a_tasks_stage_never_goes_to_a_local_warm_runner(tmp_path, monkeypatch):
    """Whatever the worker's environment says, the stage's command gets FLYWHEEL_WARM=0 and no local runner's
    socket: the task's own runner (in a fresh private folder, gone after the stage), or none with ``warm=False``."""
    env_file = tmp_path / "env.json"
    code = "import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1], 'w'))"
    monkeypatch.setattr(orch, "stage_command", lambda stage: [sys.executable, "-c", code, str(env_file)])
    monkeypatch.setenv("FLYWHEEL_WARM", "1")
    monkeypatch.setenv("FLYWHEEL_WARM_SOCKET", str(tmp_path / "some.sock"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    (tmp_path / "run").mkdir(mode=0o700)
    env = orch.command_env(tmp_path)
    assert "FLYWHEEL_WARM_SOCKET" not in env
    given = {**env, "FLYWHEEL_WARM": "1", "FLYWHEEL_WARM_SOCKET": "x"}
    orch.run_stage(tmp_path, "validate", given, lambda _line: None, warm=False)
    seen = json.loads(env_file.read_text())
    assert seen["FLYWHEEL_WARM"] == "0" and "FLYWHEEL_WARM_SOCKET" not in seen
    orch.run_stage(tmp_path, "validate", given, lambda _line: None)
    seen = json.loads(env_file.read_text())
    sock = Path(seen["FLYWHEEL_WARM_SOCKET"])
    assert seen["FLYWHEEL_WARM"] == "0" and sock.parent.parent == tmp_path / "run" / "flywheel"
    assert not sock.parent.exists(), "the task's runner folder outlived the stage"


# A task's runner: the entry point its child calls (instead of the flywheel CLI) starts the same stage-like tree.
_ENTRY = """
import subprocess, sys


def main():
    sys.exit(subprocess.run([sys.executable, "-c", sys.argv[1], sys.argv[2]]).returncode)
"""
_CLIENT = """
import sys
from flywheel.warm import run_stage
code = run_stage(sys.argv, entry="stage_entry:main")
with open(sys.argv[2], "a") as fh:
    fh.write("" if code is None else "delegated ")
sys.exit(1 if code is None else code)
"""


def test_a_stage_in_the_tasks_runner_stays_in_the_tasks_tree_and_group(tmp_path):
    """With the task's runner, the stage runs in a fork of it: still a descendant of the task and in its process
    group, so a kill of the task's group (what Airflow sends) stops the stage and its workers."""
    (tmp_path / "stage_entry.py").write_text(_ENTRY)
    (tmp_path / "run").mkdir(mode=0o700)
    pids_file = tmp_path / "pids"
    task = (
        "import sys; from pathlib import Path; from flywheel import orchestration as orch; "
        f"orch.stage_command = lambda stage: [sys.executable, '-c', {_CLIENT!r}, {_STAGE!r}, {str(pids_file)!r}]; "
        "env = {**orch.command_env(Path.cwd()), 'PYTHONPATH': str(Path.cwd()), 'XDG_RUNTIME_DIR': sys.argv[1]}; "
        "orch.run_stage(Path.cwd(), 'train', env, lambda line: None, entry='stage_entry:main')"
    )
    proc = subprocess.Popen([sys.executable, "-c", task, str(tmp_path / "run")], cwd=tmp_path, start_new_session=True)
    try:
        pids = _wait_for_tree(pids_file, n=3)
        tree = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        assert set(pids) <= tree, "the stage is not under the task"
        runner = [p for p in psutil.Process(proc.pid).children() if "flywheel.warm_runner" in " ".join(p.cmdline())]
        assert runner and pids[0] in {c.pid for c in runner[0].children(recursive=True)}, "not run by the runner"
        assert {os.getpgid(pid) for pid in pids} == {proc.pid}, "the stage left the task's process group"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert _still_running(pids + [runner[0].pid]) == []
    finally:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        _kill_all(_wait_for_tree(pids_file, n=3, wait=0) if pids_file.exists() else [])


def test_a_stage_in_the_tasks_runner_reports_its_exit_status(tmp_path):
    """The task's runner runs the stage and hands back its exit status (a failed stage fails the task)."""
    (tmp_path / "stage_entry.py").write_text(_ENTRY)
    (tmp_path / "run").mkdir(mode=0o700)
    out = tmp_path / "out"
    env = {**orch.command_env(tmp_path), "PYTHONPATH": str(tmp_path), "XDG_RUNTIME_DIR": str(tmp_path / "run")}
    for code, fails in ((0, False), (3, True)):
        stage = f"import sys; sys.exit({code})"
        cmd = [sys.executable, "-c", _CLIENT, stage, str(out)]
        with contextlib.ExitStack() as stack:
            stack.enter_context(pytest.MonkeyPatch.context()).setattr(orch, "stage_command", lambda _s, c=cmd: c)
            if fails:
                stack.enter_context(pytest.raises(orch.CommandFailed, match="failed"))
            orch.run_stage(tmp_path, "train", env, lambda _line: None, entry="stage_entry:main")
    assert out.read_text().split() == ["delegated", "delegated"]


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


@pytest.mark.parametrize(
    "body",
    [None, "print(\"Error: No such command 'export'.\", file=sys.stderr); sys.exit(2)"],
    ids=["no-executable", "no-export-command"],
)
def test_the_export_task_fails_not_skips_on_a_broken_install(tmp_path, monkeypatch, body):
    """feedback_ingest's task: a missing executable or command fails it (a skip reads as "no new feedback")."""
    import importlib.util

    from airflow.sdk.exceptions import AirflowFailException

    if body:
        _fake_flywheel(tmp_path, body)
    monkeypatch.setattr(orch, "console_script", lambda name: str(tmp_path / name))
    monkeypatch.setattr(orch, "synced", lambda root, env, run_id, task_id, state, work, **kw: (work(), None))
    spec = importlib.util.spec_from_file_location(
        "feedback_ingest_dag", Path(orch.__file__).parents[1] / "dags" / "feedback_ingest.py"
    )
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
