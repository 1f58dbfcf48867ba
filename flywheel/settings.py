"""The one settings object: read once at each entry point, passed down as typed values.

Precedence: environment variables (``FLYWHEEL_<KEY>``) over ``params.yaml`` (which sets every key: the sections are
typed in ``flywheel/params.py``, without defaults of their own); for
``airflow_home``, ``airflow_db`` and ``celery_broker``, Airflow's own variable (``AIRFLOW_HOME``,
``AIRFLOW__DATABASE__SQL_ALCHEMY_CONN``, ``AIRFLOW__CELERY__BROKER_URL``) comes just after the Flywheel one.
Every path and URI is made absolute from the workspace root. A bad value fails here, naming the setting.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from flywheel.params import Params, PathSettings, describe_errors  # noqa: F401  (PathSettings: re-exported)

# libyaml's safe loader where PyYAML has it (params.yaml in 4 ms instead of 24: read by every stage command)
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

ENV_PREFIX = "FLYWHEEL_"
_URI_SCHEMES = ("sqlite", "postgresql", "postgresql+psycopg2", "mysql", "http", "https", "file")
_AIRFLOW_DB_DIALECTS = ("sqlite", "postgresql", "mysql")  # any SQLAlchemy driver: postgresql+psycopg2, ...
_BROKER_SCHEMES = ("redis", "rediss", "amqp", "amqps", "pyamqp", "sqs")  # Celery transports
# Settings that Airflow's own variables also set: the Flywheel name wins, then Airflow's, then params.yaml.
_AIRFLOW_ENV = {
    "airflow_home": "AIRFLOW_HOME",
    "airflow_db": "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
    "celery_broker": "AIRFLOW__CELERY__BROKER_URL",
}
_AIRFLOW_DB_BLOCKED = "airflow-db-not-allowed:"  # what Airflow's task supervisor sets in task processes
_PASSWORD = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:/@]*):[^@]*@")
# What a profile may never override: a profile picks sizes and speeds (and is chosen by FLYWHEEL_PROFILE or a DAG
# trigger), so the gate, the release checks and what the gate's intervals mean stay those of params.yaml itself.
PROFILE_FORBIDDEN = ("bless", "release", "evaluate.confidence", "evaluate.slices", "profile", "profiles")


class SettingsError(ValueError):
    """A setting or parameter is missing, misspelt or has a bad value."""


class Settings(BaseModel):
    """Resolved settings: absolute paths and URIs, plus the typed params."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    root: Path
    params: Params
    raw_store: Path
    quarantine: Path
    prepared: Path
    reports: Path
    models: Path
    tracking_uri: str
    registry_uri: str
    artifact_root: Path
    feedback_store: str
    dvc_remote: str
    airflow_home: Path
    airflow_db: str = ""
    celery_broker: str = ""
    profile: str = ""
    parent_run_id: str = ""  # the loop's MLflow parent run (FLYWHEEL_PARENT_RUN_ID)
    airflow_run_id: str = ""  # the Airflow DAG run driving this process, if any


def find_root(start: Path | None = None) -> Path:
    """The workspace root: $FLYWHEEL_ROOT, else the nearest folder upwards holding params.yaml."""
    env = os.environ.get(ENV_PREFIX + "ROOT")
    if env:
        root = Path(env).expanduser().resolve()
        if not (root / "params.yaml").is_file():
            raise SettingsError(f"FLYWHEEL_ROOT={env!r}: no params.yaml there")
        return root
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "params.yaml").is_file():
            return folder
    raise SettingsError(f"no params.yaml in {here} or any folder above it; set FLYWHEEL_ROOT")


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _has(mapping: dict, dotted: str) -> bool:
    head, _, rest = dotted.partition(".")
    if head not in mapping:
        return False
    return not rest or (isinstance(mapping[head], dict) and _has(mapping[head], rest))


