"""Small statistics used by evaluation and the gate: means with bootstrap intervals, paired differences."""

from __future__ import annotations

import numpy as np


def _cluster_index(clusters: list, n: int) -> np.ndarray:
    if len(clusters) != n:
        raise ValueError(f"{len(clusters)} cluster keys for {n} values")
    return np.unique(np.asarray([str(c) for c in clusters]), return_inverse=True)[1].reshape(-1)


def mean_ci(
    values: list[float], confidence: float = 0.95, n_boot: int = 2000, seed: int = 0, clusters: list | None = None
) -> dict:
    """Mean of ``values`` with a percentile-bootstrap interval. ``clusters`` (one key per value): values that
    share a key are not independent (the pairs of one prompt), so whole clusters are resampled, each with all
    its values (the cluster bootstrap); ``clusters`` in the result counts them."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return {"value": None, "ci": [None, None], "n": 0}
    rng = np.random.default_rng(seed)
    extra = {}
    if clusters is None:
        boots = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    else:
        which = _cluster_index(clusters, x.size)
        sums, counts = np.bincount(which, weights=x), np.bincount(which).astype(float)
        draw = rng.integers(0, sums.size, size=(n_boot, sums.size))
        boots = sums[draw].sum(axis=1) / counts[draw].sum(axis=1)
        extra["clusters"] = int(sums.size)
    a = (1 - confidence) / 2
    return {
        "value": float(x.mean()),
        "ci": [float(np.quantile(boots, a)), float(np.quantile(boots, 1 - a))],
        "n": int(x.size),
        **extra,
    }


def paired_diff(
    challenger: list[float],
    champion: list[float],
    confidence: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
    clusters: list | None = None,
) -> dict:
    """Mean of (challenger − champion) over the same items, with a paired-bootstrap interval (resampling
    whole ``clusters`` when given: see ``mean_ci``)."""
    if len(challenger) != len(champion):
        raise ValueError("paired scores must cover the same items")
    d = mean_ci([a - b for a, b in zip(challenger, champion)], confidence, n_boot, seed, clusters)
    return {
        "challenger": float(np.mean(challenger)) if challenger else None,
        "champion": float(np.mean(champion)) if champion else None,
        "diff": d["value"],
        "ci": d["ci"],
        "n": d["n"],
        **({"clusters": d["clusters"]} if "clusters" in d else {}),
    }


def correct_from_margin(margins: list[float]) -> list[float]:
    """1 for a positive margin, 0 for a negative one, 0.5 for a tie."""
    return [1.0 if m > 0 else (0.0 if m < 0 else 0.5) for m in margins]
