"""The gate: better beyond noise and no regression, or no blessing; every reason written down."""

from __future__ import annotations

import pytest

from flywheel.evaluation.stats import correct_from_margin, mean_ci, paired_diff
from flywheel.params import BlessParams, GateParams, MetricRule
from pipelines.bless import bless, check_rule

# what a gate of params.yaml sets besides its rules (the code has no default for them)
PLAIN = {"primary_min_ci_lower": 0.0, "gated_slices": ["feedback_type", "turns"], "block_length_only_gain": False}
GATE = GateParams.model_validate(
    {
        "policy": {
            **PLAIN,
            "primary": "pref_accuracy",
            "metrics": {
                "pref_accuracy": {"min_value": 0.5},
                "benign_refusal_rate": {"direction": "lower", "max_regression_abs": 0.05},
                "judged_win_rate": {"min_value": 0.45, "min_n": 100},
            },
            "slice_rule": {"max_regression_abs": 0.1, "min_n": 20},
        },
        "reward": {**PLAIN, "primary": "pairwise_accuracy", "metrics": {}},
    }
)
# what evaluate writes when the champion reward model (the judge) tells chosen from rejected
JUDGE = {
    "name": "flywheel-reward",
    "version": "3",
    "content_hash": "ab" * 32,
    "status": "judge",
    "reason": "pairwise accuracy 0.700 (lower bound 0.610) on 100 pairs",
}


def _policy(challenger: list[float], champion: list[float], **extra) -> dict:
    m = {
        "pref_accuracy": paired_diff(challenger, champion, n_boot=500),
        "benign_refusal_rate": {"challenger": 0.0, "champion": 0.0, "n": 50},
        "judged_win_rate": {"value": 0.5, "ci": [0.4, 0.6], "n": 16},
        "slices": {},
    }
    m.update(extra)
    return m


def _reward(diff_positive: bool = True) -> dict:
    ch = [1.0] * 80 + [0.0] * 20 if diff_positive else [0.5] * 100
    return {"pairwise_accuracy": paired_diff(ch, [0.5] * 100, n_boot=500), "slices": {}}


def test_clearly_better_is_blessed():
    v = bless({"policy": _policy([1.0] * 70 + [0.0] * 30, [0.5] * 100), "reward": _reward()}, GATE)
    assert v["policy"]["blessed"] and v["reward"]["blessed"]
    assert not v["policy"]["reasons"]


def test_clearly_worse_is_not_blessed():
    v = bless({"policy": _policy([0.0] * 70 + [1.0] * 30, [0.5] * 100), "reward": _reward()}, GATE)
    assert not v["policy"]["blessed"]
    assert any("not better beyond noise" in r for r in v["policy"]["reasons"])
    assert any("below the minimum 0.5" in r for r in v["policy"]["reasons"])


def test_indistinguishable_within_the_interval_is_not_blessed():
    # 52% vs 50% on 100 items: the interval of the difference straddles 0
    v = bless({"policy": _policy([1.0] * 52 + [0.0] * 48, [0.5] * 100), "reward": _reward()}, GATE)
    assert not v["policy"]["blessed"]
    assert "not better beyond noise" in v["policy"]["reasons"][0]


def test_a_regression_elsewhere_blocks_a_better_primary():
    extra = {"benign_refusal_rate": {"challenger": 0.2, "champion": 0.05, "n": 50}}
    v = bless({"policy": _policy([1.0] * 70 + [0.0] * 30, [0.5] * 100, **extra), "reward": _reward()}, GATE)
    assert not v["policy"]["blessed"]
    assert any(r.startswith("benign_refusal_rate: regresses") for r in v["policy"]["reasons"])


def test_slice_regression_blocks_and_small_slices_are_not_gated():
    slices = {
        "turns=multi": {"challenger": 0.3, "champion": 0.6, "n": 40},
        "turns=single": {"challenger": 0.1, "champion": 0.9, "n": 5},
    }
    v = bless({"policy": _policy([1.0] * 70 + [0.0] * 30, [0.5] * 100, slices=slices), "reward": _reward()}, GATE)
    assert not v["policy"]["blessed"]
    assert any("turns=multi" in r for r in v["policy"]["reasons"])
    assert not any("turns=single" in r for r in v["policy"]["reasons"])


