"""The reward model learns a planted preference, round-trips through save/load, and reads the end."""

from __future__ import annotations

from pipelines.reward_model import RewardModel, RewardTrainParams, pairwise_correct, reward_text, train_reward
from tests.model.conftest import synthetic_pairs


def test_zero_head_scores_every_answer_alike(tiny_base):
    model = RewardModel.load(tiny_base / "reward")
    assert pairwise_correct(model, synthetic_pairs(4)) == [0.5] * 4


def test_frozen_encoder_variant_learns_planted_preference(tiny_base, tmp_path):
    model = RewardModel.load(tiny_base / "reward")
    train_reward(model, synthetic_pairs(16), RewardTrainParams(frozen_encoder=True, epochs=40, head_lr=5e-2,
                                                               max_length=64))
    test = synthetic_pairs(8, start=50)
    assert sum(pairwise_correct(model, test)) / len(test) == 1.0
    model.save(tmp_path / "r")
    again = RewardModel.load(tmp_path / "r")
    assert again.score([p["prompt"] for p in test], [p["chosen"] for p in test]) == \
        model.score([p["prompt"] for p in test], [p["chosen"] for p in test])


def test_full_finetuning_learns_and_swapped_labels_invert(tiny_base):
    params = RewardTrainParams(epochs=10, batch_size=8, lr=1e-3, head_lr=1e-2, max_length=64)
    good, bad = RewardModel.load(tiny_base / "reward"), RewardModel.load(tiny_base / "reward")
    train_reward(good, synthetic_pairs(16), params)
    train_reward(bad, synthetic_pairs(16, swap=True), params)
    test = synthetic_pairs(8, start=50)
    assert sum(pairwise_correct(good, test)) / 8 > 0.9
    assert sum(pairwise_correct(bad, test)) / 8 < 0.1


def test_reward_text_keeps_the_last_turns_and_the_answer():
    prompt = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "reply"},
              {"role": "user", "content": "second"}]
    assert reward_text(prompt, "answer", 1) == "User: second\nAssistant: answer"
    assert reward_text(prompt, "answer", 0) == "Assistant: answer"
    assert reward_text(prompt, "answer", 3).startswith("User: first\nAssistant: reply")
