"""The reward models' evaluation, challenger against champion on the same test pairs: pairwise accuracy (paired,
with the cluster bootstrap, by slice, beside the length baseline) and the champion's accuracy alone, which decides
whether it can judge the policies' answers (``judge.judge_status``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flywheel.evaluation import stats
from flywheel.evaluation.slices import (
    cluster_keys,
    golden_metric,
    heldout_metric,
    mark_not_measured,
    mean_length_baseline,
    slice_metrics,
)

if TYPE_CHECKING:
    from flywheel.params import EvaluateParams


def evaluate_reward(
    champion, challenger, pairs: list[dict], params: EvaluateParams, golden: list[dict] | None = None
) -> dict:
    """Both reward models' pairwise accuracy on the same test pairs (paired, by slice), and the champion's alone:
    the champion reward model judges the policies' answers, so its accuracy says whether there is a judge.
    ``golden``: the golden set's pairs, scored beside the test split."""
    from flywheel.models.reward import pairwise_correct

    ch = pairwise_correct(challenger, pairs)
    cp = pairwise_correct(champion, pairs)
    out = {
        "pairwise_accuracy": stats.paired_diff(
            ch, cp, params.confidence, params.bootstrap, params.seed, cluster_keys(pairs)
        ),
        "length_baseline": mean_length_baseline(pairs),
        # the champion is the judge: can it tell chosen from rejected? (judge_status)
        "champion_accuracy": {
            **stats.mean_ci(cp, params.confidence, params.bootstrap, params.seed, cluster_keys(pairs)),
            "all_ties": all(c == 0.5 for c in cp),
        },
    }
    if golden is not None:
        g = {"challenger": pairwise_correct(challenger, golden), "champion": pairwise_correct(champion, golden)}
        out["golden_pairwise_accuracy"] = golden_metric(g["challenger"], g["champion"], golden, params)
        out["heldout_pairwise_accuracy"] = heldout_metric({"challenger": ch, "champion": cp}, g, pairs, golden, params)
    out["slices"] = slice_metrics({"challenger": ch, "champion": cp}, pairs, params)
    mark_not_measured(out, "the reward test split has no pairs")
    return out
