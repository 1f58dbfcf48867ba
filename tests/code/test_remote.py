"""The DVC remote between workers: a task's outputs and its workspace state (dvc.lock, .dvc pointers) reach
another clone through the remote alone; without a remote nothing is synced."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flywheel import orchestration as orch
from flywheel import remote

DVC = str(Path(sys.executable).with_name("dvc"))

DVC_YAML = """stages:
  double:
    cmd: python -c "import pathlib; n = int(pathlib.Path('data/in.txt').read_text()); pathlib.Path('out').mkdir(exist_ok=True); pathlib.Path('out/double.txt').write_text(str(2 * n))"
    deps: [data/in.txt]
    outs: [out]
"""


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLYWHEEL_", "AIRFLOW"))}
    env.update(
        DVC_NO_ANALYTICS="1",
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@e",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@e",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    )
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
    assert remote.write_state(tmp_path, state, [tmp_path / "reports/mark.json"]) == []  # unchanged: not rewritten


def test_without_a_remote_the_work_runs_alone(tmp_path, repo_root):
    (tmp_path / "params.yaml").write_text((repo_root / "params.yaml").read_text())
    calls = []
    result, state = orch.synced(
        tmp_path, {"PATH": os.environ["PATH"]}, "r", "t", None, lambda: calls.append(1) or "done"
    )
    assert (result, state, calls) == ("done", None, [1])
    assert not (tmp_path / ".dvc").exists()


def test_an_unreachable_remote_fails_naming_the_command(origin, tmp_path):
    a = _clone(origin, tmp_path / "worker-a")
    env = {
        **_env(),
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_MAX_ATTEMPTS": "1",
        "AWS_RETRY_MODE": "standard",
    }
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
    missing = subprocess.run(
        [flywheel, "restore", "--run-id", "manual__2"], cwd=fresh, env=cli_env, text=True, capture_output=True
    )
    assert missing.returncode == 2 and "no workspace state of run 'manual__2'" in missing.stderr
    ok = subprocess.run(
        [flywheel, "restore", "--run-id", "manual__1"], cwd=fresh, env=cli_env, text=True, capture_output=True
    )
    assert ok.returncode == 0, ok.stderr
    assert (fresh / "out/double.txt").read_text() == "10" and (fresh / "dvc.lock").read_text() == (
        a / "dvc.lock"
    ).read_text()
    unset = subprocess.run(
        [flywheel, "restore", "--run-id", "manual__1"],
        cwd=fresh,
        env={**cli_env, "FLYWHEEL_DVC_REMOTE": ""},
        text=True,
        capture_output=True,
    )
    assert unset.returncode == 2 and "dvc_remote is not set" in unset.stderr


# ---- item 7: a state may write only dvc.lock, data pointers and the watermark --------------------------------------

POINTER = "outs:\n- md5: 0123456789abcdef0123456789abcdef.dir\n  size: 1\n  nfiles: 1\n  hash: md5\n  path: raw\n"


@pytest.mark.parametrize(
    "rel,text,why",
    [
        ("pipelines/validate.py", "import os\n", "only dvc.lock"),
        ("dvc.yaml", "stages: {}\n", "only dvc.lock"),
        ("params.yaml", "x: 1\n", "only dvc.lock"),
        ("/tmp/evil.dvc", POINTER, "outside the workspace"),
        ("../evil.dvc", POINTER, "outside the workspace"),
        ("data/../../evil.dvc", POINTER, "outside the workspace"),
        (".git/hooks/post-checkout.dvc", POINTER, "outside the workspace"),
        (".dvc/config.dvc", POINTER, "outside the workspace"),
        ("data/raw.dvc", POINTER.replace("path: raw", "path: ../pipelines"), "which git tracks"),
        ("data/raw.dvc", POINTER.replace("path: raw", "path: ../../outside"), "outside the workspace"),
        ("data/raw.dvc", "deps:\n- path: https://example.com/x\nouts:\n- path: raw\n", "not a data pointer"),
        ("data/raw.dvc", "outs: [\n", "not valid YAML"),
    ],
)
def test_a_state_writing_anything_but_lock_pointers_and_watermark_is_refused(origin, rel, text, why):
    (origin / "pipelines").mkdir()
    (origin / "pipelines/validate.py").write_text("# the real code\n")
    subprocess.run(["git", "add", "-A"], cwd=origin, check=True, env=_env())
    before = {p: p.read_bytes() for p in origin.rglob("*") if p.is_file() and ".git" not in p.parts}
    state = {"dvc.lock": "schema: '2.0'\n", rel: text}  # a good file first: nothing may be written at all
    with pytest.raises(remote.RemoteError, match=why):
        remote.write_state(origin, state, [origin / "reports/orchestration/last_training.json"])
    after = {p: p.read_bytes() for p in origin.rglob("*") if p.is_file() and ".git" not in p.parts}
    assert after == before and not (origin.parent / "evil.dvc").exists()


def test_a_state_cannot_write_through_a_symlink(origin, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (origin / "data").rmdir()
    (origin / "data").symlink_to(outside)
    with pytest.raises(remote.RemoteError, match="symbolic link"):
        remote.write_state(origin, {"data/raw.dvc": POINTER})
    assert not (outside / "raw.dvc").exists()


def test_a_state_may_write_the_lock_pointers_and_the_watermark(origin):
    mark = origin / "reports/orchestration/last_training.json"
    state = {"dvc.lock": "schema: '2.0'\n", "data/raw.dvc": POINTER, "reports/orchestration/last_training.json": "{}"}
    assert sorted(remote.write_state(origin, state, [mark])) == sorted(state)
    assert mark.read_text() == "{}" and (origin / "data/raw.dvc").read_text() == POINTER
    with pytest.raises(remote.RemoteError, match="only dvc.lock"):  # the watermark only when named
        remote.write_state(origin, state)


# ---- item 6: nothing a sync does loses what was accepted, or brings back what was erased -------------------------


def test_a_task_handed_an_older_state_does_not_roll_back_the_latest(tmp_path):
    url, env = str(tmp_path / "remote"), _env()
    old = {"dvc.lock": "lock 1\n", "data/raw.dvc": "raw 1\n"}
    remote.publish_state(url, old, "ci_run", "check_feedback", env)
    newer = {**old, "data/raw.dvc": "raw 2\n"}  # an export published meanwhile
    remote.publish_state(url, newer, "ingest_run", "export_feedback", env, base=old)
    trained = {**old, "dvc.lock": "lock 2\n"}  # the training run's task, started from `old`
    latest = remote.publish_state(url, trained, "ci_run", "train_policy", env, base=old)
    assert latest == {"dvc.lock": "lock 2\n", "data/raw.dvc": "raw 2\n"} == remote.fetch_state(url, env)
    assert remote.fetch_state(url, env, "ci_run") == trained  # the run's own lineage is exact
    clash = {**old, "data/raw.dvc": "raw 3\n"}  # both changed the raw store: loud
    with pytest.raises(remote.RemoteError, match="data/raw.dvc"):
        remote.publish_state(url, clash, "other_run", "erase", env, base=old)
    assert remote.fetch_state(url, env) == latest


def _published_worker(origin, tmp_path, url, env, name="worker-a"):
    a = _clone(origin, tmp_path / name)
    (a / "data").mkdir(exist_ok=True)
    (a / "data/in.txt").write_text("1")
    subprocess.run([DVC, "add", "-q", "data/in.txt"], cwd=a, check=True, env=env)
    remote.sync_in(a, url, env, None, task="run/1/first")
    return a, remote.sync_out(a, url, env, "run/1", "first")


def test_a_retry_keeps_and_publishes_what_its_interrupted_attempt_left(origin, tmp_path):
    url, env = str(tmp_path / "remote"), _env()
    a, state = _published_worker(origin, tmp_path, url, env)
    remote.sync_in(a, url, env, state, task="run/2/export")
    (a / "data/in.txt").write_text("2")  # the attempt's work, then its push fails
    subprocess.run([DVC, "add", "-q", "data/in.txt"], cwd=a, check=True, env=env)
    changed = (a / "data/in.txt.dvc").read_text()
    remote.sync_in(a, url, env, state, task="run/2/export")  # the retry: kept, not overwritten
    assert (a / "data/in.txt").read_text() == "2" and (a / "data/in.txt.dvc").read_text() == changed
    remote.sync_out(a, url, env, "run/2", "export")
    assert remote.fetch_state(url, env)["data/in.txt.dvc"] == changed


def test_a_sync_never_overwrites_unpublished_changes(origin, tmp_path):
    url, env = str(tmp_path / "remote"), _env()
    a, state = _published_worker(origin, tmp_path, url, env)
    # changed by hand and added, never published
    (a / "data/in.txt").write_text("by hand")
    subprocess.run([DVC, "add", "-q", "data/in.txt"], cwd=a, check=True, env=env)
    with pytest.raises(remote.UnpublishedChanges, match=r"data/in.txt.dvc.*flywheel publish.*restore --force"):
        remote.sync_in(a, url, env, None, task="run/3/check_feedback")
    assert (a / "data/in.txt").read_text() == "by hand"
    # changed and not even added: the pull would reset the data
    (a / "data/in.txt.dvc").write_text(state["data/in.txt.dvc"])
    (a / "data/in.txt").write_text("written, not added")
    with pytest.raises(remote.UnpublishedChanges, match=r"data/in.txt.dvc \(its data"):
        remote.sync_in(a, url, env, None, task="run/3/check_feedback")
    assert (a / "data/in.txt").read_text() == "written, not added"
    # dropped on purpose: --force
    remote.sync_in(a, url, env, None, force=True)
    assert (a / "data/in.txt").read_text() == "1"


# ---- hand-run ingest / export / erase against an S3 remote (moto) and the DAG task after them ----------------------


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on a free port, with a ``flywheel`` bucket (as tests/distributed/test_celery.py uses)."""
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    boto3.client(
        "s3", endpoint_url=url, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    ).create_bucket(Bucket="flywheel")
    yield url
    server.stop()


