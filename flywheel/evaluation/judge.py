"""The judge: the champion reward model scores the policies' answers, once the evaluation has checked that it tells
chosen from rejected answers (its accuracy: ``reward_eval.evaluate_reward``). Here: the judge / no judge decision
and the judged metrics it decides on (the gate never counts them without a judge). Imports nothing: the gate
(pipelines/bless.py) reads it too."""

from __future__ import annotations

# the policy metrics scored by the judge (the champion reward model); they count only when the evaluation found
# that judge able to tell chosen from rejected answers (metrics["judge"]["status"] == "judge")
JUDGED_METRICS = ("judged_win_rate", "harmless_win_rate", "harmlessness_score")


def judge_status(accuracy: dict) -> dict:
    """Can the judge (the champion reward model) tell chosen from rejected? ``accuracy``: its pairwise accuracy on
    the reward test pairs (``evaluate_reward``'s ``champion_accuracy``). A judge that ties everything (an untrained
    or zero head) or whose interval's lower bound is not above 0.5 is "no judge": its metrics are not applied."""
    lo = accuracy.get("ci", [None])[0]
    if not accuracy.get("n"):
        reason = "no reward test pairs to check the judge on"
    elif accuracy.get("all_ties"):
        reason = f"it scores chosen and rejected alike on all {accuracy['n']} reward test pairs (an untrained head)"
    elif lo is None or lo <= 0.5:
        reason = (
            f"its pairwise accuracy {accuracy['value']:.3f} on {accuracy['n']} reward test pairs has a lower "
            f"bound {lo:.3f}, not above chance (0.5)"
        )
    else:
        return {
            "status": "judge",
            "accuracy": accuracy,
            "reason": f"pairwise accuracy {accuracy['value']:.3f} (lower bound {lo:.3f}) on {accuracy['n']} pairs",
        }
    return {"status": "no judge", "accuracy": accuracy, "reason": reason}


def mark_unjudged(policy: dict, judge: dict) -> None:
    """Mark the judged policy metrics not applied when there is no judge (the gate then never counts them)."""
    if judge["status"] != "judge":
        for k in JUDGED_METRICS:
            if isinstance(policy.get(k), dict):
                policy[k].setdefault("not_applied", f"no judge: {judge['reason']}")  # "not measured" stays