def test_missing_evaluation_is_never_blessed():
    v = bless({"reward": _reward()}, GATE)
    assert not v["policy"]["blessed"] and v["reward"]["blessed"]
    v = bless({"policy": {"slices": {}}, "reward": _reward()}, GATE)
    assert any("not measured" in r for r in v["policy"]["reasons"])


def test_small_sample_metric_is_reported_not_gated():
    extra = {"judged_win_rate": {"value": 0.1, "ci": [0.0, 0.3], "n": 16}}
    v = bless(
        {"policy": _policy([1.0] * 70 + [0.0] * 30, [0.5] * 100, **extra), "reward": _reward(), "judge": JUDGE}, GATE
    )
    assert v["policy"]["blessed"]
    # reported as not applied, never as a pass
    assert not any(r.startswith("judged_win_rate") for r in v["policy"]["passed"])
    assert (
        "judged_win_rate: not applied: 16 items scored, fewer than the rule's min_n 100" in v["policy"]["not_applied"]
    )
    extra = {"judged_win_rate": {"value": 0.1, "ci": [0.0, 0.3], "n": 400}}
    v = bless(
        {"policy": _policy([1.0] * 70 + [0.0] * 30, [0.5] * 100, **extra), "reward": _reward(), "judge": JUDGE}, GATE
    )
    assert not v["policy"]["blessed"]


SAFETY_GATE = GateParams.model_validate(
    {
        "policy": {**PLAIN, "primary": "pref_accuracy", "metrics": {"harmless_win_rate": {"min_value": 0.35}}},
        "reward": {**PLAIN, "primary": "pairwise_accuracy", "metrics": {}},
    }
)


@pytest.mark.parametrize(
    "judge",
    [
        None,
        {
            "name": "flywheel-reward",
            "version": "base",
            "status": "no judge",
            "reason": "it scores chosen and rejected alike on all 40 pairs",
        },
    ],
)
def test_metrics_of_a_judge_that_cannot_discriminate_are_never_passes(judge):
    # turn 1: the judge is the base reward model (zero head): every comparison ties, a win rate of 0.5 > 0.35
    tie = {"value": 0.5, "ci": [0.5, 0.5], "n": 16}
    metrics = {"policy": _policy([1.0] * 70 + [0.0] * 30, [0.5] * 100, harmless_win_rate=tie), "reward": _reward()}
    if judge:
        metrics["judge"] = judge
    v = bless(metrics, SAFETY_GATE)["policy"]
    assert not any(r.startswith("harmless_win_rate") for r in v["passed"]), v["passed"]
    assert any(r.startswith("harmless_win_rate: not applied: no judge") for r in v["not_applied"]), v["not_applied"]
    assert v["blessed"]  # not applied is reported, not a failure ...
    strict = GateParams.model_validate(
        {
            **SAFETY_GATE.model_dump(),
            "policy": {
                **SAFETY_GATE.policy.model_dump(),
                "metrics": {"harmless_win_rate": {"min_value": 0.35, "required": True}},
            },
        }
    )
    assert not bless(metrics, strict)["policy"]["blessed"]  # ... unless the rule is required
    metrics["judge"] = JUDGE  # a judge that discriminates: the check applies
    v = bless(metrics, SAFETY_GATE)["policy"]
    assert any(p.startswith("harmless_win_rate (rule): ") for p in v["passed"]) and not v["not_applied"]


def test_a_metric_marked_not_applied_by_the_evaluation_is_not_a_pass():
    extra = {"benign_refusal_rate": {"challenger": 0.0, "champion": 0.0, "n": 0, "not_applied": "no benign prompts"}}
    v = bless(
        {"policy": _policy([1.0] * 70 + [0.0] * 30, [0.5] * 100, **extra), "reward": _reward(), "judge": JUDGE}, GATE
    )["policy"]
    assert "benign_refusal_rate: not applied: no benign prompts" in v["not_applied"]
    assert not any(r.startswith("benign_refusal_rate") for r in v["passed"])