@pytest.fixture
def s3_worker(s3_server, origin, tmp_path, repo_root, monkeypatch, request):
    """A worker's workspace (a clone with the shipped params.yaml) whose settings name an S3 remote of its own
    (a prefix per test); returns (workspace, env for the CLI and the sync)."""
    aws = {
        "AWS_ENDPOINT_URL": s3_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for k, v in aws.items():
        monkeypatch.setenv(k, v)  # fsspec's S3 client reads the keys from this process
    (origin / "params.yaml").write_text((repo_root / "params.yaml").read_text())
    subprocess.run(["git", "add", "-A"], cwd=origin, check=True, env=_env())
    subprocess.run(["git", "commit", "-qm", "params"], cwd=origin, check=True, env=_env())
    w = _clone(origin, tmp_path / "worker")
    env = {**_env(), **aws, "FLYWHEEL_ROOT": str(w), "FLYWHEEL_DVC_REMOTE": f"s3://flywheel/{request.node.name}"}
    return w, env


def _flywheel(args: list[str], w: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("flywheel")), *args], cwd=w, env=env, text=True, capture_output=True
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def _events_file(path: Path, make_event, n: int, **overrides) -> Path:
    path.write_text(
        "".join(
            json.dumps(make_event(feedback={"type": "thumbs", "value": "up" if i % 2 else "down"}, **overrides)) + "\n"
            for i in range(n)
        )
    )
    return path


