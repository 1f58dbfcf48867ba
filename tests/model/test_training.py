"""What the fast training loops share with TRL's trainers (flywheel/models/training.py): no dropout, a fused
AdamW where it applies; and the shipped GGUF parsed once by the base_models stage."""

from __future__ import annotations

import copy

import numpy as np
import torch
from shipped import shipped
from torch import nn

from flywheel.models.reward import RewardModel, train_reward
from flywheel.models.training import adamw
from tests.model.conftest import synthetic_pairs


def _dropouts(model: nn.Module) -> list[float]:
    return [m.p for m in model.modules() if isinstance(m, nn.Dropout)]


def test_the_fast_reward_loop_trains_without_dropout_as_the_trl_backend(tiny_base):
    model = RewardModel.load(tiny_base / "reward")
    assert any(p > 0 for p in _dropouts(model))  # BERT's config has dropout: the loop must turn it off
    params = shipped("train_reward", frozen_encoder=False, epochs=1, batch_size=4, max_length=64)
    train_reward(model, synthetic_pairs(8), params)
    assert _dropouts(model) and all(p == 0.0 for p in _dropouts(model))
    model.train()  # without dropout two training-mode passes agree
    texts = ["User: hi\nAssistant: hello there"] * 2
    with torch.no_grad():
        assert torch.equal(model(texts), model(texts))


def test_the_dpo_loop_trains_without_dropout(tiny_base):
    from flywheel.models.dpo import train_dpo
    from flywheel.models.policy import encode, load_policy

    model, tok = load_policy(tiny_base / "policy")
    for m in model.modules():  # a policy whose config has dropout (SmolLM2's has none)
        if isinstance(m, nn.Dropout):
            m.p = 0.3
    model.model.layers[-1].mlp.add_module("drop", nn.Dropout(0.3))
    params = shipped("train_policy", frozen_layers=3, steps=1, batch_size=2, bf16=False, frozen_bf16=False)
    pairs = encode(tok, synthetic_pairs(4), params.max_prompt_tokens, params.max_answer_tokens)
    train_dpo(model, pairs, [], tok.pad_token_id, params)
    assert all(p == 0.0 for p in _dropouts(model))


def test_adamw_is_fused_on_a_cpu_and_steps_as_the_plain_one():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 1))
    twin = copy.deepcopy(net)

    def groups(m):
        return [{"params": list(m[0].parameters()), "lr": 1e-2}, {"params": list(m[1].parameters()), "lr": 1e-3}]

    fused, plain = adamw(groups(net), weight_decay=0.01), torch.optim.AdamW(groups(twin), weight_decay=0.01)
    assert fused.defaults["fused"] and not plain.defaults.get("fused")
    x = torch.randn(32, 8)
    for _ in range(5):
        for m, opt in ((net, fused), (twin, plain)):
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            opt.step()
    for a, b in zip(net.parameters(), twin.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_adamw_is_not_fused_for_parameters_it_cannot_fuse():
    p = nn.Parameter(torch.zeros(3, device="meta"))
    assert not adamw([p]).defaults["fused"]


def test_a_gguf_file_is_parsed_once_inside_gguf_read_once(tmp_path, monkeypatch):
    import gguf

    from pipelines.base_models import gguf_read_once

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_tensor("x", np.arange(4, dtype=np.float32).reshape(2, 2))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    parses = []
    original = gguf.GGUFReader

    class Counting(original):
        def __init__(self, path, mode="r"):
            parses.append(str(path))
            super().__init__(path, mode)

    monkeypatch.setattr(gguf, "GGUFReader", Counting)
    with gguf_read_once():
        from gguf import GGUFReader  # as transformers imports it, inside its loading function

        first, second = GGUFReader(path), GGUFReader(str(path))
        assert first is second
        assert [t.name for t in first.tensors] == ["x"]
    assert len(parses) == 1
    assert gguf.GGUFReader is Counting  # put back
    GGUFReader = gguf.GGUFReader
    assert GGUFReader(path) is not first