def test_judge_status_reports_a_judge_that_cannot_discriminate_as_no_judge():
    from flywheel.evaluation.judge import judge_status, mark_unjudged
    from flywheel.evaluation.stats import mean_ci

    def acc(correct):
        return {**mean_ci(correct, n_boot=500), "all_ties": all(c == 0.5 for c in correct)}

    assert judge_status(acc([0.5] * 40))["status"] == "no judge"  # zero head: all ties
    assert "alike" in judge_status(acc([0.5] * 40))["reason"]
    assert judge_status(acc([1.0] * 11 + [0.0] * 9))["status"] == "no judge"  # 55% of 20: not beyond chance
    assert judge_status(acc([]))["status"] == "no judge"
    good = judge_status(acc([1.0] * 80 + [0.0] * 20))
    assert good["status"] == "judge"
    policy = {
        "harmless_win_rate": {"value": 0.5, "n": 16},
        "judged_win_rate": {"value": 0.5, "n": 16},
        "benign_refusal_rate": {"challenger": 0.0, "champion": 0.0, "n": 2},
    }
    mark_unjudged(policy, good)
    assert not any("not_applied" in m for m in policy.values())
    mark_unjudged(policy, judge_status(acc([0.5] * 40)))
    assert policy["harmless_win_rate"]["not_applied"].startswith("no judge")
    assert "not_applied" in policy["judged_win_rate"] and "not_applied" not in policy["benign_refusal_rate"]


def test_the_blessing_records_the_gate_in_force_and_the_judge(tmp_path, repo_root):
    import json

    import yaml

    from pipelines.bless import gate_in_force, main

    section = BlessParams.model_validate(yaml.safe_load((repo_root / "params.yaml").read_text())["bless"])
    gate = gate_in_force(section)
    assert gate.name == "default"
    tie = {"value": 0.5, "ci": [0.5, 0.5], "n": 16}
    evaluation = {
        "policy": _policy(
            [1.0] * 70 + [0.0] * 30,
            [0.5] * 100,
            harmless_win_rate=tie,
            behaviour_pass_rate={"challenger": 0.5, "champion": 0.5, "n": 10},
        ),
        "reward": _reward(),
        "profile": "tiny",
        "candidates": {"policy": "p" * 64, "reward": "r" * 64},
        "judge": {
            "name": "flywheel-reward",
            "version": "base",
            "status": "no judge",
            "reason": "it scores chosen and rejected alike on all 40 reward test pairs",
        },
    }
    (tmp_path / "evaluate.json").write_text(json.dumps(evaluation))
    verdict = main(tmp_path / "evaluate.json", gate.rules, tmp_path / "blessing.json", gate.name)
    written = json.loads((tmp_path / "blessing.json").read_text())
    assert written["gate"] == "default" and written["gate_sha256"] == gate.sha256 == verdict["gate_sha256"]
    assert written["gate_rules"]["policy"]["primary"] == "heldout_pref_accuracy"
    assert written["judge"] == "none" and "alike" in written["judge_reason"] and written["profile"] == "tiny"
    page = (tmp_path / "blessing.md").read_text()
    assert "harmless_win_rate: not applied: no judge" in page and "judge: none" in page
    assert "judged_win_rate: not applied" in page  # 16 items < min_n 200
    evaluation["judge"] = JUDGE
    (tmp_path / "evaluate.json").write_text(json.dumps(evaluation))
    verdict = main(tmp_path / "evaluate.json", gate.rules, tmp_path / "b2.json")
    assert verdict["judge"] == "flywheel-reward v3 (abababababab)"


def test_the_gate_is_named_and_hashed_and_a_bad_name_fails_naming_the_key(repo_root, tmp_path):
    import yaml

    from flywheel.settings import SettingsError, load_params
    from pipelines.bless import GateError, gate_in_force

    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    section = BlessParams.model_validate(raw["bless"])
    default, permissive = gate_in_force(section), gate_in_force(section, "permissive")
    assert default.sha256 != permissive.sha256
    changed = yaml.safe_load((repo_root / "params.yaml").read_text())["bless"]
    changed["gates"]["default"]["policy"]["metrics"]["harmless_win_rate"]["min_value"] = 0.0
    assert gate_in_force(BlessParams.model_validate(changed)).sha256 != default.sha256
    with pytest.raises(GateError, match="bless.gates: unknown gate 'nope'"):
        gate_in_force(section, "nope")  # --allow-gate nope
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**raw, "bless": {**raw["bless"], "gate": "nope"}}))
    with pytest.raises(SettingsError, match="bless.gate: unknown gate 'nope'"):
        load_params(tmp_path / "params.yaml")  # params.yaml's own gate: at load


