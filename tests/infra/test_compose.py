"""infra/: the compose file and the Dockerfile of the production topology, checked without a Docker engine.

Every service has a healthcheck; no secret is written in the file (each is a ${VAR} from the env file, and a
missing one stops compose); infra/env.example names every variable; the FLYWHEEL_* variables are the settings
object's own and every network setting is set; and Debian's `docker-compose config` accepts the file.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from flywheel.production import NETWORK_SETTINGS
from flywheel.settings import ENV_PREFIX, PathSettings, load_settings

REPO_ROOT = Path(__file__).resolve().parents[2]
INFRA = REPO_ROOT / "infra"
COMPOSE = INFRA / "docker-compose.yml"
ENV_EXAMPLE = INFRA / "env.example"
DOCKERFILE = INFRA / "Dockerfile"

REQUIRED_SERVICES = {
    "postgres",
    "redis",
    "minio",
    "mlflow",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "worker-default",
    "worker-gpu",
    "flywheel-service",
}
# Variables of the settings module that are not settings: FLYWHEEL_ROOT is read by find_root; the pseudonym key
# is a secret flywheel/redact.py reads itself (never part of the settings object, never logged).
NOT_SETTINGS = {"FLYWHEEL_ROOT", "FLYWHEEL_PSEUDONYM_KEY"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|KEY", re.IGNORECASE)
SUBSTITUTION = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
BARE_OR_REQUIRED = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(:?\?[^}]*)?\}")  # ${VAR} or ${VAR:?msg}: no default
URL_PASSWORD = re.compile(r"[a-z0-9+.-]+://[^/@:\s]*:([^@/\s]+)@", re.IGNORECASE)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: str(v) for k, v in env.items()}


def resolve(value: str, env: dict[str, str]) -> str:
    """Compose's interpolation of ``value`` from ``env`` (${VAR}, ${VAR:-default}, ${VAR:?message}, $$)."""

    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2) or "", m.group(3) or ""
        have = env.get(name, "") if op.startswith(":") else env.get(name)
        if have:
            return have
        if op.endswith("?"):
            raise AssertionError(f"{name} is required: {arg}")
        return arg if op.endswith("-") else ""

    return SUBSTITUTION.sub(one, value).replace("$$", "$")


def strings(node) -> list[str]:
    """Every string of the parsed file (keys and values; comments are not part of it)."""
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in strings(k) + strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return [node] if isinstance(node, str) else []


def substitutions(compose: dict) -> list[re.Match]:
    return [m for text in strings(compose) for m in SUBSTITUTION.finditer(text)]


def url_passwords(text: str) -> list[str]:
    """The password part of each URL in ``text``, read with every ${...} as one opaque token."""
    tokens: list[str] = []

    def hide(m: re.Match) -> str:
        tokens.append(m.group(0))
        return f"\x00{len(tokens) - 1}\x00"

    hidden = SUBSTITUTION.sub(hide, text)
    return [re.sub(r"\x00(\d+)\x00", lambda t: tokens[int(t.group(1))], pw) for pw in URL_PASSWORD.findall(hidden)]


def test_required_services_are_present(compose):
    assert REQUIRED_SERVICES <= set(compose["services"]), REQUIRED_SERVICES - set(compose["services"])


def test_every_service_has_a_healthcheck(compose):
    missing = [
        name
        for name, svc in compose["services"].items()
        if not (svc.get("healthcheck") or {}).get("test")
        or svc["healthcheck"].get("disable")
        or svc["healthcheck"]["test"] in (["NONE"], "NONE")
    ]
    assert not missing, f"services without a healthcheck: {missing}"


def test_no_literal_secret_in_the_compose_file(compose):
    for name, svc in compose["services"].items():
        for key, value in environment(svc).items():
            if SECRET_NAME.search(key):
                assert BARE_OR_REQUIRED.fullmatch(value), f"{name}: {key}={value!r} is not a ${{VAR}} substitution"
    for text in strings(compose):
        for password in url_passwords(text):
            assert BARE_OR_REQUIRED.fullmatch(password), f"a URL holds a literal password: {text!r}"


