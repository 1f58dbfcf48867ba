"""The warm stage runner (local `dvc repro` only): a command handed to it runs with the caller's arguments, working
directory, environment and standard streams, calls the entry point it was handed, and the caller exits with its
status; one runner per workspace and environment, in a private folder; without a runner, nothing changes."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from flywheel import warm

FLYWHEEL = str(Path(sys.executable).with_name("flywheel"))
CLI = "flywheel.cli:main"


@pytest.fixture
def private(monkeypatch):
    """A short private folder (Unix socket paths are limited) used as $XDG_RUNTIME_DIR by this test and the
    processes it starts: their runners never mix with the user's."""
    folder = Path(tempfile.mkdtemp(prefix="fw"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(folder))
    yield folder
    for pid_file in folder.glob("flywheel/*.sock.pid"):
        warm.stop(str(pid_file)[: -len(".pid")])
    shutil.rmtree(folder, ignore_errors=True)


def _start(path: str, env: dict[str, str], entry: str = CLI) -> subprocess.Popen:
    proc = subprocess.Popen(
        warm.runner_command(path, entry, 60, preload=False),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not warm._answers(path):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.05)
    return proc


@pytest.fixture
def runner(private, tmp_path):
    """A runner started by hand (no preload) in the private folder, with this process's environment plus the
    workspace ``tmp_path/ws``; yields (socket, process, the callers' environment)."""
    ws = tmp_path / "ws"
    ws.mkdir()
    env = {**os.environ, "FLYWHEEL_ROOT": str(ws)}
    path = str(warm.private_dir(env) / "t.sock")
    proc = _start(path, env)
    yield path, proc, {**env, warm.SOCKET_ENV: path}
    proc.terminate()
    proc.wait(10)
    assert not Path(path).exists(), "the runner left its socket behind"


def _run(args, cwd, env):
    return subprocess.run([FLYWHEEL, *args], cwd=cwd, env=env, text=True, capture_output=True, timeout=120)


def test_a_stage_command_runs_in_the_runner_with_the_callers_cwd_env_and_streams(runner, tmp_path, repo_root):
    path, proc, env = runner
    ws = tmp_path / "ws"
    (ws / "params.yaml").write_text((repo_root / "params.yaml").read_text())
    # a usage error: the caller's stderr, status 2
    usage = _run(["stage", "no-such-stage"], ws, env)
    assert usage.returncode == 2 and "No such command" in usage.stderr and "Usage: flywheel stage" in usage.stderr
    # help on the caller's stdout, status 0; what differs per command (DVC's stage name, the shell's) is no other env
    ok = _run(["stage", "--help"], ws, {**env, "DVC_STAGE": "validate", "SHLVL": "7"})
    assert ok.returncode == 0 and "validate" in ok.stdout and ok.stderr == ""
    # another environment (a bad setting): the runner refuses it, the command runs in the caller's own process,
    # which sees the setting and fails naming it
    bad = _run(
        ["stage", "bless", "--metrics", "m.json", "--out", "b.json"],
        ws,
        {**env, "FLYWHEEL_TRACKING_URI": "ftp://nowhere"},
    )
    assert bad.returncode == 2 and "tracking_uri" in bad.stderr, bad
    assert proc.poll() is None, "the runner itself must survive every command"
    proc.terminate()
    log = proc.communicate(timeout=10)[0]
    assert log.count("stage no-such-stage started") == 1 and log.count("stage --help started") == 1, log
    assert log.count("refused stage bless: another environment") == 1 and "stage bless started" not in log, log
    assert log.count(": exit 2") == 1 and log.count(": exit 0") == 1, log


PROBE = """
import json, os, sys

def main():
    print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "pid": os.getpid(), "pgid": os.getpgid(0),
                      "stage": os.environ.get("DVC_STAGE"), "stdin": sys.stdin.read(),
                      "cli_loaded": [m for m in sys.modules if m == "flywheel.cli" or m.startswith("flywheel.cli.")]}))
    sys.exit(int(os.environ.get("PROBE_EXIT", "0")))
"""


def test_the_child_calls_the_entry_point_it_was_handed(private, tmp_path):
    """``--entry module:function`` is imported in the child, at request time: the runner itself imported neither it
    nor the CLI; the child is the caller (argv, cwd, stdin/stdout, the per-command variables) in its own process
    group, and the caller exits with its status."""
    (tmp_path / "probe_entry.py").write_text(PROBE)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "PROBE_EXIT": "3"}
    path = str(warm.private_dir(env) / "p.sock")
    proc = _start(path, env, entry="probe_entry:main")
    try:
        here = tmp_path / "here"
        here.mkdir()
        code = f"import sys; from flywheel import warm; sys.exit(warm.delegate({path!r}, sys.argv))"
        out = subprocess.run(
            [sys.executable, "-c", code, "stage", "x"],
            cwd=here,
            input="from the caller",
            env={**env, "DVC_STAGE": "train_policy"},
            text=True,
            capture_output=True,
            timeout=60,
        )
        assert out.returncode == 3, out
        seen = json.loads(out.stdout.strip().splitlines()[-1])
        assert seen["argv"][1:] == ["stage", "x"] and Path(seen["cwd"]) == here.resolve()
        assert seen["stage"] == "train_policy" and seen["stdin"] == "from the caller"
        assert seen["pid"] != proc.pid and seen["pgid"] == seen["pid"], seen
        assert seen["cli_loaded"] == [], "the runner must not import the CLI"
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_runner_refuses_a_folder_others_can_write(tmp_path):
    shared = Path(tempfile.mkdtemp(prefix="fw"))
    try:
        shared.chmod(0o777)
        proc = subprocess.run(
            [sys.executable, "-m", "flywheel.warm_runner", str(shared / "s.sock"), "--entry", CLI, "--no-preload"],
            text=True,
            capture_output=True,
            timeout=60,
        )
        assert proc.returncode != 0 and "writable by others" in proc.stderr, proc
        assert not (shared / "s.sock").exists()
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_delegate_returns_the_status_and_children_are_reaped(runner, tmp_path):
    path, proc, env = runner
    code = (
        "import os, sys; from flywheel import warm; sys.argv = ['flywheel', 'stage', '--help'];"
        f"print('CALLER', os.getpid()); sys.exit(warm.delegate({path!r}, sys.argv))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, text=True, capture_output=True, timeout=60)
    assert out.returncode == 0 and "Usage: flywheel stage" in out.stdout
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)], text=True, capture_output=True).stdout
    assert children.strip() == "", "finished children are reaped"
    assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0, "the socket is its owner's only"


