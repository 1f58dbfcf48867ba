"""The trunk/top split of the policy computes exactly what the whole model computes."""

from __future__ import annotations

import pytest
import torch

from flywheel.models.dpo import TrunkCache, answers_batch
from flywheel.models.policy import (
    collate,
    encode,
    freeze_trunk,
    full_logps,
    generate,
    load_policy,
    run_trunk,
    top_logps,
    trunk_fingerprint,
)
from tests.model.conftest import synthetic_pairs


def test_trunk_plus_top_equals_full_forward(tiny_base):
    model, tok = load_policy(tiny_base / "policy")
    enc = encode(tok, synthetic_pairs(3), 32, 8)
    batch = collate(
        [(e.prompt, e.answers[0]) for e in enc] + [(e.prompt, e.answers[1][:3]) for e in enc], tok.pad_token_id
    )
    with torch.no_grad():
        split = top_logps(model, run_trunk(model, batch, 2), batch, 2)
        full = full_logps(model, batch)
    assert torch.allclose(split, full, atol=1e-4), (split, full)


def test_cached_trunk_rows_repad_to_the_same_log_probs(tiny_base):
    model, tok = load_policy(tiny_base / "policy")
    pairs = encode(tok, synthetic_pairs(4), 32, 8)
    cache = TrunkCache(model, 2, tok.pad_token_id)
    cache.batch([0, 1], pairs, bf16=False)  # fills rows 0 and 1 in a batch of their own
    batch, hidden, ref = cache.batch([1, 2, 3], pairs, bf16=False)  # re-pads row 1 beside new rows
    with torch.no_grad():
        plain = answers_batch([pairs[i] for i in (1, 2, 3)], tok.pad_token_id)  # padded, not packed
        direct = top_logps(model, run_trunk(model, plain, 2), plain, 2)
        from_rows = top_logps(model, hidden, batch, 2)
    assert torch.allclose(ref, direct, atol=1e-4)
    assert torch.allclose(from_rows, direct, atol=1e-4)


def test_only_an_answer_that_ended_gets_the_end_of_turn_token(tiny_base):
    from flywheel.models.policy import answer_ids, end_token

    _, tok = load_policy(tiny_base / "policy")
    end = end_token(tok)
    long_text = "please help me with my garden " * 4
    text_ids = tok(long_text, add_special_tokens=False)["input_ids"]
    assert len(text_ids) > 8
    cut = answer_ids(tok, long_text, 8)
    assert cut == text_ids[:8] and end not in cut  # truncated: no false end of turn
    short = answer_ids(tok, "yes", 8)
    assert short[-1] == end and short[:-1] == tok("yes", add_special_tokens=False)["input_ids"]
    exact = tok("good answer", add_special_tokens=False)["input_ids"]
    assert answer_ids(tok, "good answer", len(exact))[-1] != end  # no room left for the end token
    assert answer_ids(tok, "good answer", len(exact) + 1) == exact + [end]
    # training (DPO/SFT) and the evaluation margins encode answers through the same function
    pair = {"prompt": [{"role": "user", "content": "yes"}], "chosen": long_text, "rejected": "no"}
    enc = encode(tok, [pair], 32, 8)[0]
    assert enc.answers[0] == cut and enc.answers[1][-1] == end


def test_freeze_trunk_leaves_only_top_layers_trainable(tiny_base):
    model, _ = load_policy(tiny_base / "policy")
    trainable = freeze_trunk(model, 3)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("model.layers.3.") for n in names)
    assert len(trainable) == len(names)


def test_fingerprint_tells_trunks_apart(tiny_base):
    a, _ = load_policy(tiny_base / "policy")
    b, _ = load_policy(tiny_base / "policy")
    assert trunk_fingerprint(a, 2) == trunk_fingerprint(b, 2)
    with torch.no_grad():
        b.model.layers[3].mlp.up_proj.weight.add_(1.0)  # a change above the trunk
    assert trunk_fingerprint(a, 2) == trunk_fingerprint(b, 2)
    with torch.no_grad():
        b.model.layers[0].mlp.up_proj.weight.add_(1.0)  # a change inside it
    assert trunk_fingerprint(a, 2) != trunk_fingerprint(b, 2)


