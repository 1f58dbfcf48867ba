"""The reward model learns a planted preference, round-trips through save/load, and reads the end."""

from __future__ import annotations

import pytest
from shipped import shipped

from flywheel.models.reward import RewardModel, pairwise_correct, reward_text, train_reward
from tests.model.conftest import synthetic_pairs


def test_zero_head_scores_every_answer_alike(tiny_base):
    model = RewardModel.load(tiny_base / "reward")
    assert pairwise_correct(model, synthetic_pairs(4)) == [0.5] * 4


def test_frozen_encoder_variant_learns_planted_preference(tiny_base, tmp_path):
    model = RewardModel.load(tiny_base / "reward")
    train_reward(
        model, synthetic_pairs(16), shipped("train_reward", frozen_encoder=True, epochs=40, head_lr=5e-2, max_length=64)
    )
    test = synthetic_pairs(8, start=50)
    assert sum(pairwise_correct(model, test)) / len(test) == 1.0
    model.save(tmp_path / "r")
    again = RewardModel.load(tmp_path / "r")
    assert again.score([p["prompt"] for p in test], [p["chosen"] for p in test]) == model.score(
        [p["prompt"] for p in test], [p["chosen"] for p in test]
    )


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_full_finetuning_learns_and_swapped_labels_invert(tiny_base, bf16, monkeypatch):
    import torch

    from flywheel.models import reward

    monkeypatch.setattr(reward, "bf16_fast", lambda _: True)  # as on a CPU with AVX512-BF16 / AMX, or a GPU
    params = shipped(
        "train_reward",
        frozen_encoder=False,
        epochs=10,
        batch_size=8,
        lr=1e-3,
        head_lr=1e-2,
        max_length=64,
        group_by_length=False,
        bf16=bf16,
    )
    seen = []  # the dtype the encoder's matrix products ran in while training
    good, bad = RewardModel.load(tiny_base / "reward"), RewardModel.load(tiny_base / "reward")
    linear = next(m for m in good.encoder.modules() if isinstance(m, torch.nn.Linear))
    hook = linear.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    train_reward(good, synthetic_pairs(16), params)
    hook.remove()
    assert set(seen) == {torch.bfloat16 if bf16 else torch.float32}
    assert all(p.dtype == torch.float32 for p in good.parameters())  # the weights stay fp32 (mixed precision)
    train_reward(bad, synthetic_pairs(16, swap=True), params)
    test = synthetic_pairs(8, start=50)
    assert sum(pairwise_correct(good, test)) / 8 > 0.9
    assert sum(pairwise_correct(bad, test)) / 8 < 0.1


def test_reward_text_keeps_the_last_turns_and_the_answer():
    prompt = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "reply"},
        {"role": "user", "content": "second"},
    ]
    assert reward_text(prompt, "answer", 1) == "User: second\nAssistant: answer"
    assert reward_text(prompt, "answer", 0) == "Assistant: answer"
    assert reward_text(prompt, "answer", 3).startswith("User: first\nAssistant: reply")


def test_length_grouped_order_is_a_permutation_of_similar_length_batches():
    import random

    from flywheel.models.reward import length_grouped_order

    lengths = [(i * 7919) % 293 + 5 for i in range(1000)]
    a = length_grouped_order(lengths, 16, random.Random(0))
    assert sorted(a) == list(range(1000)) and a == length_grouped_order(lengths, 16, random.Random(0))
    assert a != length_grouped_order(lengths, 16, random.Random(1))
    batches = [a[i : i + 16] for i in range(0, 992, 16)]
    spread = sum(max(lengths[j] for j in b) - min(lengths[j] for j in b) for b in batches) / len(batches)
    shuffled = list(range(1000))
    random.Random(0).shuffle(shuffled)
    plain = (
        sum(
            max(lengths[j] for j in shuffled[i : i + 16]) - min(lengths[j] for j in shuffled[i : i + 16])
            for i in range(0, 992, 16)
        )
        / 62
    )
    assert spread < plain / 5, (spread, plain)


def test_length_grouped_training_learns_too(tiny_base):
    model = RewardModel.load(tiny_base / "reward")
    params = shipped(
        "train_reward",
        frozen_encoder=False,
        epochs=6,
        batch_size=4,
        lr=5e-4,
        head_lr=5e-3,
        max_length=64,
        group_by_length=True,
    )
    train_reward(model, synthetic_pairs(24), params)
    assert sum(pairwise_correct(model, synthetic_pairs(16, start=300))) / 16 >= 0.9