def test_a_missing_secret_stops_compose(compose):
    found = substitutions(compose)
    secrets = {m.group(1) for m in found if SECRET_NAME.search(m.group(1))}
    required = {m.group(1) for m in found if (m.group(2) or "").endswith("?")}
    assert secrets, "the compose file names no secret variable at all"
    assert secrets <= required, f"secrets never marked required (${{VAR:?...}}): {sorted(secrets - required)}"
    defaults = [m.group(0) for m in found if SECRET_NAME.search(m.group(1)) and (m.group(2) or "").endswith("-")]
    assert not defaults, f"a secret with a default value: {defaults}"


def test_env_example_names_every_variable_with_placeholder_secrets(compose, example):
    used = {m.group(1) for m in substitutions(compose)}
    assert used == set(example), (
        f"missing from env.example: {sorted(used - set(example))}; "
        f"not used by the compose file: {sorted(set(example) - used)}"
    )
    for key, value in example.items():
        if SECRET_NAME.search(key) and not key.endswith("_USER"):
            assert value.startswith("change-me"), f"env.example: {key} must be a placeholder, not {value!r}"


def test_flywheel_variables_are_settings_and_change_them(compose, example, tmp_path):
    shutil.copy(REPO_ROOT / "params.yaml", tmp_path / "params.yaml")
    default = load_settings(tmp_path, env={})
    named = {
        k: v for svc in compose["services"].values() for k, v in environment(svc).items() if k.startswith(ENV_PREFIX)
    }
    assert named, "no FLYWHEEL_* variable in the compose file"
    for var, raw in sorted(named.items()):
        if var in NOT_SETTINGS:
            continue
        key = var[len(ENV_PREFIX) :].lower()
        assert key in PathSettings.model_fields, f"{var} is not a setting of flywheel/settings.py"
        value = resolve(raw, example)
        changed = load_settings(tmp_path, env={var: value})
        assert getattr(changed, key) != getattr(default, key), f"{var}={value!r} left settings.{key} unchanged"


def test_every_network_setting_is_set_for_every_flywheel_container(compose):
    assert set(NETWORK_SETTINGS) <= set(PathSettings.model_fields)
    flywheel = {
        name: environment(svc)
        for name, svc in compose["services"].items()
        if str(svc.get("image", "")).startswith("${APP_IMAGE")
    }
    assert {"mlflow", "init", "worker-default", "worker-gpu", "flywheel-service"} <= set(flywheel)
    for name, env in flywheel.items():
        missing = [key for key in NETWORK_SETTINGS if ENV_PREFIX + key.upper() not in env]
        assert not missing, f"{name}: no {', '.join(ENV_PREFIX + k.upper() for k in missing)}"


def test_a_worker_environment_loads_and_airflow_uses_the_same_db_and_broker(compose, example, tmp_path):
    shutil.copy(REPO_ROOT / "params.yaml", tmp_path / "params.yaml")
    env = {k: resolve(v, example) for k, v in environment(compose["services"]["worker-default"]).items()}
    s = load_settings(tmp_path, env=env)
    assert s.airflow_db == env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert s.celery_broker == env["AIRFLOW__CELERY__BROKER_URL"]
    assert s.tracking_uri == s.registry_uri == "http://mlflow:5000"
    assert s.dvc_remote.startswith("s3://") and env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert s.feedback_store.startswith("postgresql") and s.airflow_home == Path(env["AIRFLOW_HOME"])