def test_generate_returns_one_answer_per_prompt(tiny_base):
    model, tok = load_policy(tiny_base / "policy")
    prompts = [[{"role": "user", "content": "how do I water a fern"}], [{"role": "user", "content": "yes"}]]
    answers = generate(model, tok, prompts, max_new_tokens=4, batch_size=2)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_a_bf16_trunk_stays_close_to_the_fp32_forward_and_trains_the_fp32_top(tiny_base):
    from flywheel.models.policy import cast_frozen

    model, tok = load_policy(tiny_base / "policy")
    enc = encode(tok, synthetic_pairs(3), 32, 8)
    batch = collate([(e.prompt, e.answers[0]) for e in enc], tok.pad_token_id)
    with torch.no_grad():
        full = full_logps(model, batch)
    cast_frozen(model, 2)
    trunk = run_trunk(model, batch, 2)
    assert trunk.dtype == torch.float32
    split = top_logps(model, trunk, batch, 2)
    assert torch.allclose(split.detach(), full, rtol=0.02, atol=0.05), (split, full)
    split.sum().backward()
    assert model.model.layers[3].mlp.up_proj.weight.grad is not None


def test_under_a_bf16_autocast_of_the_top_layers_the_output_head_stays_fp32(tiny_base):
    """train_policy.bf16 runs the trained layers in bf16; the logits (the log-probs DPO compares) come from the head
    in its own dtype: bf16 logits would blur them."""
    model, tok = load_policy(tiny_base / "policy")
    enc = encode(tok, synthetic_pairs(3), 32, 8)
    batch = collate([(e.prompt, e.answers[0]) for e in enc], tok.pad_token_id)
    seen = {}
    model.model.layers[3].mlp.up_proj.register_forward_hook(lambda m, i, out: seen.update(top=out.dtype))
    model.get_output_embeddings().register_forward_hook(lambda m, i, out: seen.update(head=out.dtype))
    with torch.no_grad():
        trunk = run_trunk(model, batch, 2)
        plain = top_logps(model, trunk, batch, 2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = top_logps(model, trunk, batch, 2)
    assert seen == {"top": torch.bfloat16, "head": torch.float32}
    assert torch.allclose(mixed, plain, rtol=0.02, atol=0.5), (mixed, plain)


def test_answer_cache_reuses_greedy_answers_per_model_hash(tmp_path, tiny_base):
    from flywheel.evaluation.answers import AnswerCache, timed_generate

    model, tok = load_policy(tiny_base / "policy")
    prompts = [[{"role": "user", "content": "yes"}], [{"role": "user", "content": "how do I water a fern"}]]
    fresh, _ = timed_generate(model, tok, prompts, 3, 4)
    cache = AnswerCache(tmp_path / "cache")
    first, ms = cache.answers(model, "hash-a", tok, prompts, 3, 4)
    assert first == fresh and ms is not None and cache.hits == 0

    class Exploding:  # a second run must not touch the model: every answer is on disk
        def __getattr__(self, name):
            raise AssertionError("generated although cached")

    again = AnswerCache(tmp_path / "cache")
    answers, ms = again.answers(Exploding(), "hash-a", tok, prompts, 3, 4)
    assert answers == fresh and ms is None and again.hits == 2
    # another budget or another model is a miss
    with pytest.raises(AssertionError, match="generated although cached"):
        again.answers(Exploding(), "hash-a", tok, prompts, 4, 4)
    with pytest.raises(AssertionError, match="generated although cached"):
        again.answers(Exploding(), "hash-b", tok, prompts, 3, 4)