def test_a_later_turn_continues_a_trained_champion_reward_model(tiny_base, tmp_path):
    """``train_reward.start_from: champion``: a trained champion is continued for ``champion_epochs``; the base model
    (or its registered copy, the champion of a first turn) and ``start_from: base`` start from the base."""
    from flywheel.registry import content_hash
    from pipelines.train_reward import fit, start_point

    base = tiny_base / "reward"
    planted = shipped("train_reward", frozen_encoder=True, epochs=40, head_lr=5e-2, max_length=64)
    champion = RewardModel.load(base)
    train_reward(champion, synthetic_pairs(16), planted)
    champion.save(tmp_path / "champion")
    trained = {"path": str(tmp_path / "champion"), "version": "2", "content_hash": content_hash(tmp_path / "champion")}
    first_turn = {"path": str(base), "version": "1", "content_hash": content_hash(base)}

    params = shipped("train_reward", frozen_encoder=True, head_lr=1e-6, max_length=64, start_from="champion")
    assert start_point(params, trained, base) == (tmp_path / "champion", "champion v2")
    assert start_point(params, first_turn, base)[0] is None
    assert start_point(params.model_copy(update={"start_from": "base"}), trained, base) == (None, "base")
    trl = params.model_copy(update={"backend": "trl"})  # TRL trains a classifier: not this encoder and head
    assert start_point(trl, trained, base)[0] is None

    test = synthetic_pairs(8, start=50)
    prompts, answers = [p["prompt"] for p in test], [p["chosen"] for p in test]
    few = params.model_copy(update={"champion_epochs": 0.25, "batch_size": 4})
    continued, figures = fit(base, synthetic_pairs(16), [], few, log=lambda *a: None, start=tmp_path / "champion")
    assert figures["epochs"] == 0.25 and figures["steps"] == 1  # 16 pairs x 0.25 epochs / 4 per batch
    assert continued.score(prompts, answers) == pytest.approx(champion.score(prompts, answers), abs=1e-3)
    fresh, figures = fit(base, synthetic_pairs(16), [], few, log=lambda *a: None)
    assert figures["epochs"] == few.epochs
    assert max(abs(s) for s in fresh.score(prompts, answers)) < 1e-3  # a new head, barely trained


def test_batched_scores_come_back_in_the_callers_order(tiny_base):
    """``score`` batches texts of similar lengths together; each score still lands at its own text's index."""
    import torch

    model = RewardModel.load(tiny_base / "reward")
    torch.manual_seed(0)
    torch.nn.init.normal_(model.head.weight)  # a head that tells texts apart (the base head scores all alike)
    prompts = [[{"role": "user", "content": "q " * (n % 5 + 1)}] for n in range(11)]
    answers = ["word " * ((7 * n) % 11 + 1) for n in range(11)]  # lengths out of order
    batched = model.score(prompts, answers, batch_size=4)
    alone = [model.score([p], [a])[0] for p, a in zip(prompts, answers)]
    assert len(set(round(s, 4) for s in alone)) > 5
    assert batched == pytest.approx(alone, abs=1e-5)


def test_a_zero_head_scores_its_bias_without_running_the_encoder(tiny_base):
    import torch

    model = RewardModel.load(tiny_base / "reward")
    torch.nn.init.constant_(model.head.bias, 0.25)
    prompts, answers = [[{"role": "user", "content": "hi"}]] * 3, ["a", "bb bb", "ccc ccc ccc"]
    full = model(list(map(model.text, prompts, answers))).tolist()  # what running the encoder gives
    model.encoder.forward = lambda *a, **k: (_ for _ in ()).throw(AssertionError("the encoder ran"))
    assert model.score(prompts, answers) == pytest.approx(full) == [0.25] * 3


def test_reward_bf16_is_not_applied_where_bf16_is_emulated(tiny_base, monkeypatch):
    """A CPU without AVX512-BF16 or AMX runs bf16 products many times slower than fp32: train_reward.bf16 is then
    left off, and the encoder trains in fp32."""
    import torch

    from flywheel.models import device

    monkeypatch.setattr(device, "_cpu_flags", lambda: {"avx2", "fma"})
    model = RewardModel.load(tiny_base / "reward")
    seen = []
    linear = next(m for m in model.encoder.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    params = shipped("train_reward", frozen_encoder=False, epochs=1, batch_size=8, max_length=64, bf16=True)
    train_reward(model, synthetic_pairs(8), params)
    assert seen and set(seen) == {torch.float32}
