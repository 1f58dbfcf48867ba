"""Evaluation on the tiny models: device-correct (a stand-in accelerator tensor here, CUDA where there is one),
and an empty test split reported as not measured instead of crashing."""

from __future__ import annotations

import copy

import pytest
import torch
from shipped import shipped

from flywheel.evaluation.policy_eval import evaluate_policy, implicit_margins
from flywheel.evaluation.report import headline_metrics
from flywheel.evaluation.reward_eval import evaluate_reward
from flywheel.models.policy import load_policy, trunk_fingerprint
from tests.model.conftest import synthetic_pairs

EVAL = shipped(
    "evaluate",
    max_prompt_tokens=32,
    max_answer_tokens=8,
    batch_size=4,
    frozen_layers=2,
    judged_prompts=3,
    redteam_prompts=3,
    benign_prompts=2,
    max_new_tokens=4,
    gen_batch_size=4,
    bootstrap=200,
    bf16=False,
)
BENIGN = ["How do I water a fern?", "Write a haiku about the sea."]
BEHAVIOUR = [{"prompt": "Say yes.", "must_include": ["yes"], "max_tokens": 4}]


class OnAccelerator(torch.Tensor):
    """A CPU tensor that NumPy refuses, as it refuses a CUDA tensor, until ``.cpu()`` / ``.to("cpu")`` copies it."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.numpy:
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() first.")
        to_host = func is torch.Tensor.cpu or (
            func is torch.Tensor.to
            and any(str(t) == "cpu" for t in [*args[1:], kwargs.get("device")] if isinstance(t, (str, torch.device)))
        )
        if to_host:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs).as_subclass(torch.Tensor)
        return super().__torch_function__(func, types, args, kwargs)


def on_accelerator(model):
    """``model`` with every weight an ``OnAccelerator`` tensor (same values)."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = torch.nn.Parameter(p.data.as_subclass(OnAccelerator), p.requires_grad)
    return model


def test_the_stand_in_refuses_numpy_like_a_cuda_tensor():
    t = torch.ones(3).as_subclass(OnAccelerator)
    with pytest.raises(TypeError, match="cuda"):
        t.detach().float().numpy()
    assert t.cpu().numpy().tolist() == [1.0, 1.0, 1.0] and t.to("cpu").numpy().shape == (3,)


def test_trunk_fingerprint_reads_accelerator_weights(tiny_base):
    plain, _ = load_policy(tiny_base / "policy")
    device_model = on_accelerator(load_policy(tiny_base / "policy")[0])
    assert isinstance(device_model.model.embed_tokens.weight.detach(), OnAccelerator)
    assert trunk_fingerprint(device_model, 2) == trunk_fingerprint(plain, 2)


def test_implicit_margins_run_with_accelerator_weights(tiny_base):
    ref, tok = load_policy(tiny_base / "policy")
    other = copy.deepcopy(ref)
    with torch.no_grad():
        other.model.layers[3].mlp.up_proj.weight.mul_(1.5)
    pairs = synthetic_pairs(5)
    seen = []
    expected = implicit_margins(ref, {"other": other}, tok, pairs, EVAL, progress=lambda *a: seen.append(a))
    assert seen and seen[-1] == (5, 5) and all(0 < d <= 5 for d, _ in seen)  # long margins show their progress
    got = implicit_margins(
        on_accelerator(copy.deepcopy(ref)), {"other": on_accelerator(copy.deepcopy(other))}, tok, pairs, EVAL
    )
    assert got["other"] == pytest.approx(expected["other"], abs=1e-5) and any(m != 0 for m in got["other"])


def _judge(tiny_base):
    from flywheel.models.reward import RewardModel

    return RewardModel.load(tiny_base / "reward")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)")
def test_tiny_evaluation_and_dpo_steps_on_cuda(tiny_base):
    from flywheel.models.dpo import train_dpo
    from flywheel.models.policy import best_device, encode

    assert best_device() == "cuda"
    ref_cpu, tok = load_policy(tiny_base / "policy")
    challenger_cpu = copy.deepcopy(ref_cpu)
    with torch.no_grad():
        challenger_cpu.model.layers[3].mlp.up_proj.weight.mul_(1.5)
    pairs = synthetic_pairs(6)
    on_cpu = implicit_margins(ref_cpu, {"challenger": challenger_cpu}, tok, pairs, EVAL)
    ref = load_policy(tiny_base / "policy", device="cuda")[0]
    challenger = copy.deepcopy(challenger_cpu).to("cuda")
    out = evaluate_policy(ref, ref, challenger, tok, _judge(tiny_base), pairs, BENIGN, BEHAVIOUR, EVAL)
    assert out["pref_accuracy"]["n"] == 6 and out["judged_win_rate"]["n"] == 3
    on_gpu = implicit_margins(ref, {"challenger": challenger}, tok, pairs, EVAL)
    assert on_gpu["challenger"] == pytest.approx(on_cpu["challenger"], abs=1e-3)
    bf16 = implicit_margins(ref, {"challenger": challenger}, tok, pairs, EVAL.updated(bf16=True))
    assert len(bf16["challenger"]) == 6
    history = train_dpo(
        challenger,
        encode(tok, pairs, 32, 8),
        [],
        tok.pad_token_id,
        shipped(
            "train_policy", frozen_layers=2, steps=2, batch_size=4, frozen_bf16=True, bf16=True, lr=5e-5, sft_weight=0.0
        ),
    )
    assert len(history) == 2 and challenger.model.layers[3].mlp.up_proj.weight.device.type == "cuda"


def test_an_empty_test_split_is_reported_not_measured(tiny_base, tmp_path):
    from flywheel.evaluation import report

    ref, tok = load_policy(tiny_base / "policy")
    judge = _judge(tiny_base)
    policy = evaluate_policy(ref, ref, copy.deepcopy(ref), tok, judge, [], BENIGN, BEHAVIOUR, EVAL)
    reward = evaluate_reward(judge, judge, [], EVAL)
    for m in (policy["pref_accuracy"], reward["pairwise_accuracy"], policy["judged_win_rate"]):
        assert m["n"] == 0 and m["ci"] == [None, None] and m["not_applied"].startswith("not measured")
    assert policy["pref_accuracy"]["diff"] is None and policy["length_baseline"] is None
    assert policy["benign_refusal_rate"]["n"] == 2 and "not_applied" not in policy["benign_refusal_rate"]
    metrics = {
        "policy": policy,
        "reward": reward,
        "champion": {"policy": "1"},
        "judge": {"name": "j", "version": 1},
        "size_mb": {},
    }
    files = report.write(metrics, tmp_path)  # the report says "-" where nothing was measured
    assert (tmp_path / "report.md") in files and "| 0 |" in (tmp_path / "report.md").read_text()
    assert headline_metrics(metrics) == {}  # MLflow gets no nulls
    # read as a document: the outcome first, versions as people name them, the plots inside the HTML page
    text = (tmp_path / "report.md").read_text().splitlines()
    assert text[2] == "- **policy**: not measured (no held-out pairs)" and "Champion: policy v1; judge: j v1." in text
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "](policy_slices.png)" not in page and "<table>" in page
    assert report.cut("a fairly long answer " * 20, 30) == "a fairly long answer a fairly …"
