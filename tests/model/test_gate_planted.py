"""Planted challengers through evaluation, the default gate of params.yaml and release:
clearly better is promoted; label-swapped (clearly worse) and indistinguishable are not."""

from __future__ import annotations

import copy
import shutil

import pytest

from flywheel.registry import CHAMPION, POLICY, Registry, content_hash
from flywheel.release import SmokeParams, bootstrap, release
from flywheel.settings import load_settings
from pipelines.bless import GateParams, bless
from pipelines.dpo import DPOParams, train_dpo
from pipelines.evaluate import EvalParams, evaluate_policy, evaluate_reward
from pipelines.policy_model import encode, load_policy
from pipelines.reward_model import RewardModel
from pipelines.train_policy import save
from tests.model.conftest import synthetic_pairs

EVAL = EvalParams(max_prompt_tokens=32, max_answer_tokens=8, batch_size=8, frozen_layers=2, judged_prompts=2,
                  redteam_prompts=2, benign_prompts=2, max_new_tokens=3, bootstrap=300)


@pytest.fixture(scope="module")
def planted(tiny_base):
    ref, tok = load_policy(tiny_base / "policy")
    out = {}
    for name, swap in (("better", False), ("worse", True)):
        model = copy.deepcopy(ref)
        train_dpo(model, encode(tok, synthetic_pairs(16, swap=swap), 32, 8), [], tok.pad_token_id,
                  DPOParams(frozen_layers=2, steps=12, batch_size=4, lr=5e-3, warmup_steps=1, beta=0.5))
        out[name] = model
    out["same"] = copy.deepcopy(ref)
    return ref, tok, out


def _verdict(repo_root, tiny_base, planted, name):
    ref, tok, models = planted
    judge = RewardModel.load(tiny_base / "reward")
    test = synthetic_pairs(48, start=200)
    metrics = {"policy": evaluate_policy(ref, ref, models[name], tok, judge, test, ["say yes", "say no"],
                                         [{"prompt": "yes", "must_include": [], "must_not_include": ["zzz"]}], EVAL),
               "reward": evaluate_reward(judge, judge, test, EVAL)}
    settings = load_settings(repo_root, env={})
    gate = GateParams.model_validate(settings.params.section("bless")["gates"]["default"])
    return bless(metrics, gate)["policy"]


@pytest.mark.parametrize("name,blessed", [("better", True), ("worse", False), ("same", False)])
def test_default_gate_on_planted_challengers(repo_root, tiny_base, planted, name, blessed):
    verdict = _verdict(repo_root, tiny_base, planted, name)
    assert verdict["blessed"] is blessed, verdict["reasons"]
    if not blessed:
        assert any("not better beyond noise" in r for r in verdict["reasons"])


def test_only_the_better_challenger_is_promoted(tmp_path, repo_root, tiny_base, planted):
    shutil.copy(repo_root / "params.yaml", tmp_path / "params.yaml")
    settings = load_settings(tmp_path, env={})
    reg = Registry(settings)
    bootstrap(reg, tiny_base)
    _, tok, models = planted
    smoke = SmokeParams(prompts=["hello"], max_new_tokens=2, min_chars=0)
    for name in ("worse", "same", "better"):
        folder = tmp_path / name
        save(copy.deepcopy(models[name]), tok, folder / "policy")
        shutil.copytree(tiny_base / "reward", folder / "reward")
        verdict = {"policy": _verdict(repo_root, tiny_base, planted, name),
                   "reward": {"blessed": False, "reasons": ["same as champion"]},
                   "candidates": {"policy": content_hash(folder / "policy")}}
        outcome = release(reg, folder, verdict, {}, smoke, log=lambda *_: None)[0]
        assert outcome.promoted is (name == "better")
    champion = reg.alias(POLICY, CHAMPION)
    assert champion.tags["content_hash"] == content_hash(tmp_path / "better" / "policy")
