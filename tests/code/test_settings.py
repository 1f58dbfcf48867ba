"""flywheel.settings: precedence, absolute paths, and bad values failing with the setting's name."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flywheel.settings import SettingsError, find_root, load_params, load_settings

SHIPPED = Path(__file__).resolve().parents[2] / "params.yaml"


def workspace(tmp_path: Path, params: str = "") -> Path:
    """A workspace whose params.yaml is the shipped one with the YAML mapping ``params`` merged over it (every
    section must be there: the code has no defaults)."""
    raw = _merged(yaml.safe_load(SHIPPED.read_text()), yaml.safe_load(params) or {})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return tmp_path


def _merged(base: dict, over: dict) -> dict:
    return {
        **base,
        **{
            k: _merged(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
            for k, v in over.items()
        },
    }


def test_paths_and_uris_from_the_shipped_params_yaml(tmp_path):
    s = load_settings(workspace(tmp_path), env={})
    assert s.root == tmp_path.resolve()
    assert s.raw_store == tmp_path.resolve() / "data" / "raw"
    assert s.quarantine == tmp_path.resolve() / "data" / "quarantine"
    assert s.tracking_uri == "sqlite:///" + str(tmp_path.resolve() / "mlruns.db")
    assert s.registry_uri == s.tracking_uri  # empty registry_uri: same as tracking
    assert s.params.contract.max_text_chars == 16000
    assert s.params.prepare.split.test_pct == 20


def test_params_yaml_values_are_read(tmp_path):
    root = workspace(
        tmp_path, "settings:\n  raw_store: store/raw\ncontract:\n  max_turns: 7\nprepare:\n  split:\n    test_pct: 5\n"
    )
    s = load_settings(root, env={})
    assert s.raw_store == tmp_path.resolve() / "store" / "raw"
    assert s.params.contract.max_turns == 7
    assert s.params.prepare.split.test_pct == 5
    assert s.params.prepare.split.val_pct == 10  # the sibling params.yaml sets


@pytest.mark.parametrize(
    "text, key",
    [
        ("", "contract"),
        ("settings:\n  raw_store: x\n", "settings.quarantine"),
        ("contract: {max_turns: 3}\n", "contract.max_text_chars"),
    ],
)
def test_a_missing_section_or_key_fails_naming_it(tmp_path, text, key):
    """No code default stands in for params.yaml: an empty file or a partial section is a load error."""
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(SettingsError, match=rf"params.yaml {key}: missing"):
        load_settings(tmp_path, env={})


def test_env_over_params_yaml(tmp_path):
    root = workspace(tmp_path, "settings:\n  raw_store: from/params\n  tracking_uri: params.db\n")
    env = {"FLYWHEEL_RAW_STORE": "from/env", "FLYWHEEL_TRACKING_URI": "postgresql://u@db/flywheel"}
    s = load_settings(root, env=env)
    assert s.raw_store == tmp_path.resolve() / "from" / "env"
    assert s.tracking_uri == "postgresql://u@db/flywheel"
    assert s.registry_uri == "postgresql://u@db/flywheel"


def test_env_is_read_from_os_environ_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv("FLYWHEEL_QUARANTINE", "q-from-env")
    s = load_settings(workspace(tmp_path, "settings:\n  quarantine: q-from-params\n"))
    assert s.quarantine == tmp_path.resolve() / "q-from-env"


def test_airflow_home_precedence(tmp_path):
    root = workspace(tmp_path)
    assert load_settings(root, env={"AIRFLOW_HOME": "/opt/af"}).airflow_home == Path("/opt/af")
    both = {"AIRFLOW_HOME": "/opt/af", "FLYWHEEL_AIRFLOW_HOME": "/opt/fw"}
    assert load_settings(root, env=both).airflow_home == Path("/opt/fw")


@pytest.mark.parametrize(
    "key", ["raw_store", "quarantine", "prepared", "reports", "models", "artifact_root", "airflow_home"]
)
def test_relative_paths_made_absolute_from_root(tmp_path, monkeypatch, key):
    root = workspace(tmp_path, f"settings:\n  {key}: rel/../sub/dir\n")
    monkeypatch.chdir("/")  # not the cwd: the workspace root anchors relative paths
    value = getattr(load_settings(root, env={}), key)
    assert value.is_absolute()
    assert value == tmp_path.resolve() / "sub" / "dir"


def test_absolute_path_kept(tmp_path):
    s = load_settings(workspace(tmp_path), env={"FLYWHEEL_MODELS": "/srv/models"})
    assert s.models == Path("/srv/models")


@pytest.mark.parametrize("key", ["tracking_uri", "feedback_store"])
def test_relative_db_path_becomes_absolute_sqlite_uri(tmp_path, key):
    s = load_settings(workspace(tmp_path, f"settings:\n  {key}: db/x.db\n"), env={})
    assert getattr(s, key) == "sqlite:///" + str(tmp_path.resolve() / "db" / "x.db")


def test_relative_dvc_remote_made_absolute_and_urls_kept(tmp_path):
    root = workspace(tmp_path)
    assert load_settings(root, env={"FLYWHEEL_DVC_REMOTE": "remote"}).dvc_remote == str(tmp_path.resolve() / "remote")
    assert load_settings(root, env={"FLYWHEEL_DVC_REMOTE": "s3://b/fw"}).dvc_remote == "s3://b/fw"
    assert load_settings(root, env={}).dvc_remote == ""


def test_find_root_walks_up_and_honours_flywheel_root(tmp_path, monkeypatch):
    root = workspace(tmp_path)
    deep = root / "a" / "b"
    deep.mkdir(parents=True)
    monkeypatch.delenv("FLYWHEEL_ROOT", raising=False)
    assert find_root(deep) == root.resolve()
    monkeypatch.setenv("FLYWHEEL_ROOT", str(root))
    assert find_root(Path("/")) == root.resolve()
    monkeypatch.setenv("FLYWHEEL_ROOT", str(deep))
    with pytest.raises(SettingsError, match="FLYWHEEL_ROOT"):
        find_root()


@pytest.mark.parametrize(
    "yaml_text, key",
    [
        ("contract:\n  max_turnz: 3\n", "contract.max_turnz"),
        ("settings:\n  raw_stor: x\n", "settings.raw_stor"),
        ("ingest:\n  checks:\n    max_pii: 0.1\n", "ingest.checks.max_pii"),
        ("validate:\n  min_rowz: 3\n", "validate.min_rowz"),
        ("prepare:\n  split:\n    tst_pct: 3\n", "prepare.split.tst_pct"),
    ],
)
def test_wrong_key_fails_naming_it(tmp_path, yaml_text, key):
    with pytest.raises(SettingsError) as err:
        load_settings(workspace(tmp_path, yaml_text), env={})
    assert key in str(err.value)
    assert "validate_" not in str(err.value)


@pytest.mark.parametrize(
    "yaml_text, key",
    [
        ("contract:\n  max_turns: many\n", "contract.max_turns"),
        ("contract:\n  max_text_chars: 0\n", "contract.max_text_chars"),
        ("ingest:\n  chunk_events: [1, 2]\n", "ingest.chunk_events"),
        ("ingest:\n  checks:\n    max_pii_rate: 2\n", "ingest.checks.max_pii_rate"),
        ("validate:\n  min_rows: ten\n", "validate.min_rows"),
        ("prepare:\n  near_dup_threshold: high\n", "prepare.near_dup_threshold"),
        ("prepare:\n  split: 20\n", "prepare.split"),
        ("settings:\n  raw_store: [a]\n", "settings.raw_store"),
        ("settings: 5\n", "settings"),
    ],
)
def test_wrong_type_fails_naming_the_key(tmp_path, yaml_text, key):
    with pytest.raises(SettingsError) as err:
        load_settings(workspace(tmp_path, yaml_text), env={})
    assert f"{key}:" in str(err.value)


@pytest.mark.parametrize("yaml_text", ["- a\n- b\n", "a: [\n"])
def test_malformed_params_yaml_fails(tmp_path, yaml_text):
    (tmp_path / "params.yaml").write_text(yaml_text)
    with pytest.raises(SettingsError, match="params.yaml"):
        load_params(tmp_path / "params.yaml")


@pytest.mark.parametrize(
    "setting, value",
    [
        ("tracking_uri", "ftp://host/mlflow"),
        ("registry_uri", "gopher://host/x"),
        ("feedback_store", "redis://localhost:6379"),
    ],
)
def test_bad_uri_scheme_fails_naming_the_setting(tmp_path, setting, value):
    with pytest.raises(SettingsError) as err:
        load_settings(workspace(tmp_path), env={f"FLYWHEEL_{setting.upper()}": value})
    assert setting in str(err.value)
    assert value.split("://")[0] in str(err.value)


def test_bad_uri_in_params_yaml_fails_too(tmp_path):
    with pytest.raises(SettingsError, match="tracking_uri"):
        load_settings(workspace(tmp_path, "settings:\n  tracking_uri: ftp://h/x\n"), env={})


@pytest.mark.parametrize("setting", ["raw_store", "tracking_uri"])
def test_empty_setting_fails_naming_it(tmp_path, setting):
    with pytest.raises(SettingsError, match=setting):
        load_settings(workspace(tmp_path), env={f"FLYWHEEL_{setting.upper()}": ""})


def test_shipped_params_yaml_loads(repo_root):
    s = load_settings(repo_root, env={})
    assert s.params.ingest.checks.max_pii_rate == 0.5
    assert s.raw_store == repo_root / "data" / "raw"


PROFILES = (
    "profile: small\nprepare:\n  minhash_perms: 64\n  shingle_chars: 5\n"
    "profiles:\n  small:\n    prepare: {minhash_perms: 16}\n  other: {}\n"
)


def test_profile_overrides_are_merged(tmp_path):
    s = load_settings(workspace(tmp_path, PROFILES), env={})
    assert s.profile == "small"
    assert s.params.prepare.minhash_perms == 16
    assert s.params.prepare.shingle_chars == 5  # siblings of an overridden key are kept


def test_profile_from_env_wins(tmp_path):
    s = load_settings(workspace(tmp_path, PROFILES), env={"FLYWHEEL_PROFILE": "other"})
    assert s.profile == "other" and s.params.prepare.minhash_perms == 64


def test_unknown_profile_fails_naming_it(tmp_path):
    with pytest.raises(SettingsError, match="profile.*'nope'"):
        load_settings(workspace(tmp_path, PROFILES), env={"FLYWHEEL_PROFILE": "nope"})


def test_profile_override_is_checked_like_the_rest(tmp_path):
    text = "profile: bad\nprofiles:\n  bad:\n    contract: {max_turns: lots}\n"
    with pytest.raises(SettingsError, match="contract.max_turns"):
        load_settings(workspace(tmp_path, text), env={})


@pytest.mark.parametrize(
    "key,override",
    [
        ("bless", "bless: {gate: permissive}"),
        ("release", "release: {smoke: {min_chars: 0}}"),
        ("evaluate.confidence", "evaluate: {confidence: 0.5}"),
    ],
)
def test_a_profile_that_touches_the_gate_is_a_load_error_naming_the_key(tmp_path, key, override):
    text = f"profile: demo\nprofiles:\n  demo: {{}}\n  weak:\n    {override}\n"
    # even when the profile is not the one chosen: a profile is one trigger param away from being chosen
    with pytest.raises(SettingsError, match=rf"profiles\.weak\.{key}: a profile may not override"):
        load_settings(workspace(tmp_path, text), env={})


def test_no_shipped_profile_changes_the_gate(repo_root):
    from flywheel.params import BlessParams
    from pipelines.bless import gate_in_force

    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    in_force = gate_in_force(BlessParams.model_validate(raw["bless"]))
    assert in_force.name == "default"
    for profile in raw["profiles"]:
        s = load_settings(repo_root, env={"FLYWHEEL_PROFILE": profile})
        assert s.profile == profile
        assert gate_in_force(s.params.section("bless")) == in_force, profile
        assert s.params.section("release").model_dump() == raw["release"], profile


# ---- production settings and the reachability check (flywheel/production.py, `flywheel check`) ----------


def test_production_settings_default_empty_and_follow_the_precedence(tmp_path):
    s = load_settings(workspace(tmp_path), env={})
    assert (s.airflow_db, s.celery_broker) == ("", "")
    root = workspace(tmp_path, "settings:\n  celery_broker: redis://params:6379/0\n")
    assert load_settings(root, env={}).celery_broker == "redis://params:6379/0"
    env = {"FLYWHEEL_CELERY_BROKER": "redis://env:6379/0", "FLYWHEEL_AIRFLOW_DB": "postgresql://af@db/airflow"}
    s = load_settings(root, env=env)
    assert (s.celery_broker, s.airflow_db) == ("redis://env:6379/0", "postgresql://af@db/airflow")


def test_airflow_variables_feed_the_settings_unless_flywheel_ones_are_set(tmp_path):
    root = workspace(tmp_path)
    airflow = {
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql+psycopg2://af@db/airflow",
        "AIRFLOW__CELERY__BROKER_URL": "redis://redis:6379/0",
    }
    s = load_settings(root, env=airflow)
    assert (s.airflow_db, s.celery_broker) == ("postgresql+psycopg2://af@db/airflow", "redis://redis:6379/0")
    s = load_settings(root, env={**airflow, "FLYWHEEL_CELERY_BROKER": "amqp://mq:5672//"})
    assert s.celery_broker == "amqp://mq:5672//"


def test_relative_airflow_db_becomes_absolute_sqlite_uri(tmp_path):
    s = load_settings(workspace(tmp_path), env={"FLYWHEEL_AIRFLOW_DB": "af/airflow.db"})
    assert s.airflow_db == "sqlite:///" + str(tmp_path.resolve() / "af" / "airflow.db")


@pytest.mark.parametrize(
    "setting, value",
    [
        ("airflow_db", "http://u:hunter2@db/airflow"),
        ("celery_broker", "postgresql://u:hunter2@db/x"),
        ("celery_broker", "localhost:6379"),
        ("tracking_uri", "ftp://u:hunter2@host/mlflow"),
    ],
)
def test_bad_production_url_fails_naming_the_setting_without_its_password(tmp_path, setting, value):
    with pytest.raises(SettingsError) as err:
        load_settings(workspace(tmp_path), env={f"FLYWHEEL_{setting.upper()}": value})
    assert setting in str(err.value)
    assert "hunter2" not in str(err.value)


@pytest.mark.parametrize(
    "url, masked",
    [
        ("postgresql+psycopg2://flywheel:s3cr:et@db:5432/fw", "postgresql+psycopg2://flywheel:***@db:5432/fw"),
        ("redis://:s3cret@redis:6379/0", "redis://:***@redis:6379/0"),
        ("http://mlflow:5000", "http://mlflow:5000"),
        ("postgresql://flywheel@db/fw", "postgresql://flywheel@db/fw"),
        ("s3://bucket/a@b", "s3://bucket/a@b"),
    ],
)
def test_mask_url_hides_the_password_only(url, masked):
    from flywheel.settings import mask_url

    assert mask_url(url) == masked


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def listening_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_unreachable_service_fails_naming_the_setting_with_the_password_masked(tmp_path):
    from flywheel.production import check_reachable

    port = _closed_port()
    url = f"postgresql+psycopg2://flywheel:s3cret@127.0.0.1:{port}/feedback"
    s = load_settings(workspace(tmp_path), env={"FLYWHEEL_FEEDBACK_STORE": url})
    with pytest.raises(SettingsError) as err:
        check_reachable(s, env={})
    message = str(err.value)
    assert message == (
        f"settings.feedback_store: cannot reach postgresql+psycopg2://flywheel:***@127.0.0.1:{port}"
        f"/feedback (connection refused)"
    )
    assert "s3cret" not in message


def test_every_unreachable_setting_is_named_once(tmp_path):
    from flywheel.production import check_reachable

    port = _closed_port()
    env = {
        "FLYWHEEL_TRACKING_URI": f"http://127.0.0.1:{port}",
        "FLYWHEEL_CELERY_BROKER": f"redis://127.0.0.1:{port}/0",
        "FLYWHEEL_DVC_REMOTE": "s3://dvc/flywheel",
    }
    s = load_settings(workspace(tmp_path), env=env)
    with pytest.raises(SettingsError) as err:
        check_reachable(s, env={"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
    lines = str(err.value).splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "settings.celery_broker",
        "settings.tracking_uri",
        "settings.registry_uri",
        "settings.dvc_remote",
    ]
    assert f"s3://dvc/flywheel via 127.0.0.1:{port}" in lines[-1]


def test_listening_services_pass(tmp_path, listening_port):
    from flywheel.production import check_reachable, probe

    here = f"127.0.0.1:{listening_port}"
    env = {
        "FLYWHEEL_AIRFLOW_DB": f"postgresql://af:pw@{here}/airflow",
        "FLYWHEEL_CELERY_BROKER": f"redis://{here}/0",
        "FLYWHEEL_TRACKING_URI": f"http://{here}",
        "FLYWHEEL_FEEDBACK_STORE": f"postgresql://fw:pw@{here}/fw",
        "FLYWHEEL_DVC_REMOTE": "s3://dvc/flywheel",
    }
    s = load_settings(workspace(tmp_path), env=env)
    endpoint = {"AWS_ENDPOINT_URL": f"http://{here}"}
    check_reachable(s, env=endpoint)
    results = probe(s, env=endpoint)
    assert [p.target for p in results] == [here] * 6
    assert all(p.ok and not p.skipped for p in results)


def test_empty_and_local_settings_are_skipped_without_connecting(tmp_path, monkeypatch):
    import socket

    from flywheel.production import check_reachable, probe

    def no_network(*args, **kwargs):
        raise AssertionError("a local setting must not be connected to")

    monkeypatch.setattr(socket, "create_connection", no_network)
    s = load_settings(workspace(tmp_path), env={"FLYWHEEL_DVC_REMOTE": "remote"})
    check_reachable(s, env={})
    assert all(p.skipped for p in probe(s, env={}))


def test_names_limit_the_check(tmp_path, listening_port):
    from flywheel.production import check_reachable

    env = {
        "FLYWHEEL_TRACKING_URI": f"http://127.0.0.1:{listening_port}",
        "FLYWHEEL_FEEDBACK_STORE": f"postgresql://fw@127.0.0.1:{_closed_port()}/fw",
    }
    s = load_settings(workspace(tmp_path), env=env)
    check_reachable(s, names=["tracking_uri"], env={})
    with pytest.raises(SettingsError, match="feedback_store"):
        check_reachable(s, names=["feedback_store"], env={})
    with pytest.raises(SettingsError, match="raw_store"):
        check_reachable(s, names=["raw_store"], env={})


def test_cli_check_prints_one_line_per_setting_and_exits_1_on_a_failure(tmp_path, monkeypatch, listening_port):
    from typer.testing import CliRunner

    from flywheel.cli import app
    from flywheel.production import NETWORK_SETTINGS

    for var in (
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
        "AIRFLOW__CELERY__BROKER_URL",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("FLYWHEEL_ROOT", str(workspace(tmp_path)))
    monkeypatch.setenv("FLYWHEEL_TRACKING_URI", f"http://127.0.0.1:{listening_port}")
    ok = CliRunner().invoke(app, ["check"])
    assert ok.exit_code == 0, ok.output
    assert len(ok.output.splitlines()) == len(NETWORK_SETTINGS)
    monkeypatch.setenv("FLYWHEEL_CELERY_BROKER", f"redis://:pw@127.0.0.1:{_closed_port()}/0")
    failed = CliRunner().invoke(app, ["check", "--timeout", "1"])
    assert failed.exit_code == 1
    assert any(
        line.startswith("error") and "settings.celery_broker" in line and "redis://:***@" in line
        for line in failed.output.splitlines()
    ), failed.output
    assert any(line.startswith("ok") and "settings.tracking_uri" in line for line in failed.output.splitlines())


def test_airflow_task_processes_placeholder_db_url_is_not_a_setting(tmp_path):
    """Airflow 3 runs tasks with AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=airflow-db-not-allowed:/// (the supervisor's
    guard): loading settings inside a task must not fail on it, nor take it as the Airflow DB."""
    workspace(tmp_path)
    s = load_settings(tmp_path, env={"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "airflow-db-not-allowed:///"})
    assert s.airflow_db == ""