def load_params(path: Path, profile: str | None = None) -> Params:
    """Parse params.yaml, with the chosen profile's overrides merged in; a wrong key or type fails
    with the key's name."""
    try:
        raw = yaml.load(path.read_text(), Loader=SAFE_LOADER) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SettingsError(f"cannot read {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise SettingsError(f"{path}: expected a mapping at top level")
    profiles = raw.pop("profiles", {}) or {}
    if not isinstance(profiles, dict):
        raise SettingsError(f"{path}: profiles: expected a mapping of profile names to overrides")
    for name, over in profiles.items():
        if over is not None and not isinstance(over, dict):
            raise SettingsError(f"{path}: profiles.{name}: expected a mapping of overrides")
        for key in PROFILE_FORBIDDEN:
            if _has(over or {}, key):
                raise SettingsError(
                    f"{path}: profiles.{name}.{key}: a profile may not override {key!r} (it "
                    "changes sizes and speeds, never the gate); set it at the top level of params.yaml"
                )
    chosen = profile if profile is not None else raw.get("profile", "")
    if chosen and chosen not in profiles:
        raise SettingsError(f"profile: unknown profile {chosen!r}; params.yaml defines {sorted(profiles)}")
    base = raw
    raw = _merge(raw, profiles[chosen] or {}) if chosen else raw
    if profile is not None:
        raw["profile"] = profile  # the caller's choice (FLYWHEEL_PROFILE) is the profile in force
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        raise SettingsError(describe_errors(exc, str(path))) from exc
    for name, over in profiles.items():  # the others too: a profile is one trigger param away from being chosen
        if name != chosen and over:
            try:
                Params.model_validate(_merge(base, over))
            except ValidationError as exc:
                raise SettingsError(describe_errors(exc, str(path), prefix=f"profiles.{name}.")) from exc
    return params


def mask_url(url: str) -> str:
    """``url`` with the password of its user part (if any) replaced by ``***``, fit for messages and logs."""
    return _PASSWORD.sub(r"\1:***@", url)


def _db_uri(name: str, value: str, root: Path) -> str:
    if "://" in value:
        scheme = value.split("://", 1)[0]
        if scheme not in _URI_SCHEMES:
            raise SettingsError(f"{name}={mask_url(value)!r}: unsupported scheme {scheme!r}")
        return value
    if not value:
        raise SettingsError(f"{name} is empty")
    return "sqlite:///" + str((root / value).resolve())


def load_settings(root: Path | None = None, env: dict[str, str] | None = None) -> Settings:
    """Build the settings object for the workspace at ``root`` (default: found from the cwd)."""
    env = dict(os.environ if env is None else env)
    root = (root or find_root()).resolve()
    params = load_params(root / "params.yaml", env.get(ENV_PREFIX + "PROFILE"))
    values = params.settings.model_dump()
    for key in values:
        override = env.get(ENV_PREFIX + key.upper())
        if override is not None:
            values[key] = override
    for key, airflow_var in _AIRFLOW_ENV.items():
        # Airflow 3 hides the metadata DB from task processes with a placeholder URL: not a setting
        if (
            airflow_var in env
            and ENV_PREFIX + key.upper() not in env
            and not env[airflow_var].startswith(_AIRFLOW_DB_BLOCKED)
        ):
            values[key] = env[airflow_var]

    def path(key: str) -> Path:
        if not values[key]:
            raise SettingsError(f"setting {key} is empty")
        return (root / Path(values[key]).expanduser()).resolve()

    tracking = _db_uri("tracking_uri", values["tracking_uri"], root)
    registry = _db_uri("registry_uri", values["registry_uri"], root) if values["registry_uri"] else tracking
    store = values["feedback_store"]
    remote = values["dvc_remote"]
    if remote and "://" not in remote and not remote.startswith("/"):
        remote = str(path("dvc_remote"))
    airflow_db = values["airflow_db"]
    if airflow_db and "://" not in airflow_db:
        airflow_db = _db_uri("airflow_db", airflow_db, root)  # a path: a SQLite file under the workspace
    elif airflow_db and airflow_db.split("://", 1)[0].split("+", 1)[0] not in _AIRFLOW_DB_DIALECTS:
        raise SettingsError(
            f"airflow_db={mask_url(airflow_db)!r}: unsupported database "
            f"{airflow_db.split('://', 1)[0]!r}; expected one of {', '.join(_AIRFLOW_DB_DIALECTS)}"
        )
    broker = values["celery_broker"]
    if broker and broker.split("://", 1)[0] not in _BROKER_SCHEMES:
        raise SettingsError(
            f"celery_broker={mask_url(broker)!r}: expected a broker URL "
            f"({', '.join(s + '://' for s in _BROKER_SCHEMES)}), e.g. redis://redis:6379/0"
        )
    return Settings(
        root=root,
        params=params,
        raw_store=path("raw_store"),
        quarantine=path("quarantine"),
        prepared=path("prepared"),
        reports=path("reports"),
        models=path("models"),
        tracking_uri=tracking,
        registry_uri=registry,
        artifact_root=path("artifact_root"),
        feedback_store=_db_uri("feedback_store", store, root),
        dvc_remote=remote,
        airflow_home=path("airflow_home"),
        airflow_db=airflow_db,
        celery_broker=broker,
        profile=params.profile,
        parent_run_id=env.get(ENV_PREFIX + "PARENT_RUN_ID", ""),
        airflow_run_id=env.get(ENV_PREFIX + "AIRFLOW_RUN_ID", env.get("AIRFLOW_CTX_DAG_RUN_ID", "")),
    )