def test_airflow_is_distributed_with_workers_on_default_and_gpu(compose):
    services = compose["services"]
    airflow = [n for n in services if n.startswith(("airflow-", "worker-"))]
    assert all(environment(services[n])["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor" for n in airflow)
    for worker, queue in (("worker-default", "default"), ("worker-gpu", "gpu")):
        command = services[worker]["command"]
        assert command[:3] == ["airflow", "celery", "worker"]
        assert command[command.index("--queues") + 1] == queue


def test_named_volumes_are_declared(compose):
    declared = set(compose.get("volumes") or {})
    for name, svc in compose["services"].items():
        for spec in svc.get("volumes") or []:
            source = spec.split(":", 1)[0]
            if not source.startswith((".", "/", "~")):
                assert source in declared, f"{name}: volume {source!r} is not declared"


def test_dockerfile_is_multi_stage_pinned_non_root_and_uses_install_sh():
    text = DOCKERFILE.read_text()
    stages = re.findall(r"(?m)^FROM\s+(\S+)", text)
    assert len(stages) >= 2, "not a multi-stage build"
    base = re.search(r"(?m)^ARG PYTHON_IMAGE=(\S+)", text).group(1)
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?", base), base
    assert "infra/install.sh" in text
    user = re.findall(r"(?m)^USER\s+(\S+)", text)
    assert user and user[-1].split(":")[0] not in ("root", "0"), "the final stage must not run as root"
    assert re.search(r"(?m)^HEALTHCHECK\s", text)
    assert not re.search(r"(?im)^(ENV|ARG)\s+\S*(PASSWORD|SECRET|TOKEN)", text), "a secret in the image"


@pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="Debian's docker-compose 1.29 is not installed (`apt-get install -y docker-compose`; .ci/run installs it)",
)
def test_docker_compose_config_accepts_the_file(tmp_path):
    clean_env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path)}  # no variable leaks in from here
    cmd = [shutil.which("docker-compose"), "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE), "config", "-q"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=clean_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    empty = tmp_path / "empty.env"
    empty.write_text("")
    cmd[cmd.index(str(ENV_EXAMPLE))] = str(empty)
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=clean_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "must be set in infra/.env" in proc.stderr, proc.stderr


def test_mlflow_server_requires_a_login_and_is_not_published(compose):
    services = compose["services"]
    mlflow = services["mlflow"]
    assert "infra/mlflow-server.sh" in " ".join(mlflow["command"]), "mlflow must start behind its basic-auth app"
    assert "--app-name basic-auth" in (INFRA / "mlflow-server.sh").read_text()
    assert not mlflow.get("ports"), f"the MLflow port is published by default: {mlflow.get('ports')}"
    env = environment(mlflow)
    for key in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", env[key]), f"mlflow: {key} must be a required secret"
    ui = yaml.safe_load((INFRA / "docker-compose.mlflow-ui.yml").read_text())["services"]["mlflow"]["ports"]
    assert all(str(p).startswith("127.0.0.1:") for p in ui), f"the optional UI port must bind loopback: {ui}"


def test_workers_and_service_log_in_to_mlflow_with_their_own_accounts(compose):
    services = compose["services"]
    users = {}
    for name in ("init", "worker-default", "worker-gpu", "airflow-scheduler", "flywheel-service"):
        env = environment(services[name])
        assert env.get("MLFLOW_TRACKING_USERNAME"), f"{name}: no MLflow account"
        assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", env.get("MLFLOW_TRACKING_PASSWORD", "")), name
        users[name] = (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"])
    assert users["flywheel-service"] != users["worker-default"] == users["worker-gpu"] == users["init"]
    init = " ".join(services["init"]["command"])
    assert init.index("mlflow_users.py users") < init.index("flywheel bootstrap") < init.index("mlflow_users.py grant")


@pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="Debian's docker-compose is not installed (apt-get install docker-compose; .ci/run installs it)",
)
def test_the_gpu_override_reserves_the_gpus_for_the_gpu_queues_worker(tmp_path):
    gpu = INFRA / "docker-compose.gpu.yml"
    clean_env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path)}
    cmd = [shutil.which("docker-compose"), "-f", str(COMPOSE), "-f", str(gpu), "--env-file", str(ENV_EXAMPLE), "config"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=clean_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    merged = yaml.safe_load(proc.stdout)["services"]
    (device,) = merged["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
    assert "--queues" in merged["worker-gpu"]["command"] and "gpu" in merged["worker-gpu"]["command"]
    assert "deploy" not in merged["worker-default"]  # only the gpu queue's worker holds GPUs
