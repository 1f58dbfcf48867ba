"""The production topology on loopback: Airflow's CeleryExecutor (scheduler, api-server, dag-processor and two
Celery workers, queues ``default`` and ``gpu``) with PostgreSQL as metadata database and a Redis it starts on a
free port as broker; an MLflow tracking server backed by PostgreSQL; moto's S3 server as the DVC remote.

Each worker has a workspace of its own (two clones, as on two machines): the ``gpu`` worker's clone starts with
no data at all, so everything its training tasks read came through the S3 remote (pushed by the task that made
it, named by the dvc.lock that travelled in XCom), and what the ``default`` worker's ``bless`` and ``release``
read of the training came back the same way. ``continuous_improvement`` is triggered over REST API v2 with the
official client and must succeed, the tasks executed on both queues, the champion moved in the MLflow server.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.airflow.airflow_helpers import POOL, clean_env, copy_repo, set_params, sh
from tests.airflow.test_live import _free_port, _wait

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(3600)]

PG = os.environ.get("FLYWHEEL_TEST_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432")
BIN = Path(sys.executable).parent


def _pg_ready() -> bool:
    return subprocess.run(["pg_isready", "-h", "127.0.0.1", "-p", "5432"], capture_output=True).returncode == 0


def _psql(sql: str) -> None:
    import psycopg2

    conn = psycopg2.connect(PG.replace("+psycopg2", "") + "/postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql)
    conn.close()


class Services:
    """Child processes, each in its own process group, with a log file each; stopped in reverse order."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def log(self, name: str, tail: int = 4000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""

    def alive(self, name: str) -> bool:
        assert self.procs[name].poll() is None, f"{name} exited:\n{self.log(name)}"
        return True

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(grace)
                break
            except subprocess.TimeoutExpired:
                pass

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)


