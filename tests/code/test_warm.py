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
