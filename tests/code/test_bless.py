"""The gate: better beyond noise and no regression, or no blessing; every reason written down."""

from __future__ import annotations

import pytest

from pipelines.bless import GateParams, MetricRule, bless, check_rule
from pipelines.stats import correct_from_margin, mean_ci, paired_diff

GATE = GateParams.model_validate({
    "policy": {"primary": "pref_accuracy", "primary_min_ci_lower": 0.0,
               "metrics": {"pref_accuracy": {"min_value": 0.5},
                           "benign_refusal_rate": {"direction": "lower", "max_regression_abs": 0.05},
                           "judged_win_rate": {"min_value": 0.45, "min_n": 100}},
               "slice_rule": {"max_regression_abs": 0.1, "min_n": 20}},
    "reward": {"primary": "pairwise_accuracy", "metrics": {}},
})


def _policy(challenger: list[float], champion: list[float], **extra) -> dict:
    m = {"pref_accuracy": paired_diff(challenger, champion, n_boot=500),
         "benign_refusal_rate": {"challenger": 0.0, "champion": 0.0, "n": 50},
         "judged_win_rate": {"value": 0.5, "ci": [0.4, 0.6], "n": 16}, "slices": {}}
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
    slices = {"turns=multi": {"challenger": 0.3, "champion": 0.6, "n": 40},
              "turns=single": {"challenger": 0.1, "champion": 0.9, "n": 5}}
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
    v = bless({"policy": _policy([1.0] * 70 + [0.0] * 30, [0.5] * 100, **extra), "reward": _reward()}, GATE)
    assert v["policy"]["blessed"]
    extra = {"judged_win_rate": {"value": 0.1, "ci": [0.0, 0.3], "n": 400}}
    v = bless({"policy": _policy([1.0] * 70 + [0.0] * 30, [0.5] * 100, **extra), "reward": _reward()}, GATE)
    assert not v["policy"]["blessed"]


@pytest.mark.parametrize("rule,m,bad", [
    (MetricRule(min_value=0.6), {"challenger": 0.55, "champion": 0.5, "n": 10}, True),
    (MetricRule(max_value=0.1), {"challenger": 0.2, "champion": 0.0, "n": 10}, True),
    (MetricRule(max_regression_rel=0.1), {"challenger": 0.85, "champion": 1.0, "n": 10}, True),
    (MetricRule(max_regression_rel=0.2), {"challenger": 0.85, "champion": 1.0, "n": 10}, False),
    (MetricRule(direction="lower", max_regression_abs=0.05), {"challenger": 0.1, "champion": 0.2, "n": 10}, False),
    (MetricRule(direction="lower", max_regression_abs=0.05), {"challenger": 0.3, "champion": 0.2, "n": 10}, True),
])
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
    slices = {"chosen_shorter=no": {"challenger": 0.36, "champion": 0.5, "n": 66},
              "chosen_shorter=yes": {"challenger": 0.8, "champion": 0.5, "n": 81}}
    metrics = {"policy": _policy([1.0] * 70 + [0.0] * 30, [0.5] * 100, slices=slices), "reward": _reward()}
    assert bless(metrics, GATE)["policy"]["blessed"]
    strict = GATE.model_copy(deep=True)
    strict.policy.gated_slices = ["chosen_shorter"]
    v = bless(metrics, strict)["policy"]
    assert not v["blessed"] and "pref_accuracy[chosen_shorter=no]" in v["reasons"][0]
