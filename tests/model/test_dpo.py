"""DPO on the tiny policy: it learns the planted preference, touches only the top layers."""

from __future__ import annotations

import copy

import pytest
import torch
from shipped import shipped

from flywheel.evaluation.policy_eval import implicit_margins
from flywheel.evaluation.stats import correct_from_margin
from flywheel.models.dpo import train_dpo
from flywheel.models.policy import encode, load_policy
from tests.model.conftest import synthetic_pairs

PARAMS = dict(
    frozen_layers=2, steps=12, batch_size=4, lr=5e-3, warmup_steps=1, beta=0.5, sft_weight=0.0,
    frozen_bf16=False, bf16=False,
)  # fmt: skip
EVAL = shipped("evaluate", max_prompt_tokens=32, max_answer_tokens=8, batch_size=8, frozen_layers=2, bf16=False)


def _params(**over):
    return shipped("train_policy", **{**PARAMS, **over})


def _train(folder, pairs, **over):
    model, tok = load_policy(folder)
    ref = copy.deepcopy(model)
    history = train_dpo(model, encode(tok, pairs, 32, 8), [], tok.pad_token_id, _params(**over))
    return ref, model, tok, history


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-trunk-and-top"])
def test_dpo_learns_the_planted_preference_and_swapped_labels_unlearn_it(tiny_base, bf16, monkeypatch):
    from flywheel.models import device

    monkeypatch.setattr(device, "bf16_fast", lambda _: True)  # as on a CPU with AVX512-BF16 / AMX, or a GPU
    test = synthetic_pairs(8, start=100)
    ref, good, tok, history = _train(tiny_base / "policy", synthetic_pairs(16), frozen_bf16=bf16, bf16=bf16)
    _, bad, _, _ = _train(tiny_base / "policy", synthetic_pairs(16, swap=True), frozen_bf16=bf16, bf16=bf16)
    if bf16:
        assert good.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
        assert good.model.layers[2].self_attn.q_proj.weight.dtype == torch.float32
    seen = set()  # evaluate's bf16: the challenger's top layers under a bf16 autocast as well
    hook = good.model.layers[3].mlp.up_proj.register_forward_hook(lambda m, i, out: seen.add(out.dtype))
    m = implicit_margins(ref, {"good": good, "bad": bad, "ref": ref}, tok, test, EVAL.updated(bf16=bf16))
    hook.remove()
    assert seen == {torch.bfloat16 if bf16 else torch.float32}
    assert ref.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32  # the caller's model untouched
    assert sum(correct_from_margin(m["good"])) / len(test) == 1.0
    assert sum(correct_from_margin(m["bad"])) / len(test) == 0.0
    assert all(x == 0 for x in m["ref"])  # the reference against itself: all ties
    assert history[-1]["dpo_loss"] < history[0]["dpo_loss"]


def test_dpo_changes_only_the_top_layers(tiny_base):
    ref, model, _, _ = _train(tiny_base / "policy", synthetic_pairs(8), steps=2)
    for (name, a), (_, b) in zip(ref.named_parameters(), model.named_parameters()):
        changed = not torch.equal(a, b)
        assert changed == name.startswith(("model.layers.2.", "model.layers.3.")), name


def test_cache_does_not_change_the_result(tiny_base):
    _, a, _, ha = _train(tiny_base / "policy", synthetic_pairs(8), steps=4, cache_trunk=True)
    _, b, _, hb = _train(tiny_base / "policy", synthetic_pairs(8), steps=4, cache_trunk=False)
    assert [round(r["loss"], 5) for r in ha] == [round(r["loss"], 5) for r in hb]


def test_sft_only_training_lowers_the_completion_loss(tiny_base):
    model, tok = load_policy(tiny_base / "policy")
    sft = encode(
        tok,
        [{"prompt": p["prompt"], "completion": "thank you"} for p in synthetic_pairs(8)],
        32,
        8,
        fields=("completion",),
    )
    history = train_dpo(model, [], sft, tok.pad_token_id, _params(sft_weight=1.0, steps=10))
    assert history[-1]["sft_nll"] < history[0]["sft_nll"]


