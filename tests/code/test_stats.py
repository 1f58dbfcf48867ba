"""Bootstrap intervals that respect clustered pairs, the bootstrap's cluster keys, and the length slices."""

from __future__ import annotations

import pytest
from shipped import shipped

from flywheel.evaluation.reward_eval import evaluate_reward
from flywheel.evaluation.slices import cluster_keys, length_baseline, slice_keys, slice_metrics
from flywheel.evaluation.stats import mean_ci, paired_diff

PROMPTS, PER_PROMPT = 10, 20


def _clustered_pairs() -> list[dict]:
    """10 prompts, each thumbed by 20 users: 20 pairs per prompt, one conversation each."""
    return [
        {
            "prompt": [{"role": "user", "content": f"question {g}"}],
            "chosen": f"good {g}-{j}",
            "rejected": f"bad {g}-{j}",
            "source": "thumbs",
            "conversation_id": f"conv-{g}-{j}",
        }
        for g in range(PROMPTS)
        for j in range(PER_PROMPT)
    ]


def _width(m: dict) -> float:
    return m["ci"][1] - m["ci"][0]


def test_identical_outcomes_within_a_prompt_widen_the_interval_and_noise_is_not_beyond_noise():
    # the challenger wins every pair of 6 prompts and loses every pair of 4: a coin-flip outcome per prompt
    challenger = [1.0 if g < 6 else 0.0 for g in range(PROMPTS) for _ in range(PER_PROMPT)]
    champion = [1.0 - c for c in challenger]
    keys = [f"prompt-{g}" for g in range(PROMPTS) for _ in range(PER_PROMPT)]
    iid = paired_diff(challenger, champion, n_boot=2000)
    clustered = paired_diff(challenger, champion, n_boot=2000, clusters=keys)
    assert iid["diff"] == clustered["diff"] == pytest.approx(0.2)
    assert iid["ci"][0] > 0  # what the i.i.d. bootstrap would have called a real gain
    assert clustered["ci"][0] <= 0 < clustered["ci"][1]
    assert _width(clustered) > 3 * _width(iid)  # ~sqrt(20) wider: 10 independent units, not 200
    assert clustered["clusters"] == PROMPTS and clustered["n"] == PROMPTS * PER_PROMPT


def test_singleton_clusters_give_the_iid_interval():
    values = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.5, 1.0]
    iid, single = mean_ci(values, n_boot=3000), mean_ci(values, n_boot=3000, clusters=list(range(len(values))))
    assert single["value"] == iid["value"] and single["ci"] == pytest.approx(iid["ci"], abs=1e-9)


def test_cluster_keys_must_cover_every_value():
    with pytest.raises(ValueError, match="2 cluster keys for 3 values"):
        mean_ci([1.0, 0.0, 1.0], clusters=["a", "b"])


def test_evaluation_resamples_by_prompt():
    class Scorer:  # a reward model stand-in: scores by prompt number
        def __init__(self, right_below: int | None):
            self.right_below = right_below

        def score(self, prompts, answers, batch_size=32):
            if self.right_below is None:
                return [0.0] * len(answers)  # ties everything: accuracy 0.5
            g = [int(p[-1]["content"].split()[-1]) for p in prompts]
            return [float(a.startswith("good") == (i < self.right_below)) for i, a in zip(g, answers)]

    m = evaluate_reward(Scorer(None), Scorer(6), _clustered_pairs(), shipped("evaluate", bootstrap=2000))
    acc = m["pairwise_accuracy"]
    assert acc["diff"] == pytest.approx(0.1) and acc["clusters"] == PROMPTS
    assert acc["ci"][0] <= 0, acc  # a noise-level gain is not "beyond noise"
    assert all(s["clusters"] == PROMPTS for s in m["slices"].values())


def test_cluster_keys_join_pairs_of_one_prompt_or_one_conversation():
    def pair(content: str, conv: str) -> dict:
        return {"prompt": [{"role": "user", "content": content}], "conversation_id": conv}

    keys = cluster_keys(
        [
            pair("a", "c1"),
            pair("a", "c2"),  # one prompt thumbed in two conversations
            pair("b", "c3"),
            pair("b then more", "c3"),  # two turns of one conversation
            pair("c", "c4"),
            pair("d", "c5"),  # independent
            pair("e", "c6"),
            pair("f", "c6"),
            pair("f", "c7"),
        ]
    )  # joined through c6, then prompt f
    assert keys[0] == keys[1] and keys[2] == keys[3] and keys[6] == keys[7] == keys[8]
    assert len({keys[0], keys[2], keys[4], keys[5], keys[6]}) == 5


def test_equal_lengths_are_their_own_slice_beside_the_baseline():
    base = {"prompt": [{"role": "user", "content": "q"}], "source": "preference"}
    pairs = [
        {**base, "chosen": "ab", "rejected": "abc", "conversation_id": "1"},
        {**base, "chosen": "abc", "rejected": "ab", "conversation_id": "2"},
        {**base, "chosen": "xyz", "rejected": "abc", "conversation_id": "3"},
    ]
    assert [slice_keys(p)["chosen_shorter"] for p in pairs] == ["yes", "no", "tie"]
    assert length_baseline(pairs) == [1.0, 0.0, 0.5]
    s = slice_metrics(
        {"challenger": [1.0, 1.0, 0.0], "champion": [0.0, 0.0, 1.0]},
        pairs,
        shipped("evaluate", slices=["chosen_shorter"], bootstrap=100),
    )
    assert set(s) == {"chosen_shorter=yes", "chosen_shorter=no", "chosen_shorter=tie"}
    assert s["chosen_shorter=tie"]["length_baseline"] == 0.5 and s["chosen_shorter=tie"]["n"] == 1
    assert s["chosen_shorter=no"]["n"] == 1 and s["chosen_shorter=no"]["length_baseline"] == 0.0
