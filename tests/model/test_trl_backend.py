"""The ``trl`` back-end (TRL's DPOTrainer, KTOTrainer, RewardTrainer): it learns what the fast loop learns, from the
same inputs, and reports the same history keys; devices and adapters it cannot run are refused by name."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError
from shipped import shipped

from flywheel.evaluation.policy_eval import implicit_margins
from flywheel.evaluation.stats import correct_from_margin
from flywheel.models import reward_trl, trl_backend
from flywheel.models.dpo import attach_lora
from flywheel.models.policy import UnsupportedModel, encode, load_policy
from flywheel.models.reward import RewardModel, pairwise_correct
from tests.model.conftest import synthetic_pairs
from tests.model.test_dpo import _unpaired

LORA = dict(
    backend="trl",
    adapter="lora",
    frozen_layers=2,
    steps=12,
    batch_size=4,
    lr=2e-2,
    warmup_steps=1,
    beta=0.5,
    sft_weight=0.0,
    frozen_bf16=False,
    lora={"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
)
EVAL = shipped("evaluate", max_prompt_tokens=32, max_answer_tokens=8, batch_size=8, frozen_layers=2, bf16=False)


def _trl_policy(folder, rows, method="dpo", **over):
    params = shipped("train_policy", **{**LORA, "method": method, **over})
    model, tok = load_policy(folder)
    ref = copy.deepcopy(model)
    model = attach_lora(model, params)
    fields = ("answer",) if method == "kto" else ("chosen", "rejected")
    flags = [r["desirable"] for r in rows] if method == "kto" else None
    history = trl_backend.train_policy(model, tok, encode(tok, rows, 32, 8, fields=fields), params, flags)
    return ref, model.merge_and_unload(), tok, history


def _accuracy(ref, model, tok, test) -> float:
    return sum(correct_from_margin(implicit_margins(ref, {"m": model}, tok, test, EVAL)["m"])) / len(test)


def test_trl_dpo_with_lora_learns_the_planted_preference_and_swapped_labels_unlearn_it(tiny_base):
    test = synthetic_pairs(8, start=100)
    ref, good, tok, history = _trl_policy(tiny_base / "policy", synthetic_pairs(16))
    _, bad, _, _ = _trl_policy(tiny_base / "policy", synthetic_pairs(16, swap=True))
    assert _accuracy(ref, good, tok, test) == 1.0
    assert _accuracy(ref, bad, tok, test) == 0.0
    assert len(history) == 12 and {"loss", "reward_accuracy", "reward_margin", "grad_norm", "lr"} <= set(history[0])
    assert history[-1]["loss"] < history[0]["loss"]
    lower = [n for n, p in good.named_parameters() if ".layers.0." in n or ".layers.1." in n]
    assert all(torch.equal(dict(good.named_parameters())[n], dict(ref.named_parameters())[n]) for n in lower)


def test_trl_kto_with_lora_learns_from_thumbs_that_form_no_pair_and_swapped_labels_unlearn(tiny_base):
    test = synthetic_pairs(8, start=100)
    ref, good, tok, history = _trl_policy(tiny_base / "policy", _unpaired(16), method="kto")
    _, bad, _, _ = _trl_policy(tiny_base / "policy", _unpaired(16, swap=True), method="kto")
    assert _accuracy(ref, good, tok, test) == 1.0
    assert _accuracy(ref, bad, tok, test) == 0.0
    assert {"loss", "kl", "reward_margin", "lr"} <= set(history[0]) and history[-1]["loss"] < history[0]["loss"]


def test_the_trl_dataset_tokenizes_back_to_the_fast_loops_ids(tiny_base):
    """Same inputs: the text handed to TRL re-tokenizes to the ids the fast loop trains on."""
    _, tok = load_policy(tiny_base / "policy")
    pairs = synthetic_pairs(4)
    enc = encode(tok, pairs, 32, 8)
    data = trl_backend.policy_dataset(tok, enc, "dpo")
    for e, row in zip(enc, data):
        assert tok(row["prompt"])["input_ids"] == e.prompt
        assert tok(row["prompt"] + row["chosen"])["input_ids"] == e.prompt + e.answers[0]


def _reward_pairs(n: int, swap: bool = False, start: int = 0) -> list[dict]:
    return [
        {**p, "chosen": p["rejected"], "rejected": p["chosen"]} if swap else p for p in synthetic_pairs(n, start=start)
    ]


@pytest.mark.parametrize("frozen", [False, True], ids=["whole-model", "head-only"])
def test_trl_reward_training_learns_the_planted_preference_and_swapped_labels_unlearn_it(tiny_base, frozen):
    params = shipped(
        "train_reward",
        backend="trl",
        epochs=6.0,
        batch_size=4,
        lr=1e-3,
        head_lr=5e-2,
        max_length=64,
        frozen_encoder=frozen,
        warmup_ratio=0.1,
    )
    test = synthetic_pairs(8, start=100)
    scores = {}
    for name, swap in (("good", False), ("bad", True)):
        model = RewardModel.from_base(tiny_base / "reward", 64, 1, as_seqcls=True)
        assert model.form == "seqcls"  # an encoder base trains as a one-label sequence classifier
        losses = reward_trl.train_reward(model, _reward_pairs(16, swap=swap), params)
        assert len(losses) == 24 and losses[-1] < losses[0]
        scores[name] = sum(pairwise_correct(model, test)) / len(test)
    assert scores == {"good": 1.0, "bad": 0.0}


def test_trl_reward_model_is_written_and_read_back_as_a_sequence_classifier(tiny_base, tmp_path):
    params = shipped("train_reward", backend="trl", epochs=1.0, batch_size=4, max_length=64)
    model = RewardModel.from_base(tiny_base / "reward", 64, 1, as_seqcls=True)
    reward_trl.train_reward(model, synthetic_pairs(8), params)
    before = model.score([p["prompt"] for p in synthetic_pairs(3)], ["yes", "no", "thank you"])
    back = RewardModel.load(model.save(tmp_path / "reward"))
    assert back.form == "seqcls"
    assert back.score([p["prompt"] for p in synthetic_pairs(3)], ["yes", "no", "thank you"]) == pytest.approx(
        before, abs=1e-5
    )


def test_settings_the_backends_cannot_run_are_refused_by_name():
    with pytest.raises(ValidationError, match="devices: 2 needs backend: trl"):
        shipped("train_policy", backend="fast", devices=2)
    with pytest.raises(ValidationError, match="devices: 4 needs backend: trl"):
        shipped("train_reward", backend="fast", devices=4)
    with pytest.raises(ValidationError, match="qlora needs backend: trl"):
        shipped("train_policy", backend="fast", adapter="qlora")
    with pytest.raises(ValidationError, match="devices"):
        shipped("train_policy", backend="trl", devices=0)
    assert shipped("train_policy", backend="trl", devices=2).devices == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_qlora_on_a_machine_without_cuda_says_so(tiny_base):
    with pytest.raises(UnsupportedModel, match="qlora needs a CUDA GPU"):
        load_policy(tiny_base / "policy", four_bit=True)


def test_devices_auto_is_one_process_per_gpu_for_trl_and_one_for_the_fast_loop(monkeypatch):
    from flywheel import distributed

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert distributed.processes("auto", "trl") == 4
    assert distributed.processes("auto", "fast") == 1
    assert distributed.processes(2, "trl") == 2
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert distributed.processes("auto", "trl") == 1


def test_a_launched_process_never_launches_again_and_the_launch_needs_no_mpi(monkeypatch, tmp_path):
    from flywheel import distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv(distributed.LAUNCHED, raising=False)
    assert not distributed.launched()
    monkeypatch.setenv(distributed.LAUNCHED, "1")  # what `run` gives its processes, whatever their world size
    assert distributed.launched()
    cmd = distributed.command("train_policy", {"out": tmp_path / "o", "metrics": tmp_path / "m.json"}, 2)
    assert cmd[1:4] == ["launch", "--num_processes", "2"] and "--multi_gpu" in cmd and "--cpu" not in cmd
    assert cmd[-6:] == ["stage", "train_policy", "--out", str(tmp_path / "o"), "--metrics", str(tmp_path / "m.json")]
    with pytest.raises(FileNotFoundError, match="accelerate_config: no file"):
        distributed.command("train_policy", {}, 2, str(tmp_path / "missing.yaml"))
