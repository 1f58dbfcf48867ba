"""Training on a CUDA GPU: the trl back-end (bf16, LoRA and 4-bit QLoRA), the fast loop and the reward model on the
device. Each skips, with its reason, where there is no GPU (CI); run them with ``pytest -m gpu`` on a GPU machine
(benchmarks/README "On a GPU")."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from shipped import shipped

from flywheel.models import reward_trl, trl_backend
from flywheel.models.dpo import attach_lora
from flywheel.models.policy import best_device, encode, load_policy
from flywheel.models.reward import RewardModel, pairwise_correct
from tests.model.conftest import synthetic_pairs
from tests.model.test_trl_backend import LORA, _accuracy, _reward_pairs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"
    ),
]


def _train_on_cuda(folder, rows, four_bit=False, **over):
    params = shipped("train_policy", **{**LORA, **over, "adapter": "qlora" if four_bit else "lora"})
    ref, tok = load_policy(folder, device="cuda")
    model, _ = load_policy(folder, device="cuda", four_bit=four_bit)
    model = attach_lora(model, params)
    history = trl_backend.train_policy(model, tok, encode(tok, rows, 32, 8), params)
    return ref, model, tok, history


@pytest.fixture
def cuda_base(tiny_base):
    assert best_device() == "cuda"
    return tiny_base


def test_trl_dpo_lora_on_cuda_learns_the_planted_preference(cuda_base):
    ref, model, tok, history = _train_on_cuda(cuda_base / "policy", synthetic_pairs(16))
    assert next(p for p in model.parameters() if p.requires_grad).device.type == "cuda"
    assert _accuracy(ref, model.merge_and_unload(), tok, synthetic_pairs(8, start=100)) == 1.0
    assert history[-1]["loss"] < history[0]["loss"]


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes (pip install)")
def test_qlora_trains_a_4bit_base_on_cuda_and_writes_an_adapter(cuda_base, tmp_path):
    ref, model, tok, history = _train_on_cuda(cuda_base / "policy", synthetic_pairs(16), four_bit=True)
    kinds = {type(m).__name__ for m in model.modules()}
    assert "Linear4bit" in kinds  # the base really is 4-bit
    assert history[-1]["loss"] < history[0]["loss"]
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    from peft import PeftModel

    plain, _ = load_policy(cuda_base / "policy", device="cuda")
    merged = PeftModel.from_pretrained(plain, str(tmp_path / "adapter")).merge_and_unload()
    assert _accuracy(ref, merged, tok, synthetic_pairs(8, start=100)) >= 0.75


def test_trl_kto_on_cuda_learns_from_thumbs_that_form_no_pair(cuda_base):
    from tests.model.test_dpo import _unpaired

    params = shipped("train_policy", **{**LORA, "method": "kto"})
    ref, tok = load_policy(cuda_base / "policy", device="cuda")
    model = attach_lora(load_policy(cuda_base / "policy", device="cuda")[0], params)
    rows = _unpaired(16)
    enc = encode(tok, rows, 32, 8, fields=("answer",))
    trl_backend.train_policy(model, tok, enc, params, [r["desirable"] for r in rows])
    assert _accuracy(ref, model.merge_and_unload(), tok, synthetic_pairs(8, start=100)) == 1.0


def test_the_fast_loop_and_the_reward_model_train_on_cuda(cuda_base):
    from flywheel.models.dpo import train_dpo

    params = shipped(
        "train_policy",
        frozen_layers=2,
        steps=12,
        batch_size=4,
        lr=5e-3,
        warmup_steps=1,
        beta=0.5,
        sft_weight=0.0,
        frozen_bf16=True,
    )
    ref, tok = load_policy(cuda_base / "policy", device="cuda")
    model, _ = load_policy(cuda_base / "policy", device="cuda")
    train_dpo(model, encode(tok, synthetic_pairs(16), 32, 8), [], tok.pad_token_id, params)
    assert _accuracy(ref, model, tok, synthetic_pairs(8, start=100)) == 1.0
    rparams = shipped("train_reward", backend="trl", epochs=6.0, batch_size=4, lr=1e-3, head_lr=5e-2, max_length=64)
    reward = RewardModel.from_base(cuda_base / "reward", 64, 1, as_seqcls=True).to("cuda")
    reward_trl.train_reward(reward, _reward_pairs(16), rparams)
    assert next(reward.parameters()).device.type == "cuda"
    assert sum(pairwise_correct(reward, synthetic_pairs(8, start=100))) / 8 == 1.0
