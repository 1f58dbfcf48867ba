"""Packed batches (a prompt once, then each of its answers) score every answer as a padded batch does, for every
decoder family Flywheel supports, with the same gradients; a model where they would not is never packed."""

from __future__ import annotations

import copy

import pytest
import torch

from flywheel.models import packing
from flywheel.models.dpo import train_dpo
from flywheel.models.policy import Batch, collate, encode, load_policy, run_trunk, top_logps
from tests.model.conftest import synthetic_pairs
from tests.model.families import FAMILIES, build_family


def _seqs(tok, n=5):
    """Pairs (both answers share the prompt), then an unpaired answer, in a shuffled order."""
    enc = encode(tok, synthetic_pairs(n), 32, 8)
    seqs = [(e.prompt, e.answers[w]) for e in enc for w in (0, 1)]
    seqs.append((enc[0].prompt[:-3], enc[1].answers[1][:2]))  # a prompt of its own, a short answer
    order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(0)).tolist()
    return [seqs[i] for i in order]


def _logps_and_grads(model, batch: Batch, k: int):
    model.zero_grad()
    with torch.no_grad():
        hidden = run_trunk(model, batch, k)
    lp = top_logps(model, hidden, batch, k)
    (lp * torch.linspace(-1, 1, lp.shape[0])).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return lp.detach(), grads


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_packed_batch_gives_each_answer_its_own_log_prob_and_gradient(tmp_path, family):
    model, tok = load_policy(build_family(tmp_path / family, family))
    for p in model.parameters():
        p.requires_grad_(True)
    seqs = _seqs(tok)
    plain = collate(seqs, tok.pad_token_id)
    batch = packing.make_batch(model, 2, seqs, tok.pad_token_id)
    window = getattr(model.config, "sliding_window", None)
    longest = max(len(p) + len(a) for p, a in seqs)
    if window and longest >= window:  # mistral's tiny 16-token window: the packed mask has none, so never packed
        assert batch.segments is None
        batch = packing.pack(seqs, tok.pad_token_id)  # what packing would compute: not the model's own
        assert not torch.allclose(_logps_and_grads(model, batch, 2)[0], _logps_and_grads(model, plain, 2)[0])
        return
    assert batch.segments is not None and batch.ids.numel() < 0.8 * plain.ids.numel()
    got, got_grads = _logps_and_grads(model, batch, 2)
    want, want_grads = _logps_and_grads(model, plain, 2)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got, want)
    assert got_grads.keys() == want_grads.keys() and got_grads
    for name, g in want_grads.items():
        assert torch.allclose(got_grads[name], g, atol=1e-5, rtol=1e-3), name
    rows = packing.split(run_trunk(model, batch, 2), batch)  # per-sequence trunk rows, as a padded pass gives them
    plain_rows = packing.split(run_trunk(model, plain, 2), plain)
    for a, b in zip(rows, plain_rows):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
    again = top_logps(model, packing.assemble(rows, batch), batch, 2)  # rows laid back out: the same scores
    assert torch.allclose(again, want, atol=1e-4)


def test_a_model_whose_packed_scores_differ_is_not_packed(tiny_base, monkeypatch):
    model, tok = load_policy(tiny_base / "policy")
    seqs = _seqs(tok)
    assert packing.make_batch(copy.deepcopy(model), 2, seqs, tok.pad_token_id).segments is not None
    real = Batch.forward_args

    def no_positions(self, model, dtype, dev):  # as an attention that ignores the positions it is given
        args = real(self, model, dtype, dev)
        args.pop("position_ids", None)
        return args

    monkeypatch.setattr(Batch, "forward_args", no_positions)
    assert packing.make_batch(model, 2, seqs, tok.pad_token_id).segments is None


def test_dpo_trains_the_same_with_and_without_packing(tiny_base, monkeypatch):
    from shipped import shipped

    params = shipped(
        "train_policy", frozen_layers=2, steps=4, batch_size=4, lr=5e-3, warmup_steps=1, sft_weight=0.0,
        frozen_bf16=False, bf16=False,
    )  # fmt: skip

    def run():
        model, tok = load_policy(tiny_base / "policy")
        return train_dpo(model, encode(tok, synthetic_pairs(8), 32, 8), [], tok.pad_token_id, params)

    real, calls = packing.pack, []
    monkeypatch.setattr(packing, "pack", lambda *a: calls.append(1) or real(*a))
    packed = run()
    assert len(calls) >= 4  # the reference pass and every step ran packed batches
    monkeypatch.setattr(packing, "packs", lambda model, k: False)
    padded = run()
    for a, b in zip(packed, padded):
        assert a["dpo_loss"] == pytest.approx(b["dpo_loss"], abs=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