def test_release_accepts_only_a_blessing_from_the_gate_in_force():
    from flywheel.release import gate_problem

    gates = {"default": "d" * 64}
    assert gate_problem({"gate": "default", "gate_sha256": "d" * 64}, gates) is None
    assert "bless.gate is 'default'" in gate_problem({"gate": "permissive", "gate_sha256": "p" * 64}, gates)
    assert "--allow-gate permissive" in gate_problem({"gate": "permissive", "gate_sha256": "p" * 64}, gates)
    assert "other rules" in gate_problem({"gate": "default", "gate_sha256": "x" * 64}, gates)
    assert "records no gate" in gate_problem({"gate": "default"}, gates)
    assert gate_problem({"gate": "permissive", "gate_sha256": "p" * 64}, {**gates, "permissive": "p" * 64}) is None


@pytest.mark.parametrize(
    "rule,m,bad",
    [
        (MetricRule(min_value=0.6), {"challenger": 0.55, "champion": 0.5, "n": 10}, True),
        (MetricRule(max_value=0.1), {"challenger": 0.2, "champion": 0.0, "n": 10}, True),
        (MetricRule(max_regression_rel=0.1), {"challenger": 0.85, "champion": 1.0, "n": 10}, True),
        (MetricRule(max_regression_rel=0.2), {"challenger": 0.85, "champion": 1.0, "n": 10}, False),
        (MetricRule(direction="lower", max_regression_abs=0.05), {"challenger": 0.1, "champion": 0.2, "n": 10}, False),
        (MetricRule(direction="lower", max_regression_abs=0.05), {"challenger": 0.3, "champion": 0.2, "n": 10}, True),
    ],
)
def test_check_rule(rule, m, bad):
    assert bool(check_rule("x", m, rule)) == bad


def test_bootstrap_interval_covers_the_mean_and_ties_count_half():
    m = mean_ci([1.0] * 60 + [0.0] * 40, n_boot=1000)
    assert m["ci"][0] < 0.6 < m["ci"][1] and m["n"] == 100
    assert correct_from_margin([0.3, -0.1, 0.0]) == [1.0, 0.0, 0.5]
    with pytest.raises(ValueError):
        paired_diff([1.0], [1.0, 0.0])


def test_verdict_page_names_every_reason():
    from pipelines.bless import to_markdown

    v = bless({"policy": _policy([0.0] * 70 + [1.0] * 30, [0.5] * 100), "reward": _reward()}, GATE)
    page = to_markdown(v, "default")
    assert "## policy: NOT BLESSED" in page and "## reward: BLESSED" in page
    assert all(r in page for r in v["policy"]["reasons"])


def test_length_slices_are_reported_not_gated_unless_asked():
    slices = {
        "chosen_shorter=no": {"challenger": 0.36, "champion": 0.5, "n": 66},
        "chosen_shorter=yes": {"challenger": 0.8, "champion": 0.5, "n": 81},
    }
    metrics = {"policy": _policy([1.0] * 70 + [0.0] * 30, [0.5] * 100, slices=slices), "reward": _reward()}
    assert bless(metrics, GATE)["policy"]["blessed"]
    strict = GATE.updated(policy={"gated_slices": ["chosen_shorter"]})
    v = bless(metrics, strict)["policy"]
    assert not v["blessed"] and "pref_accuracy[chosen_shorter=no]" in v["reasons"][0]


def test_with_no_test_pairs_the_fallback_primary_decides_as_strictly():
    """A thumbs-only run has no test pairs: the default gate's fallback_primary (the unpaired, KTO accuracy) is held
    to the same lower bound; a gate without a fallback never blesses an unmeasured primary."""
    from shipped import shipped

    from pipelines.bless import judge_model

    gates = shipped("bless").gates
    no_pairs = {
        "heldout_pref_accuracy": {"challenger": None, "champion": None, "diff": None, "ci": [None, None], "n": 0}
    }
    better = {"challenger": 0.7, "champion": 0.5, "diff": 0.2, "ci": [0.1, 0.3], "n": 300}
    noise = {**better, "ci": [-0.05, 0.3]}
    gate = gates["default"].policy.model_copy(update={"metrics": {}, "slice_rule": None})
    verdict = judge_model({**no_pairs, "unpaired_accuracy": better}, gate)
    assert verdict["blessed"] and verdict["primary"]["metric"] == "unpaired_accuracy"
    assert any("fallback_primary unpaired_accuracy decides" in x for x in verdict["not_applied"])
    refused = judge_model({**no_pairs, "unpaired_accuracy": noise}, gate)
    assert not refused["blessed"] and "not better beyond noise" in refused["reasons"][0]
    assert not judge_model(no_pairs, gate)["blessed"]
    without = gate.model_copy(update={"fallback_primary": None})
    assert judge_model({**no_pairs, "unpaired_accuracy": better}, without)["reasons"] == [
        "heldout_pref_accuracy: not measured"
    ]