def test_without_a_runner_the_command_runs_in_its_own_process(tmp_path):
    missing = str(tmp_path / "none.sock")
    assert warm.delegate(missing, ["flywheel", "stage", "--help"]) is None
    out = _run(["stage", "--help"], tmp_path, {**os.environ, warm.SOCKET_ENV: missing})
    assert out.returncode == 0 and "validate" in out.stdout


def test_socket_paths_are_short_and_per_workspace_and_environment(tmp_path):
    env = {"PATH": "/usr/bin", "HOME": "/home/u", "XDG_RUNTIME_DIR": str(tmp_path)}
    a, b = warm.socket_path(tmp_path / ("x" * 200), env), warm.socket_path(tmp_path / "y", env)
    assert a != b and len(a) < 100 and warm.socket_path(tmp_path / "y", env) == b
    assert Path(b).parent == tmp_path / "flywheel"
    # what changes from one command to the next of the same run: the same runner
    per_command = {
        **env,
        "PWD": "/elsewhere",
        "OLDPWD": "/x",
        "SHLVL": "3",
        "_": "/usr/bin/dvc",
        "DVC_STAGE": "bless",
        "DVC_ROOT": "/w",
        "FLYWHEEL_PARENT_RUN_ID": "abc",
        warm.SOCKET_ENV: "/s",
        "PS1": "(.venv) ",  # an activated venv exports it; DVC's stage commands do not get it
    }
    assert warm.socket_path(tmp_path / "y", per_command) == b
    # anything else: another runner
    for name, value in (("PATH", "/opt/bin:/usr/bin"), ("CUDA_VISIBLE_DEVICES", "1"), ("OMP_NUM_THREADS", "2")):
        assert warm.socket_path(tmp_path / "y", {**env, name: value}) != b, name


