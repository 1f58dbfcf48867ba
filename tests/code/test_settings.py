"""flywheel.settings: precedence, absolute paths, and bad values failing with the setting's name."""

from __future__ import annotations

from pathlib import Path

import pytest

from flywheel.settings import SettingsError, find_root, load_params, load_settings


def workspace(tmp_path: Path, params: str = "") -> Path:
    (tmp_path / "params.yaml").write_text(params)
    return tmp_path


def test_defaults_when_params_yaml_is_empty(tmp_path):
    s = load_settings(workspace(tmp_path), env={})
    assert s.root == tmp_path.resolve()
    assert s.raw_store == tmp_path.resolve() / "data" / "raw"
    assert s.quarantine == tmp_path.resolve() / "data" / "quarantine"
    assert s.tracking_uri == "sqlite:///" + str(tmp_path.resolve() / "mlruns.db")
    assert s.registry_uri == s.tracking_uri  # empty registry_uri: same as tracking
    assert s.params.contract.max_text_chars == 16000
    assert s.params.prepare.split.test_pct == 20


def test_params_yaml_over_defaults(tmp_path):
    root = workspace(tmp_path, "settings:\n  raw_store: store/raw\ncontract:\n  max_turns: 7\n"
                               "prepare:\n  split:\n    test_pct: 5\n")
    s = load_settings(root, env={})
    assert s.raw_store == tmp_path.resolve() / "store" / "raw"
    assert s.params.contract.max_turns == 7
    assert s.params.prepare.split.test_pct == 5
    assert s.params.prepare.split.val_pct == 10  # untouched sibling keeps its default


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


@pytest.mark.parametrize("key", ["raw_store", "quarantine", "prepared", "reports", "models", "artifact_root",
                                 "airflow_home"])
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


@pytest.mark.parametrize("yaml_text, key", [
    ("contract:\n  max_turnz: 3\n", "contract.max_turnz"),
    ("settings:\n  raw_stor: x\n", "settings.raw_stor"),
    ("ingest:\n  checks:\n    max_pii: 0.1\n", "ingest.checks.max_pii"),
    ("validate:\n  min_rowz: 3\n", "validate.min_rowz"),
    ("prepare:\n  split:\n    tst_pct: 3\n", "prepare.split.tst_pct"),
])
def test_wrong_key_fails_naming_it(tmp_path, yaml_text, key):
    with pytest.raises(SettingsError) as err:
        load_settings(workspace(tmp_path, yaml_text), env={})
    assert key in str(err.value)
    assert "validate_" not in str(err.value)


@pytest.mark.parametrize("yaml_text, key", [
    ("contract:\n  max_turns: many\n", "contract.max_turns"),
    ("contract:\n  max_text_chars: 0\n", "contract.max_text_chars"),
    ("ingest:\n  chunk_events: [1, 2]\n", "ingest.chunk_events"),
    ("ingest:\n  checks:\n    max_pii_rate: 2\n", "ingest.checks.max_pii_rate"),
    ("validate:\n  min_rows: ten\n", "validate.min_rows"),
    ("prepare:\n  near_dup_threshold: high\n", "prepare.near_dup_threshold"),
    ("prepare:\n  split: 20\n", "prepare.split"),
    ("settings:\n  raw_store: [a]\n", "settings.raw_store"),
    ("settings: 5\n", "settings"),
])
def test_wrong_type_fails_naming_the_key(tmp_path, yaml_text, key):
    with pytest.raises(SettingsError) as err:
        load_settings(workspace(tmp_path, yaml_text), env={})
    assert f"{key}:" in str(err.value)


@pytest.mark.parametrize("yaml_text", ["- a\n- b\n", "a: [\n"])
def test_malformed_params_yaml_fails(tmp_path, yaml_text):
    with pytest.raises(SettingsError, match="params.yaml"):
        load_params(workspace(tmp_path, yaml_text) / "params.yaml")


@pytest.mark.parametrize("setting, value", [
    ("tracking_uri", "ftp://host/mlflow"),
    ("registry_uri", "gopher://host/x"),
    ("feedback_store", "redis://localhost:6379"),
])
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


PROFILES = ("profile: small\nprepare:\n  minhash_perms: 64\n  shingle_chars: 5\n"
            "profiles:\n  small:\n    prepare: {minhash_perms: 16}\n  other: {}\n")


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
