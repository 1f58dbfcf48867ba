"""Planted challengers through evaluation, the default gate of params.yaml and release:
clearly better is promoted; label-swapped (clearly worse) and indistinguishable are not. The default gate
also runs end to end on what the evaluate stage writes (metrics/evaluate.json) with a judge that discriminates,
and with one that cannot (its metrics are then not applied, never passes)."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
from shipped import shipped

from flywheel.evaluation.policy_eval import evaluate_policy
from flywheel.evaluation.reward_eval import evaluate_reward
from flywheel.models.dpo import train_dpo
from flywheel.models.policy import encode, load_policy
from flywheel.models.reward import RewardModel, train_reward
from flywheel.registry import CHALLENGER, CHAMPION, POLICY, REWARD, Registry, content_hash
from flywheel.release import bootstrap, release
from flywheel.settings import load_settings
from pipelines.bless import bless, gate_in_force
from pipelines.bless import stage as bless_stage
from pipelines.evaluate import stage as evaluate_stage
from pipelines.train_policy import save
from tests.model.conftest import hh_lines, synthetic_pairs

EVAL = shipped(
    "evaluate",
    max_prompt_tokens=32,
    max_answer_tokens=8,
    batch_size=8,
    frozen_layers=2,
    judged_prompts=2,
    redteam_prompts=2,
    benign_prompts=2,
    max_new_tokens=3,
    bootstrap=300,
    bf16=False,
)
DPO = dict(
    frozen_layers=2, steps=12, batch_size=4, lr=5e-3, warmup_steps=1, beta=0.5, sft_weight=0.0, frozen_bf16=False
)


@pytest.fixture(scope="module")
def planted(tiny_base):
    ref, tok = load_policy(tiny_base / "policy")
    out = {}
    for name, swap in (("better", False), ("worse", True)):
        model = copy.deepcopy(ref)
        train_dpo(
            model,
            encode(tok, synthetic_pairs(16, swap=swap), 32, 8),
            [],
            tok.pad_token_id,
            shipped("train_policy", **DPO),
        )
        out[name] = model
    out["same"] = copy.deepcopy(ref)
    return ref, tok, out


def _verdict(repo_root, tiny_base, planted, name):
    ref, tok, models = planted
    judge = RewardModel.load(tiny_base / "reward")
    test = synthetic_pairs(48, start=200)
    metrics = {
        "policy": evaluate_policy(
            ref,
            ref,
            models[name],
            tok,
            judge,
            test,
            ["say yes", "say no"],
            [{"prompt": "yes", "must_include": [], "must_not_include": ["zzz"]}],
            EVAL,
            golden=synthetic_pairs(24, start=400),
        ),
        "reward": evaluate_reward(judge, judge, test, EVAL, synthetic_pairs(24, start=400)),
    }
    settings = load_settings(repo_root, env={})
    gate = settings.params.bless.gates["default"]
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
    gate = gate_in_force(settings.params.section("bless"))
    reg = Registry(settings)
    bootstrap(reg, tiny_base)
    _, tok, models = planted
    smoke = shipped("release").smoke.updated(prompts=["hello"], max_new_tokens=2, min_chars=0)
    for name in ("worse", "same", "better"):
        folder = tmp_path / name
        save(copy.deepcopy(models[name]), tok, folder / "policy")
        shutil.copytree(tiny_base / "reward", folder / "reward")
        verdict = {
            "policy": _verdict(repo_root, tiny_base, planted, name),
            "reward": {"blessed": False, "reasons": ["same as champion"]},
            "candidates": {"policy": content_hash(folder / "policy")},
            "gate": gate.name,
            "gate_sha256": gate.sha256,
        }
        outcome = release(reg, folder, verdict, {}, smoke, log=lambda *_: None, gates={gate.name: gate.sha256})[0]
        assert outcome.promoted is (name == "better")
    champion = reg.alias(POLICY, CHAMPION)
    assert champion.tags["content_hash"] == content_hash(tmp_path / "better" / "policy")


# ---- the default gate on the evaluate stage's own output ----------------------------------------------------
STAGE_EVAL = EVAL.updated(judged_prompts=4, redteam_prompts=8, benign_prompts=4, max_new_tokens=6)


@pytest.fixture(scope="module")
def speaking(tiny_base):
    """Planted challengers that also say their answer (DPO + SFT on their chosen answers), so the judge has
    different answers to compare: "the good answer is help..." (better), "the rude ..." (worse), "" (the base)."""
    ref, tok = load_policy(tiny_base / "policy")
    out = {}
    for name, swap in (("better", False), ("worse", True)):
        model = copy.deepcopy(ref)
        pairs = synthetic_pairs(16, swap=swap)
        sft = encode(
            tok, [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs], 32, 8, fields=("completion",)
        )
        train_dpo(
            model,
            encode(tok, pairs, 32, 8),
            sft,
            tok.pad_token_id,
            shipped("train_policy", **{**DPO, "sft_weight": 1.0, "sft_batch_size": 4}),
        )
        out[name] = model
    return ref, tok, out


@pytest.fixture(scope="module")
def real_judge(tiny_base, tmp_path_factory):
    """A reward model that learned the planted preference: a judge that discriminates."""
    model = RewardModel.load(tiny_base / "reward")
    train_reward(
        model, synthetic_pairs(16), shipped("train_reward", frozen_encoder=True, epochs=40, head_lr=5e-2, max_length=64)
    )
    return model.save(tmp_path_factory.mktemp("judge") / "reward")


@pytest.fixture(scope="module")
def stage_workspace(tmp_path_factory, repo_root):
    ws = tmp_path_factory.mktemp("gate-ws")
    shutil.copy(repo_root / "params.yaml", ws / "params.yaml")  # the shipped gate: default
    (ws / "golden.jsonl").write_text("\n".join(hh_lines(synthetic_pairs(24, start=400))) + "\n")
    return load_settings(ws, env={})


def _run_stages(settings, repo_root, tiny_base, judge, planted, name: str):
    """evaluate then bless, by their stage() functions as `flywheel stage` runs them for dvc repro (models from
    folders, champion.json, metrics/evaluate.json, MLflow runs); returns (run folder, metrics, blessing)."""
    ref, tok, models = planted
    run = settings.root / f"{name}-{judge.parent.name}"
    save(copy.deepcopy(models[name]), tok, run / "challenger" / "policy")
    shutil.copytree(judge, run / "challenger" / "reward")
    prepared = run / "prepared"
    prepared.mkdir(parents=True)
    test = "".join(json.dumps(p) + "\n" for p in synthetic_pairs(48, start=200))
    for f in ("pairs-test.jsonl", "reward_pairs-test.jsonl"):
        (prepared / f).write_text(test)
    champion = {
        "policy": {"name": POLICY, "version": "base", "path": str(tiny_base / "policy"), "content_hash": None},
        "reward": {"name": REWARD, "version": "7", "path": str(judge), "content_hash": None},
    }
    (run / "champion.json").write_text(json.dumps(champion))
    line = evaluate_stage(
        settings,
        STAGE_EVAL.updated(golden_pairs=20),  # of the golden file's 24 pairs
        shipped("golden", path="golden.jsonl", format="hh-rlhf"),
        shipped("score_cache"),
        champion=run / "champion.json",
        base=tiny_base,
        challenger=run / "challenger",
        prepared=prepared,
        suites=repo_root / "eval",
        out=run / "reports" / "evaluate",
        metrics=run / "metrics" / "evaluate.json",
        summary=run / "metrics" / "evaluate_summary.json",
    )
    assert line.startswith("evaluate: policy accuracy "), line
    line = bless_stage(
        settings,
        settings.params.section("bless"),
        metrics=run / "metrics" / "evaluate.json",
        out=run / "reports" / "blessing.json",
    )
    assert line.startswith("bless (default gate, judge: ") and line.count("blessed") == 2, line
    return (
        run,
        json.loads((run / "metrics" / "evaluate.json").read_text()),
        json.loads((run / "reports" / "blessing.json").read_text()),
    )


def test_default_gate_end_to_end_on_evaluate_stage_output_with_a_real_judge(
    stage_workspace, repo_root, tiny_base, real_judge, speaking
):
    settings = stage_workspace
    gate = gate_in_force(settings.params.section("bless"))
    assert gate.name == "default"
    reg = Registry(settings)
    bootstrap(reg, tiny_base)
    smoke = shipped("release").smoke.updated(prompts=["hello"], max_new_tokens=2, min_chars=0)
    outcomes = {}
    for name in ("worse", "better"):
        run, metrics, blessing = _run_stages(settings, repo_root, tiny_base, real_judge, speaking, name)
        assert metrics["judge"]["status"] == "judge", metrics["judge"]
        assert (
            metrics["policy"]["golden_pref_accuracy"]["n"] == metrics["reward"]["golden_pairwise_accuracy"]["n"] == 20
        )
        assert blessing["gate"] == "default" and blessing["gate_sha256"] == gate.sha256
        assert blessing["judge"].startswith(f"{REWARD} v7 (")
        policy = blessing["policy"]
        # the judged safety check was really applied (the judge prefers "the good answer ..." to "" to "the rude
        # ..."); the 4 judged prompts are under judged_win_rate's min_n: reported as not applied
        assert any(r.startswith("judged_win_rate: not applied") for r in policy["not_applied"]), policy
        outcomes[name] = release(
            reg, run / "challenger", blessing, {}, smoke, log=lambda *_: None, gates={gate.name: gate.sha256}
        )[0]
        assert policy["blessed"] is (name == "better"), policy
        if name == "better":
            assert any(p.startswith("harmless_win_rate (rule): ") for p in policy["passed"]), policy
        else:
            assert any("not better beyond noise" in r for r in policy["reasons"])
            assert any(r.startswith("harmless_win_rate: 0.0000 is below the minimum 0.35") for r in policy["reasons"])
    assert outcomes["better"].promoted and not outcomes["worse"].promoted
    assert reg.alias(POLICY, CHAMPION).version == outcomes["better"].version
    assert reg.alias(POLICY, CHALLENGER) is None
    worse = reg.get(POLICY, outcomes["worse"].version).tags
    assert worse["refused"] and worse["gate"] == "default" and worse["judge"].startswith(REWARD)


def test_a_judge_that_cannot_discriminate_is_no_judge_and_its_checks_are_not_applied(
    stage_workspace, repo_root, tiny_base, speaking
):
    # turn 1: the judge is the base reward model, a zero head: every comparison ties (win rate 0.5 > 0.35)
    run, metrics, blessing = _run_stages(
        stage_workspace, repo_root, tiny_base, tiny_base / "reward", speaking, "better"
    )
    assert metrics["judge"]["status"] == "no judge" and "alike" in metrics["judge"]["reason"]
    assert metrics["policy"]["harmless_win_rate"]["not_applied"].startswith("no judge")
    policy = blessing["policy"]
    assert blessing["judge"] == "none"
    assert not any(r.startswith(("harmless_win_rate", "judged_win_rate")) for r in policy["passed"]), policy["passed"]
    assert any(r.startswith("harmless_win_rate: not applied: no judge") for r in policy["not_applied"])
    page = (run / "reports" / "blessing.md").read_text()
    assert "harmless_win_rate: not applied: no judge" in page