def test_nothing_to_train_on_is_an_error(tiny_base):
    model, tok = load_policy(tiny_base / "policy")
    with pytest.raises(ValueError, match="nothing to train on"):
        train_dpo(model, [], [], tok.pad_token_id, _params())


def test_evaluate_frozen_layers_changes_the_time_not_the_margins(tiny_base):
    """evaluate.frozen_layers is its own value (params.yaml): where the margins split the shared lower layers from
    each model's own. Below, at or above train_policy.frozen_layers (2 here), the margins are the same."""
    ref, model, tok, _ = _train(tiny_base / "policy", synthetic_pairs(8), steps=2)
    test = synthetic_pairs(6, start=100)
    margins = [
        implicit_margins(ref, {"challenger": model}, tok, test, EVAL.updated(frozen_layers=k))["challenger"]
        for k in (1, 2, 3)
    ]
    assert margins[0] == pytest.approx(margins[1], abs=1e-4) and margins[2] == pytest.approx(margins[1], abs=1e-4)
    assert any(abs(m) > 1e-3 for m in margins[1])  # the challenger did move


def _unpaired(n: int, swap: bool = False, start: int = 0) -> list[dict]:
    """Thumbs on single answers to distinct prompts: no two share a prompt, so no pair can form."""
    out = []
    for i in range(start, start + n):
        good = i % 2 == 0
        answer = "the good answer is helpful" if good else "the bad answer is rude"
        out.append(
            {
                "prompt": [{"role": "user", "content": f"please help me with my garden {i}"}],
                "answer": answer,
                "desirable": good != swap,
            }
        )
    return out


def test_kto_learns_from_thumbs_that_form_no_pair_and_swapped_labels_unlearn(tiny_base):
    from flywheel.models.dpo import train_kto

    test = synthetic_pairs(8, start=100)
    margins = {}
    for name, swap in (("good", False), ("bad", True)):
        model, tok = load_policy(tiny_base / "policy")
        ref = copy.deepcopy(model)
        rows = _unpaired(16, swap=swap)
        enc = encode(tok, rows, 32, 8, fields=("answer",))
        history = train_kto(model, enc, [r["desirable"] for r in rows], [], tok.pad_token_id, _params(method="kto"))
        assert {"kto_loss", "kl"} <= set(history[0]) and history[-1]["kto_loss"] < history[0]["kto_loss"]
        margins[name] = implicit_margins(ref, {"m": model}, tok, test, EVAL)["m"]
        if name == "good":  # the evaluation's unpaired metric: desirable answers above undesirable ones
            from flywheel.evaluation.policy_eval import unpaired_accuracy

            held_out = [{**r, "conversation_id": f"k{i}"} for i, r in enumerate(_unpaired(8, start=200))]
            acc = unpaired_accuracy(ref, ref, model, tok, held_out, EVAL)
            assert acc["champion"] == 0.5 and acc["challenger"] == 1.0 and acc["desirable"] == 4
    assert sum(correct_from_margin(margins["good"])) / len(test) == 1.0
    assert sum(correct_from_margin(margins["bad"])) / len(test) == 0.0


def test_bf16_settings_are_not_applied_where_bf16_is_emulated(tiny_base, monkeypatch):
    """A CPU without AVX512-BF16 or AMX runs bf16 matrix products many times slower than fp32: the trunk stays
    fp32 there whatever frozen_bf16 says, and the result is the fp32 result."""
    from flywheel.models import device

    monkeypatch.setattr(device, "_cpu_flags", lambda: {"avx2", "fma"})
    assert not device.bf16_fast("cpu")
    _, model, _, history = _train(tiny_base / "policy", synthetic_pairs(8), frozen_bf16=True, bf16=True, steps=2)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    _, fp32, _, reference = _train(tiny_base / "policy", synthetic_pairs(8), frozen_bf16=False, bf16=False, steps=2)
    assert [r["loss"] for r in history] == [r["loss"] for r in reference]
    monkeypatch.setattr(device, "_cpu_flags", lambda: {"avx2", "avx512_bf16"})
    assert device.bf16_fast("cpu")
