"""Test pairs seen by slice: which slice a pair is in, its bootstrap cluster, the "pick the shorter answer" baseline
and the paired challenger-vs-champion difference per slice."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

from flywheel.evaluation import stats

if TYPE_CHECKING:
    from flywheel.params import EvaluateParams


def slice_keys(pair: dict) -> dict[str, str]:
    """The slice of ``pair`` in each family: its feedback type, single/multi-turn, whether chosen is shorter."""
    return {
        "feedback_type": pair.get("source", "preference"),
        "turns": "single" if sum(1 for m in pair["prompt"] if m["role"] == "user") <= 1 else "multi",
        "chosen_shorter": _shorter(pair),
    }


def _shorter(pair: dict) -> str:
    """yes / no / tie: equal lengths are their own slice (the length baseline scores them 0.5, neither side)."""
    a, b = len(pair["chosen"]), len(pair["rejected"])
    return "yes" if a < b else ("tie" if a == b else "no")


def cluster_keys(pairs: list[dict]) -> list[str]:
    """The bootstrap's resampling unit of each pair. Pairs that share a prompt (thumbs and ratings of one prompt
    make many pairs) or a conversation (its turns) are not independent: they form one cluster, drawn whole."""
    parent: dict[str, str] = {}

    def root(k: str) -> str:
        while parent.setdefault(k, k) != k:
            k = parent[k]
        return k

    own = []
    for p in pairs:
        key = "prompt:" + hashlib.sha256(json.dumps(p["prompt"], sort_keys=True).encode()).hexdigest()[:16]
        if p.get("conversation_id"):
            parent[root(f"conversation:{p['conversation_id']}")] = root(key)
        own.append(key)
    return [root(k) for k in own]


def length_baseline(pairs: list[dict]) -> list[float]:
    """'Pick the shorter answer' as a scorer: 1 when chosen is shorter, 0.5 on equal length."""
    return [
        1.0 if len(p["chosen"]) < len(p["rejected"]) else (0.5 if len(p["chosen"]) == len(p["rejected"]) else 0.0)
        for p in pairs
    ]


def mean_length_baseline(pairs: list[dict]) -> float | None:
    """The length baseline's accuracy; None (not measured) without pairs."""
    return sum(length_baseline(pairs)) / len(pairs) if pairs else None


def mark_not_measured(metrics: dict, why: str) -> None:
    """Mark each metric scored on no item (``n`` 0, values null) ``not_applied: "not measured: <why>"``, so
    the report and the gate say so instead of reading a number (the gate's primary needs an interval)."""
    for m in metrics.values():
        if isinstance(m, dict) and m.get("n", 1) == 0:
            m.setdefault("not_applied", f"not measured: {why}")


def slice_metrics(name_scores: dict[str, list[float]], pairs: list[dict], params: EvaluateParams) -> dict:
    """Per slice (``params.slices``: feedback type, turns, chosen-is-shorter), the challenger's paired difference
    with the champion on ``name_scores`` and the length baseline of the same items."""
    keys = [slice_keys(p) for p in pairs]
    base = length_baseline(pairs)
    clusters = cluster_keys(pairs)
    out: dict = {}
    for s in params.slices:
        for value in sorted({k[s] for k in keys}):
            idx = [i for i, k in enumerate(keys) if k[s] == value]
            entry = stats.paired_diff(
                [name_scores["challenger"][i] for i in idx],
                [name_scores["champion"][i] for i in idx],
                params.confidence,
                params.bootstrap,
                params.seed,
                [clusters[i] for i in idx],
            )
            entry["length_baseline"] = sum(base[i] for i in idx) / len(idx)
            out[f"{s}={value}"] = entry
    return out


def golden_metric(challenger: list[float], champion: list[float], pairs: list[dict], params) -> dict:
    """The golden set's entry: the paired difference (prompts resampled whole), each model's own accuracy with its
    interval (plotted turn after turn by benchmarks/bench_loop.py) and the length baseline of the same pairs."""
    keys = cluster_keys(pairs)
    out = stats.paired_diff(challenger, champion, params.confidence, params.bootstrap, params.seed, keys)
    for name, scores in (("challenger", challenger), ("champion", champion)):
        out[f"{name}_ci"] = stats.mean_ci(scores, params.confidence, params.bootstrap, params.seed, keys)["ci"]
    out["length_baseline"] = mean_length_baseline(pairs)
    return out


def heldout_metric(test: dict[str, list[float]], golden: dict[str, list[float]], test_pairs, golden_pairs, params):
    """The default gate's primary: challenger against champion on every held-out pair, the rolling test split and
    the golden set pooled (one paired bootstrap; pairs sharing a prompt stay one cluster). Pooled, the early turns
    (a test split of tens of pairs) still resolve a few points of gain, and as the test split grows the fresh data
    weighs more than the fixed set that every turn reuses."""
    keys = cluster_keys(list(test_pairs) + list(golden_pairs))
    out = stats.paired_diff(
        test["challenger"] + golden["challenger"],
        test["champion"] + golden["champion"],
        params.confidence,
        params.bootstrap,
        params.seed,
        keys,
    )
    out["test_pairs"], out["golden_pairs"] = len(test_pairs), len(golden_pairs)
    return out