def test_the_private_folder_is_made_0700_and_refused_when_others_could_use_it(tmp_path, monkeypatch):
    runtime = tmp_path / "run"
    runtime.mkdir()
    folder = warm.private_dir({"XDG_RUNTIME_DIR": str(runtime)})
    assert folder == runtime / "flywheel" and stat.S_IMODE(folder.stat().st_mode) == 0o700
    cache = tmp_path / "cache"
    folder = warm.private_dir({"XDG_CACHE_HOME": str(cache)})
    assert folder == cache / "flywheel" / "warm" and stat.S_IMODE(folder.stat().st_mode) == 0o700
    folder.chmod(0o770)
    with pytest.raises(warm.UnsafeRuntimeDir, match="writable by others"):
        warm.private_dir({"XDG_CACHE_HOME": str(cache)})
    folder.chmod(0o700)
    monkeypatch.setattr(warm.os, "getuid", lambda: os.stat(folder).st_uid + 1)
    with pytest.raises(warm.UnsafeRuntimeDir, match="not to you"):
        warm.private_dir({"XDG_CACHE_HOME": str(cache)})
    monkeypatch.undo()
    elsewhere = tmp_path / "link"
    (elsewhere / "flywheel").mkdir(parents=True)
    (elsewhere / "flywheel" / "warm").symlink_to(tmp_path / "run")
    with pytest.raises(warm.UnsafeRuntimeDir, match="not a folder"):
        warm.private_dir({"XDG_CACHE_HOME": str(elsewhere)})


def _workspace(tmp_path, repo_root, name="ws", **orchestration):
    ws = tmp_path / name
    ws.mkdir()
    import yaml

    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    params["orchestration"].update(orchestration)
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    return ws


def _runner_pids(path):
    """The runners listening on ``path``: processes of that command line whose parent is not one of them (a stage
    child forked by the runner has the same command line until it exits, later on a loaded machine)."""
    out = subprocess.run(["pgrep", "-f", f"flywheel.warm_runner {path}"], text=True, capture_output=True).stdout
    found = {int(x) for x in out.split()}
    parents = {}
    for pid in found:
        try:
            parents[pid] = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            pass
    return sorted(pid for pid, ppid in parents.items() if ppid not in found)


def _plain_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in (warm.SOCKET_ENV, "FLYWHEEL_WARM", "FLYWHEEL_ROOT")}
    return {**env, **extra}


def _gone(path, wait=180):  # a loaded machine: the runner may be mid-import of torch when signalled
    deadline = time.monotonic() + wait
    while Path(path).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return not Path(path).exists()


