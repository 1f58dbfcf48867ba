"""The trl back-end through the whole loop, the policy trained by two processes: `dvc repro` with
``train_policy.backend: trl``, ``devices: 2`` (``accelerate launch --cpu --num_processes 2``: DDP over gloo) and
``train_reward.backend: trl`` (TRL's RewardTrainer), then `flywheel release` registers the one challenger."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.e2e.conftest import ingest_demo_rows
from tests.model.families import build_family, build_seqcls_reward

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_two_process_trl_training_writes_one_challenger_one_run_and_releases(repo_copy, sh):
    build_family(repo_copy / "team-models" / "policy", "qwen2", layers=4)
    build_seqcls_reward(repo_copy / "team-models" / "reward")
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["profile"] = "tiny"
    params["bless"]["gate"] = "permissive"
    params["release"]["smoke"]["min_chars"] = 0  # random weights may answer with nothing
    params["models"]["policy"].update(source="team-models/policy", dtype="float32")
    params["models"]["reward"]["source"] = "team-models/reward"
    params["train_policy"].update(backend="trl", devices=2, adapter="lora", frozen_layers=2, method="dpo")
    params["train_reward"].update(backend="trl")
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ingest_demo_rows(repo_copy, sh)

    repro = sh(["dvc", "repro"], repo_copy, timeout=1500)
    assert repro.returncode == 0, repro.stdout[-3000:] + repro.stderr[-3000:]
    assert "train_policy: 2 processes" in repro.stdout + repro.stderr
    policy = json.loads((repo_copy / "metrics/train_policy.json").read_text())
    assert policy["backend"] == "trl" and policy["processes"] == 2 and policy["saved"] == "adapter"
    reward = json.loads((repo_copy / "metrics/train_reward.json").read_text())
    assert reward["backend"] == "trl" and reward["steps"] >= 1
    assert (repo_copy / "models/challenger/policy/adapter_model.safetensors").is_file()
    assert json.loads((repo_copy / "models/challenger/reward/flywheel_reward.json").read_text())["kind"] == "seqcls"

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo_copy / 'mlruns.db'}")
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.mlflow.runName = 'train_policy'")
    assert len(runs) == 1  # one MLflow run for the two processes
    run_id = runs.iloc[0]["run_id"]
    history = mlflow.MlflowClient().get_metric_history(run_id, "loss")
    assert len(history) == params["profiles"]["tiny"]["train_policy"]["steps"]  # a loss per step, as the fast loop

    release = sh(["flywheel", "release", "--json"], repo_copy, timeout=900)
    assert release.returncode == 0, release.stdout + release.stderr
    out = {r["model"]: r for r in json.loads(release.stdout.strip().splitlines()[-1])}
    assert out["policy"]["promoted"] and out["policy"]["version"] == "2", json.dumps(out, indent=1)
    assert out["reward"]["promoted"] and out["reward"]["version"] == "2", json.dumps(out, indent=1)