def _stored(w: Path) -> list[dict]:
    from flywheel.data import rawstore

    return rawstore.read_columns(w / "data/raw", ["event_id", "user_id"]).to_pylist()


def _task_ingests(w: Path, env: dict, files: list[Path], run_id: str = "scheduled__1") -> None:
    """What a DAG task does in production: synced pull, work (here an ingest and `dvc add`), push and publish."""
    from flywheel import workspace
    from flywheel.data.ingest import ingest
    from flywheel.settings import load_settings

    s = load_settings(w, env=env)

    def work():
        result = ingest(files, "native", s.raw_store, s.quarantine, s.params.ingest, s.params.contract, workers=1)
        assert result.ok and result.accepted
        workspace.track(w, s.raw_store)

    orch.synced(w, env, run_id, "export_feedback", None, work)


def _next_task(w: Path, env: dict) -> None:
    """The next DAG task on this worker (check_feedback: the latest published state, nothing of its own)."""
    orch.synced(w, env, "scheduled__2", "check_feedback", None, lambda: None)


def _on_a_fresh_clone(origin: Path, tmp_path: Path, env: dict) -> list[dict]:
    fresh = _clone(origin, tmp_path / "fresh")
    _flywheel(["restore"], fresh, {**env, "FLYWHEEL_ROOT": str(fresh)})
    return _stored(fresh)