def test_a_plain_stage_command_starts_the_runner_of_its_environment_once_and_reuses_it(private, tmp_path, repo_root):
    """What `dvc repro` runs (`flywheel stage X`, no socket in the environment) finds or starts the runner of its
    workspace and environment; another environment gets a runner of its own."""
    ws = _workspace(tmp_path, repo_root, warm_idle_seconds=30)
    env = _plain_env()
    path = warm.socket_path(ws, env)
    other_env = _plain_env(FLYWHEEL_TEST_MARK="other")
    other = warm.socket_path(ws, other_env)
    assert Path(path).parent == private / "flywheel" and other != path
    try:
        assert _run(["stage", "--help"], ws, env).returncode == 0
        assert not warm._answers(path), "help alone starts no runner"
        # two stage commands at once: one runner starts, both run in it
        procs = [
            subprocess.Popen(
                [FLYWHEEL, "stage", "no-such-stage"],
                cwd=ws,
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for _ in range(2)
        ]
        outs = [p.communicate(timeout=180) for p in procs]
        assert [p.returncode for p in procs] == [2, 2] and all("No such command" in e for _, e in outs), outs
        assert warm._answers(path)
        pids = _runner_pids(path)
        assert len(pids) == 1 and warm._pid_of(path) == pids[0]
        assert stat.S_IMODE(os.stat(private / "flywheel").st_mode) == 0o700
        # the next command of the same run (DVC's and the shell's per-command variables differ) reuses it
        assert _run(["stage", "no-such-stage"], ws, {**env, "DVC_STAGE": "bless", "SHLVL": "2"}).returncode == 2
        assert _runner_pids(path) == pids, "the next command reuses the runner"
        log = Path(path[: -len(".sock")] + ".log").read_text()
        assert log.count("stage no-such-stage started") == 3, log
        # another environment: its own runner
        assert not warm._answers(other)
        assert _run(["stage", "no-such-stage"], ws, other_env).returncode == 2
        assert warm._answers(other) and _runner_pids(other) and _runner_pids(path) == pids
        assert sorted(warm.runners(ws)) == sorted([path, other]) and warm.stop_workspace(ws) == 2
    finally:
        warm.stop(path)
        warm.stop(other)
    assert _gone(path) and _gone(other)


def test_a_folder_others_can_write_gets_no_runner(private, tmp_path, repo_root):
    ws = _workspace(tmp_path, repo_root)
    (private / "flywheel").mkdir(mode=0o700)
    (private / "flywheel").chmod(0o777)
    out = _run(["stage", "no-such-stage"], ws, _plain_env())
    assert out.returncode == 2 and "No such command" in out.stderr, out
    assert "warning: no warm runner" in out.stderr and "writable by others" in out.stderr, out.stderr
    assert list((private / "flywheel").iterdir()) == []


@pytest.mark.parametrize("how", ["env", "params"])
def test_no_runner_is_started_when_turned_off(private, tmp_path, repo_root, how):
    ws = _workspace(tmp_path, repo_root, **({"warm_runner": False} if how == "params" else {}))
    env = _plain_env(**({"FLYWHEEL_WARM": "0"} if how == "env" else {}))
    out = _run(["stage", "no-such-stage"], ws, env)
    assert out.returncode == 2 and "No such command" in out.stderr
    path = warm.socket_path(ws, env)
    assert not warm._answers(path) and _runner_pids(path) == []


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


def test_a_childs_exit_reaches_its_caller_at_once_not_at_the_next_poll(private, tmp_path):
    """The runner hears a child's exit from its pidfd: with the loop's poll set to a minute, a command that exits at
    once still returns its status to the caller in seconds (it waited for the poll before: up to 0.2 s of every
    stage, a tenth of the no-op `dvc repro` budget)."""
    (tmp_path / "probe_entry.py").write_text(PROBE)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "PROBE_EXIT": "5"}
    path = str(warm.private_dir(env) / "q.sock")
    slow_poll = (
        "import sys; from flywheel import warm_runner as w; w.POLL_SECONDS = 60.0;"
        f"sys.argv = ['warm_runner', {path!r}, '--entry', 'probe_entry:main', '--no-preload']; w.main()"
    )
    proc = subprocess.Popen([sys.executable, "-c", slow_poll], env=env, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not warm._answers(path):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        code = f"import sys; from flywheel import warm; sys.exit(warm.delegate({path!r}, ['flywheel', 'stage', 'x']))"
        started = time.monotonic()
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, input="", text=True, capture_output=True, timeout=90
        )
        assert out.returncode == 5, out
        assert time.monotonic() - started < 30, "the caller waited for the runner's next poll"
    finally:
        proc.terminate()
        proc.wait(10)


def test_dvc_reads_yaml_with_the_c_parser():
    """DVC parses params.yaml once per stage that lists params, and dvc.yaml and dvc.lock besides: with ruamel.yaml's
    C parser (infra/requirements.txt) that is 5x faster, 0.4 s of the no-op `dvc repro` measured here."""
    from ruamel.yaml import YAML
    from ruamel.yaml.main import CParser

    assert CParser is not None, "ruamel.yaml.clib is not installed"
    assert YAML(typ="safe").Parser is CParser  # what dvc.utils.serialize.parse_yaml uses
