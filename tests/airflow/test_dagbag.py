"""Every DAG imports cleanly, carries the project's header, parses fast and imports nothing heavy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DAGS = sorted((REPO / "dags").glob("*.py"))
HEAVY = ("torch", "mlflow", "great_expectations", "transformers")


@pytest.fixture(scope="module")
def bag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags"))


def test_no_import_errors_and_the_three_dags(bag):
    assert bag.import_errors == {}
    assert set(bag.dag_ids) == {"continuous_improvement", "feedback_ingest", "rollback"}


def test_every_dag_has_the_header(bag):
    for dag in bag.dags.values():
        assert dag.tags, dag.dag_id
        assert "retries" in dag.default_args, dag.dag_id
        assert dag.doc_md and len(dag.doc_md) > 100, dag.dag_id
        assert dag.catchup is False and dag.start_date is not None, dag.dag_id
        assert all(t.retries == dag.default_args["retries"] or t.task_id == "approve_release" for t in dag.tasks), (
            dag.dag_id
        )


def test_continuous_improvement_runs_every_dvc_stage_in_order_in_the_pool(bag):
    import yaml

    dag = bag.dags["continuous_improvement"]
    stages = list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    chain = ["check_feedback", *stages, "record_training", "approval_needed"]
    for up, down in zip(chain, chain[1:]):
        assert dag.task_dict[down].upstream_task_ids == {up}, down
    assert dag.task_dict["release"].upstream_task_ids == {"approval_needed", "approve_release"}
    assert all(dag.task_dict[s].pool == "flywheel_dvc" for s in [*stages, "release", "check_feedback"])
    assert dag.max_active_runs == 1 and dag.default_args["retry_exponential_backoff"]
    assert set(dag.params) == {"dry_run", "force", "skip_release", "profile"}
    assert "flywheel-feedback" in str(dag.timetable) and "CronTriggerTimetable" in str(dag.timetable)
    assert bag.dags["feedback_ingest"].task_dict["export_feedback"].pool == "flywheel_dvc"
    queues = {s: dag.task_dict[s].queue for s in stages}
    assert queues == {s: "gpu" if s in ("train_reward", "train_policy", "evaluate") else "default" for s in stages}


@pytest.mark.parametrize(
    "dag_id,name,valid,invalid",
    [
        ("continuous_improvement", "profile", ["demo", "tiny"], ["", "nope"]),
        ("rollback", "to", ["3", ""], ["v3", "latest"]),
    ],
)
def test_optional_params_are_nullable_and_their_defaults_pass_their_own_schema(bag, dag_id, name, valid, invalid):
    from airflow.sdk.definitions.param import ParamValidationError

    param = bag.dags[dag_id].params.get_param(name)
    assert param.value is None and "null" in param.schema["type"]
    # the trigger form sends null for an empty field: it must validate (a "" default with type string did not)
    assert param.resolve(None) is None and param.resolve() is None
    for value in valid:
        assert param.resolve(value) == value
    for value in invalid:
        with pytest.raises(ParamValidationError):
            param.resolve(value)
    if "enum" in param.schema:
        assert None in param.schema["enum"] and set(param.schema.get("values_display", {})) >= set(param.schema["enum"])


def test_no_trigger_param_can_weaken_the_gate(bag):
    """Every value of every trigger param of continuous_improvement leaves the gate (and the release checks) those
    of params.yaml: only `profile` reaches the stages' environment (flywheel.orchestration.command_env), a
    profile cannot touch `bless` or `release`, and the release command never carries --allow-gate."""
    import itertools

    from flywheel import orchestration as orch
    from flywheel.settings import load_settings
    from pipelines.bless import gate_in_force

    dag = bag.dags["continuous_improvement"]
    base = load_settings(REPO, env={"FLYWHEEL_ROOT": str(REPO)}).params
    in_force = gate_in_force(base.section("bless"))
    assert in_force.name == "default"
    choices = {
        "profile": dag.params.get_param("profile").schema["enum"],
        "force": [False, True],
        "dry_run": [False, True],
        "skip_release": [False, True],
    }
    assert set(choices) == set(dag.params)
    for profile, *_ in itertools.product(*choices.values()):
        env = orch.command_env(REPO, "manual__trigger", profile or "", "loop-run")
        settings = load_settings(REPO, env=env)
        assert gate_in_force(settings.params.section("bless")) == in_force, profile
        assert settings.params.section("release") == base.section("release"), profile
        assert (
            not {k for k in env if k.startswith("FLYWHEEL_")}
            - {"FLYWHEEL_ROOT", "FLYWHEEL_AIRFLOW_RUN_ID", "FLYWHEEL_PROFILE", "FLYWHEEL_PARENT_RUN_ID"}
            - set(os.environ)
        )
    for approved_by, rejected_by in ((None, None), ("alice", None), (None, "bob")):
        assert not any(a.startswith("--allow-gate") for a in orch.release_command(approved_by, rejected_by))


@pytest.mark.parametrize("path", DAGS, ids=[p.stem for p in DAGS])
def test_each_file_parses_in_under_a_second_with_airflow_imported(path):
    import airflow.sdk  # noqa: F401  (the import itself is not the DAG file's cost)
    from airflow.dag_processing.dagbag import DagBag

    DagBag(dag_folder=str(path))  # warm: the providers' decorators and yaml
    t0 = time.perf_counter()
    bag = DagBag(dag_folder=str(path))
    took = time.perf_counter() - t0
    assert not bag.import_errors and bag.dags
    assert took < 1.0, f"{path.name} took {took:.2f} s to parse"


@pytest.mark.parametrize("path", DAGS, ids=[p.stem for p in DAGS])
def test_importing_a_dag_file_loads_no_heavy_library(path):
    code = (
        "import importlib.util, json, sys; "
        f"spec = importlib.util.spec_from_file_location('dagfile', {str(path)!r}); "
        "spec.loader.exec_module(importlib.util.module_from_spec(spec)); "
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