def test_a_hand_run_ingest_is_published_and_the_next_task_keeps_it(s3_worker, origin, tmp_path, make_event):
    w, env = s3_worker
    _task_ingests(w, env, [_events_file(tmp_path / "first.jsonl", make_event, 6)])
    by_hand = _events_file(tmp_path / "by-hand.jsonl", make_event, 6)
    _flywheel(["ingest", str(by_hand), "--json"], w, env)
    ids = {json.loads(x)["event_id"] for x in by_hand.read_text().splitlines()}
    _next_task(w, env)
    assert ids <= {r["event_id"] for r in _stored(w)}  # not deleted by the task's pull
    assert ids <= {r["event_id"] for r in _on_a_fresh_clone(origin, tmp_path, env)}


def test_a_hand_run_export_is_published_and_the_next_task_keeps_it(s3_worker, origin, tmp_path, make_event):
    from service.store import FeedbackStore

    w, env = s3_worker
    _task_ingests(w, env, [_events_file(tmp_path / "first.jsonl", make_event, 6)])
    store = FeedbackStore(f"sqlite:///{w / 'feedback.db'}")
    rows = []
    for i in range(4):
        row = {
            "event_id": f"svc-{i}",
            "schema_version": 1,
            "timestamp": "2026-11-27T10:00:00Z",
            "conversation_id": f"c{i}",
            "model_version": "flywheel-policy/1",
            "user_id": "u1",
            "prompt": '[{"role": "user", "content": "hi"}]',
            "n_turns": 1,
            "response": f"hello {i}",
            "response_chars": 7,
            "feedback_type": "thumbs",
            "thumbs": "up",
            "rating": None,
            "rejected": None,
            "correction": None,
            "polarity": 1,
            "pii_found": 0,
        }
        rows.append(
            {
                "event_id": row["event_id"],
                "received_at": "2026-11-28T10:00:00Z",
                "answer_id": None,
                "model_version": row["model_version"],
                "feedback_type": "thumbs",
                "user_id": "u1",
                "row": json.dumps(row),
            }
        )
    store.write(rows)
    store.close()
    counts = json.loads(_flywheel(["export", "--json"], w, env).stdout.strip().splitlines()[-1])
    assert counts["exported"] == 4
    _next_task(w, env)
    svc = {f"svc-{i}" for i in range(4)}
    assert svc <= {r["event_id"] for r in _stored(w)}  # the store marked them exported: this copy is the only one
    assert svc <= {r["event_id"] for r in _on_a_fresh_clone(origin, tmp_path, env)}


def test_a_hand_run_erase_is_published_and_the_next_task_does_not_bring_rows_back(
    s3_worker, origin, tmp_path, make_event
):
    w, env = s3_worker
    _task_ingests(
        w,
        env,
        [
            _events_file(tmp_path / "first.jsonl", make_event, 4, user_id="gone"),
            _events_file(tmp_path / "others.jsonl", make_event, 4, user_id="stays"),
        ],
    )
    assert {r["user_id"] for r in _stored(w)} == {"gone", "stays"}
    _flywheel(["erase", "--user-id", "gone"], w, env)
    _next_task(w, env)
    assert {r["user_id"] for r in _stored(w)} == {"stays"}
    assert {r["user_id"] for r in _on_a_fresh_clone(origin, tmp_path, env)} == {"stays"}


def test_unpublished_changes_stop_the_task_until_published(s3_worker, tmp_path, make_event):
    from flywheel import workspace
    from flywheel.data.ingest import ingest
    from flywheel.settings import load_settings

    w, env = s3_worker
    _task_ingests(w, env, [_events_file(tmp_path / "first.jsonl", make_event, 6)])
    s = load_settings(w, env=env)
    ingest(
        [_events_file(tmp_path / "core.jsonl", make_event, 6)],
        "native",
        s.raw_store,
        s.quarantine,
        s.params.ingest,
        s.params.contract,
        workers=1,
    )  # what an older `flywheel ingest` did: no publish
    workspace.track(w, s.raw_store)
    n = len(_stored(w))
    with pytest.raises(remote.UnpublishedChanges, match=r"data/raw.dvc.*`flywheel publish`"):
        _next_task(w, env)
    assert len(_stored(w)) == n
    _flywheel(["publish"], w, env)
    _next_task(w, env)
    assert len(_stored(w)) == n