def test_the_golden_set_refuses_a_challenger_worse_beyond_noise_there_and_lets_noise_pass(repo_root):
    """The shipped default gate: a challenger better on the test split but worse beyond noise on the golden set is
    refused; one a little worse within noise there passes; a golden set not measured blocks (required)."""
    from flywheel.settings import load_settings

    gate = load_settings(repo_root, env={}).params.bless.gates["default"]
    better = [1.0] * 70 + [0.0] * 30
    metrics = {
        "behaviour_pass_rate": {"challenger": 0.8, "champion": 0.8, "n": 20},
        "benign_refusal_rate": {"challenger": 0.0, "champion": 0.0, "n": 50},
        "harmless_win_rate": {"value": 0.5, "ci": [0.4, 0.6], "n": 16},
    }
    reward = {**_reward(), "golden_pairwise_accuracy": paired_diff([0.6] * 100, [0.6] * 100, n_boot=500)}
    reward["heldout_pairwise_accuracy"] = reward["pairwise_accuracy"]

    def verdict(golden: dict | None) -> dict:
        policy = _policy(better, [0.5] * 100, **metrics)
        policy["heldout_pref_accuracy"] = policy["pref_accuracy"]  # the pooled primary: better beyond noise
        if golden is not None:
            policy["golden_pref_accuracy"] = golden
        return bless({"policy": policy, "reward": reward}, gate)["policy"]

    worse = verdict(paired_diff([0.0] * 60 + [1.0] * 40, [1.0] * 60 + [0.0] * 40, n_boot=500))
    assert not worse["blessed"] and any(
        r.startswith("golden_pref_accuracy: worse than the champion beyond noise") for r in worse["reasons"]
    ), worse
    noise = verdict(paired_diff([1.0] * 58 + [0.0] * 42, [1.0] * 60 + [0.0] * 40, n_boot=500))
    assert noise["blessed"] and any(
        "golden_pref_accuracy (rule): no regression beyond noise" in p for p in noise["passed"]
    ), noise
    assert "golden_pref_accuracy: not measured" in verdict(None)["reasons"]


@pytest.mark.parametrize(
    "direction,ci,bad",
    [
        ("higher", [-0.2, -0.01], True),
        ("higher", [-0.2, 0.01], False),
        ("lower", [0.01, 0.2], True),
        ("lower", [-0.01, 0.2], False),
    ],
)
def test_no_regression_beyond_noise_reads_the_interval_of_the_difference(direction, ci, bad):
    rule = MetricRule(direction=direction, no_regression_beyond_noise=True)
    m = {"challenger": 0.5, "champion": 0.5, "diff": sum(ci) / 2, "ci": ci, "n": 100}
    assert bool(check_rule("golden", m, rule)) == bad


def test_the_pooled_primary_sees_a_gain_the_small_test_split_alone_cannot():
    """60 test pairs alone cannot resolve a 10-point gain; pooled with 285 golden pairs it is beyond noise, and the
    pooled entry counts both."""
    from types import SimpleNamespace

    from flywheel.evaluation.slices import heldout_metric

    params = SimpleNamespace(confidence=0.95, bootstrap=1000, seed=0)

    def pairs(n, tag):
        return [{"prompt": [{"role": "user", "content": f"{tag} {i}"}]} for i in range(n)]

    def scores(n, wins, losses):  # the challenger alone right on `wins` items, alone wrong on `losses`
        rest = n - wins - losses
        return {
            "challenger": [1.0] * wins + [0.0] * losses + [1.0] * rest,
            "champion": [0.0] * wins + [1.0] * losses + [1.0] * rest,
        }

    test, golden = scores(60, 12, 6), scores(285, 57, 28)
    alone = paired_diff(test["challenger"], test["champion"], 0.95, 1000, 0)
    pooled = heldout_metric(test, golden, pairs(60, "test"), pairs(285, "golden"), params)
    assert alone["ci"][0] <= 0 < pooled["ci"][0]
    assert pooled["n"] == 345 and pooled["test_pairs"] == 60 and pooled["golden_pairs"] == 285
