"""The DVC remote between workers: a task's outputs and its workspace state (dvc.lock, .dvc pointers) reach
another clone through the remote alone; without a remote nothing is synced."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import orchestration as orch
from pipelines import remote

DVC = str(Path(sys.executable).with_name("dvc"))

DVC_YAML = """stages:
  double:
    cmd: python -c "import pathlib; n = int(pathlib.Path('data/in.txt').read_text()); pathlib.Path('out').mkdir(exist_ok=True); pathlib.Path('out/double.txt').write_text(str(2 * n))"
    deps: [data/in.txt]
    outs: [out]
"""


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLYWHEEL_", "AIRFLOW"))}
    env.update(DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@e", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@e", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return env


def _clone(src: Path, dest: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(src), str(dest)], check=True, env=_env())
    return dest


@pytest.fixture
def origin(tmp_path):
    """A git + DVC repository with one stage, committed (what each worker clones)."""
    root = tmp_path / "origin"
    root.mkdir()
    for cmd in (["git", "init", "-q", "-b", "main"], [DVC, "init", "-q"]):
        subprocess.run(cmd, cwd=root, check=True, env=_env())
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / "data").mkdir()
    subprocess.run(["git", "add", "-A"], cwd=root, check=True, env=_env())
    subprocess.run(["git", "commit", "-qm", "init"], cwd=root, check=True, env=_env())
    return root


def test_outputs_and_state_travel_through_the_remote_only(origin, tmp_path):
    url = str(tmp_path / "remote")
    a, b = _clone(origin, tmp_path / "worker-a"), _clone(origin, tmp_path / "worker-b")
    env = _env()
    # worker a: new data tracked, the stage run, both pushed, the state published
    (a / "data").mkdir(exist_ok=True)
    (a / "data/in.txt").write_text("21")
    subprocess.run([DVC, "add", "-q", "data/in.txt"], cwd=a, check=True, env=env)
    remote.sync_in(a, url, env, None)
    subprocess.run([DVC, "repro", "-q"], cwd=a, check=True, env=env)
    state = remote.sync_out(a, url, env, "run/1", "double", targets=None)
    assert set(state) == {"dvc.lock", "data/in.txt.dvc"}
    assert (a / ".dvc/config.local").is_file() and "flywheel" in (a / ".dvc/config.local").read_text()
    assert not (b / "out").exists() and not (b / "data/in.txt").exists()
    # worker b, handed the state (as through XCom): the data and the output arrive, nothing is stale
    remote.sync_in(b, url, env, state)
    assert (b / "out/double.txt").read_text() == "42" and (b / "data/in.txt").read_text() == "21"
    status = subprocess.run([DVC, "status", "--json"], cwd=b, env=env, text=True, capture_output=True, check=True)
    assert json.loads(status.stdout) == {}
    # a third worker handed nothing gets the latest published state; a run's state is kept by task
    c = _clone(origin, tmp_path / "worker-c")
    remote.sync_in(c, url, env, None)
    assert (c / "out/double.txt").read_text() == "42"
    assert remote.fetch_state(url, env, "run/1", "double") == state
    assert remote.fetch_state(url, env, "run/1") == state and remote.fetch_state(url, env, "run/2") is None
    # a later task of the same run: the run's state is now its, the earlier task's is kept
    later = {**state, "dvc.lock": state["dvc.lock"] + "# later\n"}
    remote.publish_state(url, later, "run/1", "bless", env)
    assert remote.fetch_state(url, env, "run/1") == later == remote.fetch_state(url, env)
    assert remote.fetch_state(url, env, "run/1", "double") == state


def test_a_state_naming_a_path_outside_the_workspace_is_refused(tmp_path):
    with pytest.raises(remote.RemoteError, match="outside the workspace"):
        remote.write_state(tmp_path, {"../evil.lock": "x"})
    assert not (tmp_path.parent / "evil.lock").exists()


def test_state_skips_hidden_folders_and_keeps_extra_files(tmp_path):
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data/raw.dvc").write_text("outs: []\n")
    (tmp_path / ".venv/lib").mkdir(parents=True)
    (tmp_path / ".venv/lib/pkg.dvc").write_text("not ours\n")
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports/mark.json").write_text("{}")
    state = remote.read_state(tmp_path, [tmp_path / "reports/mark.json", tmp_path / "reports/missing.json"])
    assert state == {"dvc.lock": "schema: '2.0'\n", "data/raw.dvc": "outs: []\n", "reports/mark.json": "{}"}
    assert remote.write_state(tmp_path, state) == []            # unchanged files are not rewritten


def test_without_a_remote_the_work_runs_alone(tmp_path, repo_root):
    (tmp_path / "params.yaml").write_text((repo_root / "params.yaml").read_text())
    calls = []
    result, state = orch.synced(tmp_path, {"PATH": os.environ["PATH"]}, "r", "t", None,
                                lambda: calls.append(1) or "done")
    assert (result, state, calls) == ("done", None, [1])
    assert not (tmp_path / ".dvc").exists()


def test_an_unreachable_remote_fails_naming_the_command(origin, tmp_path):
    a = _clone(origin, tmp_path / "worker-a")
    env = {**_env(), "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard"}
    (a / "data").mkdir(exist_ok=True)
    (a / "data/in.txt").write_text("1")
    subprocess.run([DVC, "add", "-q", "data/in.txt"], cwd=a, check=True, env=env)
    remote.configure(a, "s3://nowhere/dvc", env)
    with pytest.raises(remote.RemoteError, match="dvc push"):
        remote.sync_out(a, "s3://nowhere/dvc", env, "r", "t")


def test_flywheel_restore_brings_back_a_runs_state_and_data(origin, tmp_path, repo_root):
    url = str(tmp_path / "remote")
    env = _env()
    a = _clone(origin, tmp_path / "worker-a")
    (a / "data").mkdir(exist_ok=True)
    (a / "data/in.txt").write_text("5")
    subprocess.run([DVC, "add", "-q", "data/in.txt"], cwd=a, check=True, env=env)
    remote.sync_in(a, url, env, None)
    subprocess.run([DVC, "repro", "-q"], cwd=a, check=True, env=env)
    remote.sync_out(a, url, env, "manual__1", "bless")
    fresh = _clone(origin, tmp_path / "fresh")
    (fresh / "params.yaml").write_text((repo_root / "params.yaml").read_text())
    flywheel = str(Path(sys.executable).with_name("flywheel"))
    cli_env = {**env, "FLYWHEEL_ROOT": str(fresh), "FLYWHEEL_DVC_REMOTE": url}
    missing = subprocess.run([flywheel, "restore", "--run-id", "manual__2"], cwd=fresh, env=cli_env, text=True,
                             capture_output=True)
    assert missing.returncode == 2 and "no workspace state of run 'manual__2'" in missing.stderr
    ok = subprocess.run([flywheel, "restore", "--run-id", "manual__1"], cwd=fresh, env=cli_env, text=True,
                        capture_output=True)
    assert ok.returncode == 0, ok.stderr
    assert (fresh / "out/double.txt").read_text() == "10" and (fresh / "dvc.lock").read_text() == (a / "dvc.lock").read_text()
    unset = subprocess.run([flywheel, "restore", "--run-id", "manual__1"], cwd=fresh,
                           env={**cli_env, "FLYWHEEL_DVC_REMOTE": ""}, text=True, capture_output=True)
    assert unset.returncode == 2 and "dvc_remote is not set" in unset.stderr
