"""The warm stage runner: a command handed to it runs with the caller's arguments, working directory,
environment and standard streams, and the caller exits with its status; without a runner, nothing changes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flywheel import warm

FLYWHEEL = str(Path(sys.executable).with_name("flywheel"))


@pytest.fixture
def runner(tmp_path):
    path = str(Path("/tmp") / f"fw-test-{os.getpid()}-{time.monotonic_ns()}.sock")
    proc = subprocess.Popen([sys.executable, "-m", "flywheel.warm", path, "--idle-timeout", "60", "--no-preload"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while not warm._answers(path):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.05)
    yield path, proc
    proc.terminate()
    proc.wait(10)
    assert not Path(path).exists(), "the runner left its socket behind"


def _run(args, cwd, env):
    return subprocess.run([FLYWHEEL, *args], cwd=cwd, env=env, text=True, capture_output=True, timeout=120)


def test_a_stage_command_runs_in_the_runner_with_the_callers_cwd_env_and_streams(runner, tmp_path, repo_root):
    path, proc = runner
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "params.yaml").write_text((repo_root / "params.yaml").read_text())
    env = {**os.environ, "FLYWHEEL_ROOT": str(ws), warm.SOCKET_ENV: path}
    # a bad setting in the caller's environment: the child sees it, fails naming it, the caller exits 2
    bad = _run(["stage", "bless", "--metrics", "m.json", "--out", "b.json"], ws,
               {**env, "FLYWHEEL_TRACKING_URI": "ftp://nowhere"})
    assert bad.returncode == 2 and "tracking_uri" in bad.stderr, bad
    # a usage error: the caller's stderr, status 2
    usage = _run(["stage", "no-such-stage"], ws, env)
    assert usage.returncode == 2 and "No such command" in usage.stderr and "Usage: flywheel stage" in usage.stderr
    # help on the caller's stdout, status 0
    ok = _run(["stage", "--help"], ws, env)
    assert ok.returncode == 0 and "validate" in ok.stdout and ok.stderr == ""
    assert proc.poll() is None, "the runner itself must survive every command"
    proc.terminate()
    log = proc.communicate(timeout=10)[0]
    assert log.count("stage bless started") == 1 and log.count("stage no-such-stage started") == 1, log
    assert log.count(": exit 2") == 2 and log.count(": exit 0") == 1, log


def test_delegate_returns_the_status_and_children_are_reaped(runner, tmp_path):
    path, proc = runner
    code = ("import os, sys; from flywheel import warm; sys.argv = ['flywheel', 'stage', '--help'];"
            f"print('CALLER', os.getpid()); sys.exit(warm.delegate({path!r}, sys.argv))")
    out = subprocess.run([sys.executable, "-c", code], text=True, capture_output=True, timeout=60)
    assert out.returncode == 0 and "Usage: flywheel stage" in out.stdout
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)], text=True, capture_output=True).stdout
    assert children.strip() == "", "finished children are reaped"


def test_without_a_runner_the_command_runs_in_its_own_process(tmp_path):
    missing = str(tmp_path / "none.sock")
    assert warm.delegate(missing, ["flywheel", "stage", "--help"]) is None
    out = _run(["stage", "--help"], tmp_path, {**os.environ, warm.SOCKET_ENV: missing})
    assert out.returncode == 0 and "validate" in out.stdout


def test_socket_paths_are_short_and_per_workspace(tmp_path):
    a, b = warm.socket_path(tmp_path / ("x" * 200)), warm.socket_path(tmp_path / "y")
    assert a != b and len(a) < 100 and warm.socket_path(tmp_path / "y") == b


def _workspace(tmp_path, repo_root, name="ws", **orchestration):
    ws = tmp_path / name
    ws.mkdir()
    import yaml

    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    params["orchestration"].update(orchestration)
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    return ws


def _runner_pids(path):
    out = subprocess.run(["pgrep", "-f", f"flywheel.warm {path}"], text=True, capture_output=True).stdout
    return sorted(int(x) for x in out.split())


def test_a_plain_stage_command_starts_the_workspaces_runner_once_and_reuses_it(tmp_path, repo_root):
    """What `dvc repro` runs (`flywheel stage X`, no socket in the environment) finds or starts the runner."""
    ws = _workspace(tmp_path, repo_root, warm_idle_seconds=30)
    path = warm.socket_path(ws)
    env = {k: v for k, v in os.environ.items() if k not in (warm.SOCKET_ENV, "FLYWHEEL_WARM", "FLYWHEEL_ROOT")}
    try:
        assert _run(["stage", "--help"], ws, env).returncode == 0
        assert not warm._answers(path), "help alone starts no runner"
        # two stage commands at once: one runner starts, both run in it
        procs = [subprocess.Popen([FLYWHEEL, "stage", "no-such-stage"], cwd=ws, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
        outs = [p.communicate(timeout=180) for p in procs]
        assert [p.returncode for p in procs] == [2, 2] and all("No such command" in e for _, e in outs), outs
        assert warm._answers(path)
        pids = _runner_pids(path)
        assert len(pids) == 1 and Path(path + ".pid").read_text() == str(pids[0])
        assert _run(["stage", "no-such-stage"], ws, env).returncode == 2
        assert _runner_pids(path) == pids, "the next command reuses the runner"
        log = (Path(path).parent / (Path(path).stem + ".log")).read_text()
        assert log.count("stage no-such-stage started") == 3, log
    finally:
        warm.stop(path)
    deadline = time.monotonic() + 30
    while Path(path).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(path).exists()


@pytest.mark.parametrize("how", ["env", "params"])
def test_no_runner_is_started_when_turned_off(tmp_path, repo_root, how):
    ws = _workspace(tmp_path, repo_root, **({"warm_runner": False} if how == "params" else {}))
    env = {k: v for k, v in os.environ.items() if k not in (warm.SOCKET_ENV, "FLYWHEEL_WARM", "FLYWHEEL_ROOT")}
    if how == "env":
        env["FLYWHEEL_WARM"] = "0"
    out = _run(["stage", "no-such-stage"], ws, env)
    assert out.returncode == 2 and "No such command" in out.stderr
    assert not warm._answers(warm.socket_path(ws)) and _runner_pids(warm.socket_path(ws)) == []


def test_the_socket_changes_when_the_installed_libraries_change(tmp_path, monkeypatch):
    """After a `pip install`, a runner that imported the old libraries is not used (its socket is another)."""
    libs = tmp_path / "site-packages"
    libs.mkdir()
    monkeypatch.setattr(warm.sysconfig, "get_paths", lambda: {"purelib": str(libs)})
    before = warm.socket_path(tmp_path)
    assert warm.socket_path(tmp_path) == before
    (libs / "newpkg-1.0.dist-info").mkdir()
    os.utime(libs, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert warm.socket_path(tmp_path) != before


def test_the_profile_sets_the_idle_time(tmp_path, repo_root):
    ws = _workspace(tmp_path, repo_root)
    import yaml

    params = yaml.safe_load((ws / "params.yaml").read_text())
    (ws / "params.yaml").write_text(yaml.safe_dump({**params, "profile": "tiny"}))
    assert warm.workspace({"FLYWHEEL_ROOT": str(ws)}) == (ws.resolve(), 120.0)
    assert warm.workspace({"FLYWHEEL_ROOT": str(ws), "FLYWHEEL_PROFILE": "demo"}) == (ws.resolve(), 600.0)
    assert warm.workspace({"FLYWHEEL_ROOT": str(ws), "FLYWHEEL_WARM": "0"}) is None