def _http_up(url: str) -> bool:
    try:
        return urllib.request.urlopen(url, timeout=5).status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def platform(tmp_path_factory, repo_root):
    if not _pg_ready():
        pytest.fail("PostgreSQL is not accepting connections on 127.0.0.1:5432 (.ci/run starts it)")
    if not shutil.which("redis-server"):
        pytest.fail("redis-server is not installed (apt-get install redis-server)")
    base = tmp_path_factory.mktemp("distributed")
    logs = base / "logs"
    logs.mkdir()
    svc = Services(logs)
    suffix = uuid.uuid4().hex[:8]
    airflow_db, mlflow_db = f"fw_airflow_{suffix}", f"fw_mlflow_{suffix}"
    for db in (airflow_db, mlflow_db):
        _psql(f"CREATE DATABASE {db}")
    try:
        ports = {k: _free_port() for k in ("redis", "s3", "mlflow", "api")}
        svc.start(
            "redis",
            ["redis-server", "--port", str(ports["redis"]), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            clean_env(),
            base,
        )
        svc.start("s3", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(ports["s3"])], clean_env(), base)
        s3 = f"http://127.0.0.1:{ports['s3']}"
        _wait("moto's S3 server", lambda: svc.alive("s3") and _http_up(s3 + "/moto-api/"), 120, 0.5)
        aws = {
            "AWS_ENDPOINT_URL": s3,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        import boto3

        boto3.client(
            "s3", endpoint_url=s3, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
        ).create_bucket(Bucket="flywheel")

        tracking = f"http://127.0.0.1:{ports['mlflow']}"
        svc.start(
            "mlflow",
            [
                str(BIN / "mlflow"),
                "server",
                "--backend-store-uri",
                f"{PG}/{mlflow_db}",
                "--artifacts-destination",
                str(base / "mlflow-artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(ports["mlflow"]),
                "--workers",
                "1",
            ],
            clean_env(),
            base,
        )
        _wait("the MLflow server", lambda: svc.alive("mlflow") and _http_up(tracking + "/health"), 300, 1)

        # the whole platform's settings, as infra/env.example names them
        api = f"http://127.0.0.1:{ports['api']}"
        flywheel = {
            "FLYWHEEL_TRACKING_URI": tracking,
            "FLYWHEEL_DVC_REMOTE": "s3://flywheel/dvc",
            **aws,
            "FLYWHEEL_PSEUDONYM_KEY": "distributed-test-pseudonym-key-0123456789",
        }  # one for all workers
        home = base / "airflow-home"
        home.mkdir()
        airflow = {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"postgresql+psycopg2://postgres@127.0.0.1:5432/{airflow_db}",
            "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:{ports['redis']}/0",
            "AIRFLOW__CELERY__RESULT_BACKEND": f"db+postgresql+psycopg2://postgres@127.0.0.1:5432/{airflow_db}",
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": "1",
            # workers that import the stages' libraries before they fork their pools (flywheel/airflow_worker.py)
            "AIRFLOW__CELERY__CELERY_CONFIG_OPTIONS": "flywheel.airflow_worker.CELERY_CONFIG",
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__API__PORT": str(ports["api"]),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__BASE_URL": api,
            "AIRFLOW__API_AUTH__JWT_SECRET": uuid.uuid4().hex,
            "AIRFLOW__CORE__FERNET_KEY": "",
            # the fault test's timeouts, lowered: a task whose worker died is failed (and retried) after 30 s
            # without a heartbeat; one queued in a broker that lost it is queued again after 90 s
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "30",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "90",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        }

        # two clones, as on two machines: the default worker's has the feedback and the base models
        # (the first turn of `make demo`, its champions registered in the MLflow server); the gpu worker's none
        ws_default = copy_repo(repo_root, base / "worker-default")
        ws_gpu = copy_repo(repo_root, base / "worker-gpu")
        for ws in (ws_default, ws_gpu):  # threshold out of reach: only the run the test forces trains
            set_params(ws, min_new_events=100000)
        env_default = clean_env(**flywheel, FLYWHEEL_ROOT=str(ws_default))
        _ingest(ws_default, env_default)
        sh(["dvc", "repro", "base_models"], ws_default, env_default, timeout=900)
        sh(["flywheel", "bootstrap"], ws_default, env_default, timeout=900)

        common = clean_env(**flywheel, **airflow)
        env = {
            "default": {**common, "AIRFLOW__CORE__DAGS_FOLDER": str(ws_default / "dags")},
            "gpu": {**common, "AIRFLOW__CORE__DAGS_FOLDER": str(ws_gpu / "dags")},
        }
        sh(["airflow", "db", "migrate"], ws_default, env["default"], timeout=900)
        sh(
            ["airflow", "pools", "set", POOL, "1", "one DVC command per workspace at a time"],
            ws_default,
            env["default"],
        )
        svc.start("api-server", ["airflow", "api-server", "--port", str(ports["api"])], env["default"], ws_default)
        svc.start("scheduler", ["airflow", "scheduler"], env["default"], ws_default)
        svc.start("dag-processor", ["airflow", "dag-processor"], env["default"], ws_default)
        for queue, ws in (("default", ws_default), ("gpu", ws_gpu)):
            svc.start(
                f"worker-{queue}",
                [
                    "airflow",
                    "celery",
                    "worker",
                    "--queues",
                    queue,
                    "--concurrency",
                    "1",
                    "--celery-hostname",
                    f"{queue}@%h",
                ],
                env[queue],
                ws,
            )
        passwords = home / "simple_auth_manager_passwords.json.generated"
        _wait(
            "the API server",
            lambda: svc.alive("api-server") and passwords.is_file() and _http_up(api + "/api/v2/version"),
            300,
            1,
        )
        yield {
            "svc": svc,
            "api": api,
            "password": json.loads(passwords.read_text())["admin"],
            "env": env,
            "ws": {"default": ws_default, "gpu": ws_gpu},
            "tracking": tracking,
            "s3": s3,
            "aws": aws,
            "flywheel": flywheel,
            "logs": logs,
        }
    finally:
        svc.stop_all()
        for db in (airflow_db, mlflow_db):
            try:
                _psql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
            except Exception:  # noqa: BLE001 - cleanup only
                pass


def _ingest(ws: Path, env: dict[str, str]) -> None:
    import gzip

    lines = gzip.open(ws / "data/demo/hh-rlhf-batch1.jsonl.gz", "rt").read().splitlines()[:120]
    with gzip.open(ws / "small.jsonl.gz", "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    sh(["flywheel", "ingest", "--format", "hh-rlhf", "small.jsonl.gz"], ws, env)
    sh(["flywheel", "ingest", "data/demo/native-batch.jsonl"], ws, env)


def _client(p):
    import airflow_client.client as ac

    body = json.dumps({"username": "admin", "password": p["password"]}).encode()
    req = urllib.request.Request(
        p["api"] + "/auth/token", data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    token = json.loads(urllib.request.urlopen(req, timeout=30).read())["access_token"]
    return ac.ApiClient(ac.Configuration(host=p["api"], access_token=token))


def _champion(p, model: str = "policy") -> tuple[str, dict]:
    from mlflow import MlflowClient

    v = MlflowClient(p["tracking"], p["tracking"]).get_model_version_by_alias(f"flywheel-{model}", "champion")
    return str(v.version), dict(v.tags)


def test_continuous_improvement_on_celery_workers_with_s3_remote_and_mlflow_server(platform):
    from airflow_client.client import DAGApi, DAGPatchBody, DagRunApi, TaskInstanceApi, TriggerDAGRunPostBody
    from airflow_client.client.exceptions import ApiException

    p = platform
    client = _client(p)
    assert _champion(p)[0] == "1"

    def parsed():
        try:
            return DAGApi(client).get_dag("continuous_improvement")
        except ApiException:
            return None

    _wait("continuous_improvement to be parsed", lambda: p["svc"].alive("dag-processor") and parsed(), 300)
    DAGApi(client).patch_dag("continuous_improvement", DAGPatchBody(is_paused=False))
    run_id = (
        DagRunApi(client)
        .trigger_dag_run("continuous_improvement", TriggerDAGRunPostBody(logical_date=None, conf={"force": True}))
        .dag_run_id
    )

    def finished():
        for name in ("scheduler", "worker-default", "worker-gpu"):
            p["svc"].alive(name)
        state = str(DagRunApi(client).get_dag_run("continuous_improvement", run_id).state.value)
        return state if state in ("success", "failed") else None

    state = _wait(f"run {run_id}", finished, 2400, 5)
    tis = TaskInstanceApi(client).get_task_instances("continuous_improvement", run_id).task_instances
    tasks = {ti.task_id: (ti.state.value if ti.state else None, ti.queue) for ti in tis}
    assert state == "success", (tasks, p["svc"].log("worker-gpu"), p["svc"].log("worker-default"))

    # both queues used, each by its own worker (workspace)
    for stage in ("train_reward", "train_policy", "evaluate"):
        assert tasks[stage] == ("success", "gpu"), tasks
    for task in ("check_feedback", "validate", "prepare", "bless", "release"):
        assert tasks[task] == ("success", "default"), tasks
    ws_default, ws_gpu = p["ws"]["default"], p["ws"]["gpu"]
    worker_logs = {q: (p["logs"] / f"worker-{q}.log").read_text(errors="replace") for q in ("default", "gpu")}
    assert "train_policy" in worker_logs["gpu"] and "train_policy" not in worker_logs["default"], worker_logs
    assert "validate" in worker_logs["default"] and "'validate'" not in worker_logs["gpu"]
    # each worker imported the stages' libraries before forking its pool, and its tasks' runners shared them
    for queue in ("default", "gpu"):
        assert "preloaded the stages' libraries" in worker_logs[queue], worker_logs[queue][-4000:]
    task_logs = Path(p["env"]["default"]["AIRFLOW_HOME"]) / "logs" / "dag_id=continuous_improvement"
    forked = [f for f in task_logs.rglob("*.log") if "forked from its worker's preloaded" in f.read_text()]
    assert {f.parent.name for f in forked} >= {"task_id=train_policy", "task_id=validate"}, forked
    # the gpu clone started empty: what its stages read came from S3; it never ran bless
    assert (ws_gpu / "models/challenger/policy").is_dir() and (ws_gpu / "data/prepared").is_dir()
    assert not (ws_gpu / "reports/blessing.json").exists()
    # and the default clone read the gpu worker's evaluation through S3 (bless ran there on it)
    gpu_eval = json.loads((ws_gpu / "metrics/evaluate.json").read_text())
    assert json.loads((ws_default / "metrics/evaluate.json").read_text()) == gpu_eval
    assert (ws_default / "reports/blessing.json").is_file()

    # the S3 remote holds the data and the state each task left (dvc.lock travelled between them)
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=p["s3"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket="flywheel")
        for o in page.get("Contents", [])
    ]
    assert any(k.startswith("dvc/files/md5/") for k in keys)
    published = {k.rsplit("/", 1)[1][:-5] for k in keys if f"/runs/{run_id.replace('/', '_')}/" in k}
    assert {"train_policy", "evaluate", "bless", "record_training"} <= published, published
    locks = {
        t: json.loads(
            s3.get_object(
                Bucket="flywheel", Key=next(k for k in keys if k.endswith(f"/runs/{run_id.replace('/', '_')}/{t}.json"))
            )["Body"].read()
        )["files"]["dvc.lock"]
        for t in ("train_policy", "bless")
    }
    assert "train_policy:" in locks["train_policy"] and "bless:" in locks["bless"]

    # promoted in the MLflow server (PostgreSQL-backed), with the run id on the version
    version, tags = _champion(p)
    assert version == "2" and tags.get("airflow_run_id") == run_id, tags

    # lineage: a fresh clone restores the exact data behind that version from its airflow_run_id alone
    from flywheel.registry import content_hash

    fresh = copy_repo(Path(__file__).resolve().parents[2], p["ws"]["default"].parent / "fresh")
    set_params(fresh, min_new_events=100000)
    sh(
        ["flywheel", "restore", "--run-id", tags["airflow_run_id"]],
        fresh,
        clean_env(**p["flywheel"], FLYWHEEL_ROOT=str(fresh)),
        timeout=900,
    )
    assert content_hash(fresh / "models/challenger/policy") == tags["content_hash"]
    assert json.loads((fresh / "metrics/evaluate.json").read_text()) == gpu_eval


def _ti_states(client, run_id: str) -> dict[str, tuple[str | None, int]]:
    from airflow_client.client import TaskInstanceApi

    tis = TaskInstanceApi(client).get_task_instances("continuous_improvement", run_id).task_instances
    return {ti.task_id: (ti.state.value if ti.state else None, ti.try_number) for ti in tis}


def test_a_killed_worker_and_a_restarted_broker_do_not_break_the_run(platform):
    """Redis restarted while a training task runs, then the gpu worker SIGKILLed in the middle of the next one
    and started again (as a supervisor would): the task is retried, the run succeeds, no version is
    registered or promoted twice, and no raw-store event is lost."""
    from airflow_client.client import DagRunApi, TriggerDAGRunPostBody

    p = platform
    svc = p["svc"]
    client = _client(p)
    from mlflow import MlflowClient

    mlflow = MlflowClient(p["tracking"], p["tracking"])
    before = {v.version for v in mlflow.search_model_versions("name='flywheel-policy'")}
    events_before = _raw_events(p["ws"]["default"])
    run_id = (
        DagRunApi(client)
        .trigger_dag_run("continuous_improvement", TriggerDAGRunPostBody(logical_date=None, conf={"force": True}))
        .dag_run_id
    )

    def running(task: str):
        def probe():
            state = str(DagRunApi(client).get_dag_run("continuous_improvement", run_id).state.value)
            assert state not in ("success", "failed"), (state, _ti_states(client, run_id))
            return _ti_states(client, run_id).get(task, (None, 0))[0] == "running"

        return probe

    _wait("train_reward to run", running("train_reward"), 1200, 1)
    redis_args = svc.procs["redis"].args
    svc.stop("redis")  # the broker goes away and comes back, empty
    time.sleep(3)
    svc.start("redis", redis_args, clean_env(), p["ws"]["default"])
    _wait("train_policy to run", running("train_policy"), 1200, 1)
    time.sleep(5)  # in the middle of it
    os.killpg(svc.procs["worker-gpu"].pid, signal.SIGKILL)
    svc.procs.pop("worker-gpu").wait(30)
    svc.start(
        "worker-gpu",
        ["airflow", "celery", "worker", "--queues", "gpu", "--concurrency", "1", "--celery-hostname", "gpu2@%h"],
        p["env"]["gpu"],
        p["ws"]["gpu"],
    )

    def finished():
        state = str(DagRunApi(client).get_dag_run("continuous_improvement", run_id).state.value)
        return state if state in ("success", "failed") else None

    state = _wait(f"run {run_id}", finished, 2400, 5)
    tasks = _ti_states(client, run_id)
    assert state == "success", (tasks, svc.log("worker-gpu"), svc.log("scheduler"))
    assert tasks["train_policy"] == ("success", 2), tasks  # killed on try 1, retried
    # no version twice: one content hash per version, the champion moved at most once
    versions = mlflow.search_model_versions("name='flywheel-policy'")
    hashes = [v.tags.get("content_hash") for v in versions]
    assert len(hashes) == len(set(hashes)), hashes
    assert len({v.version for v in versions} - before) <= 1
    promoted = [v.version for v in versions if v.tags.get("airflow_run_id") == run_id]
    assert len(promoted) <= 1
    # no event lost: the raw store the run trained on holds every event it held before
    assert _raw_events(p["ws"]["default"]) >= events_before > 0


def _raw_events(ws: Path) -> int:
    code = (
        "from flywheel.settings import load_settings; from flywheel.data import rawstore; "
        "print(rawstore.read_columns(load_settings().raw_store, ['batch_id']).num_rows)"
    )
    out = sh([sys.executable, "-c", code], ws, clean_env(FLYWHEEL_ROOT=str(ws)))
    return int(out.stdout.strip().splitlines()[-1])


def test_the_service_traces_to_the_mlflow_server_and_ingest_reads_a_users_app_from_it(platform, tmp_path):
    """Against the PostgreSQL-backed MLflow server: `flywheel serve` (the platform's settings) writes each answer
    as a trace and the feedback on it as an assessment; a user's app (another process) traces its calls and logs
    human feedback there with MLflow's own API, and `flywheel ingest --from mlflow` turns exactly those into
    events, once."""
    from mlflow import MlflowClient

    from tests.e2e.test_cli import USER_APP

    p = platform
    ws, port = p["ws"]["default"], _free_port()
    env = clean_env(**p["flywheel"], FLYWHEEL_ROOT=str(ws))
    token = sh(["flywheel", "tokens", "create", "--scope", "admin"], ws, env).stdout.strip().splitlines()[-1]
    server = p["svc"].start("serve", ["flywheel", "serve", "--no-registry", "--port", str(port)], env, ws)
    url, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def post(path: str, body: dict) -> dict:
        req = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers=auth, method="POST")
        return json.loads(urllib.request.urlopen(req, timeout=120).read())

    try:
        _wait("flywheel serve", lambda: server.poll() is None and _http_up(url + "/readyz"), 300, 1)
        answer = post("/v1/chat/completions", {"messages": [{"role": "user", "content": "One tip?"}], "max_tokens": 4})
        event = {
            "event_id": "dist-trace-1",
            "timestamp": "2026-11-30T10:00:00Z",
            "conversation_id": "dist-conv-1",
            "model_version": answer["model_version"],
            "answer_id": answer["id"],
            "prompt": [{"role": "user", "content": "One tip?"}],
            "response": answer["choices"][0]["message"]["content"] or "(empty)",
            "feedback": {"type": "rating", "value": 4},
        }
        assert post("/v1/feedback", event)["status"] == "stored"
    finally:
        server.send_signal(signal.SIGTERM)  # the lifespan's end writes what is queued
        server.wait(120)
    client = MlflowClient(p["tracking"])
    exp = client.get_experiment_by_name("flywheel-service")
    (trace,) = client.search_traces(locations=[exp.experiment_id])
    assert trace.info.tags["flywheel.answer_id"] == answer["id"]
    assert trace.info.tags["model_version"] == answer["model_version"]
    assert [(a.name, a.feedback.value) for a in trace.info.assessments] == [("rating", 4)]

    app = tmp_path / "app.py"
    app.write_text(USER_APP)
    sh([sys.executable, str(app), p["tracking"]], tmp_path, clean_env())
    plain = tmp_path / "ws"
    plain.mkdir()
    shutil.copy(ws / "params.yaml", plain / "params.yaml")
    cmd = ["flywheel", "ingest", "--from", "mlflow", "--experiment", "support-bot", "--tracking-uri", p["tracking"]]
    first = json.loads(sh([*cmd, "--json"], plain, clean_env(FLYWHEEL_ROOT=str(plain))).stdout.splitlines()[-1])
    assert (first["read"], first["accepted"], first["quarantined"], first["skipped_not_human"]) == (5, 4, 1, 1)
    again = json.loads(sh([*cmd, "--json"], plain, clean_env(FLYWHEEL_ROOT=str(plain))).stdout.splitlines()[-1])
    assert again["read"] == 0
