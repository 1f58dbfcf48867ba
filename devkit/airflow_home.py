"""Airflow homes for a workspace: an Airflow of its own (SQLite), its database and DVC pool, and one DAG run with
``dag.test()`` in a subprocess (devkit/dagrun.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from devkit.workspaces import clean_env, sh

POOL = "flywheel_dvc"
DAGRUN = Path(__file__).resolve().parent / "dagrun.py"


def airflow_env(home: Path, root: Path, **extra: str) -> dict[str, str]:
    """An Airflow of its own (SQLite under ``home``) reading the workspace's dags/."""
    return clean_env(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__DAGS_FOLDER=str(root / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__PARALLELISM="4",
        AIRFLOW__LOGGING__LOGGING_LEVEL="INFO",
        **extra,
    )


def init_airflow(env: dict[str, str], cwd: Path) -> None:
    """Create the metadata database and the single-slot DVC pool (what `make airflow` does)."""
    sh(["airflow", "db", "migrate"], cwd, env, timeout=600)
    sh(["airflow", "pools", "set", POOL, "1", "one DVC command per workspace at a time"], cwd, env)


def dag_test(
    dag_id: str, env: dict[str, str], cwd: Path, conf: dict | None = None, timeout: float = 2400
) -> tuple[dict, str]:
    """``dag.test()`` in a subprocess; returns the summary and the whole output (the task logs)."""
    proc = sh([sys.executable, str(DAGRUN), dag_id, json.dumps(conf or {})], cwd, env, timeout=timeout, check=False)
    output = proc.stdout + proc.stderr
    line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("DAGRUN ")), None)
    assert line, f"dag.test of {dag_id} gave no summary (exit {proc.returncode}):\n{output[-5000:]}"
    return json.loads(line[len("DAGRUN ") :]), output
