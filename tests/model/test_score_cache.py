"""The evaluation's score cache (flywheel/models/scores.py): margins read back from it equal margins computed
afresh, a later evaluation with a new challenger reuses the reference's scores and the stored trunk outputs, a
sequence met twice is scored once, nothing without content keys persists, and `flywheel erase` empties it."""

from __future__ import annotations

import copy
import sqlite3

import pytest
import torch
from shipped import shipped

from flywheel.evaluation.policy_eval import implicit_margins, log_ratios, unpaired_accuracy
from flywheel.models.policy import load_policy
from flywheel.models.scores import FILE, ScoreCache
from tests.model.conftest import synthetic_pairs

EVAL = shipped("evaluate", max_prompt_tokens=32, max_answer_tokens=8, batch_size=4, frozen_layers=2, bf16=False)


def _perturbed(model, layer: int, factor: float):
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.layers[layer].mlp.up_proj.weight.mul_(factor)
    return other


@pytest.fixture
def models(tiny_base):
    ref, tok = load_policy(tiny_base / "policy")
    return ref, _perturbed(ref, 3, 1.5), _perturbed(ref, 2, 0.7), tok


def test_a_later_evaluation_reads_back_the_reference_and_the_trunk(models, tmp_path):
    ref, first, second, tok = models
    pairs = synthetic_pairs(6)
    keys = {"reference": "base-hash", "champion": "base-hash", "challenger": "first-hash"}
    turn1 = ScoreCache(tmp_path, max_trunk_bytes=2**30)
    got1 = implicit_margins(ref, {"champion": ref, "challenger": first}, tok, pairs, EVAL, cache=turn1, keys=keys)
    assert turn1.computed["scores"] == 24  # 6 pairs x 2 answers, for the base once (it is the champion too), the
    # challenger
    assert turn1.computed["trunks"] == 12 and turn1.hits["trunks"] == 0
    turn1.close()

    # turn 2: the first challenger is the champion, a new challenger comes; the base's trunk serves both
    keys2 = {"reference": "base-hash", "champion": "first-hash", "challenger": "second-hash"}
    turn2 = ScoreCache(tmp_path, max_trunk_bytes=2**30)
    got2 = implicit_margins(ref, {"champion": first, "challenger": second}, tok, pairs, EVAL, cache=turn2, keys=keys2)
    assert turn2.computed == {"scores": 12, "trunks": 0}  # only the new challenger's answers, on stored trunks
    assert turn2.hits["trunks"] == 12

    fresh = implicit_margins(ref, {"champion": first, "challenger": second}, tok, pairs, EVAL)
    assert got2["champion"] == pytest.approx(fresh["champion"], abs=1e-5)
    assert got2["challenger"] == pytest.approx(fresh["challenger"], abs=1e-5)
    assert got1["challenger"] == pytest.approx(fresh["champion"], abs=1e-5)
    assert any(abs(m) > 1e-3 for m in fresh["challenger"])  # the perturbation shows: the check compares something


def test_stored_trunk_outputs_are_exact_and_bounded(models, tmp_path):
    ref, first, _, tok = models
    pairs = synthetic_pairs(4)
    keys = {"reference": "r", "challenger": "c"}
    cache = ScoreCache(tmp_path, max_trunk_bytes=2**30)
    log_ratios(ref, {"challenger": first}, tok, pairs, EVAL, cache=cache, keys=keys)
    rows = cache.db.execute("SELECT trunk, seq FROM trunks").fetchall()
    assert len(rows) == 8
    stored = cache.trunks(rows[0][0], [rows[0][1]])[rows[0][1]]
    assert stored.dtype == torch.float32 and stored.shape[1] == ref.config.hidden_size
    cache.close()

    small = ScoreCache(tmp_path / "small", max_trunk_bytes=3 * stored.numel() * 4)
    log_ratios(ref, {"challenger": first}, tok, pairs, EVAL, cache=small, keys=keys)
    assert small.db.execute("SELECT COUNT(*) FROM trunks").fetchone()[0] <= 3
    assert small.db.execute("SELECT COUNT(*) FROM scores").fetchone()[0] == 16  # scores are always kept


def test_a_pairs_halves_as_unpaired_examples_are_scored_once(models):
    ref, first, _, tok = models
    pairs = synthetic_pairs(4)
    halves = [
        {"prompt": p["prompt"], "answer": p[f], "desirable": f == "chosen", "conversation_id": p["conversation_id"]}
        for p in pairs
        for f in ("chosen", "rejected")
    ]
    cache = ScoreCache(None)
    implicit_margins(ref, {"champion": ref, "challenger": first}, tok, pairs, EVAL, cache=cache)
    before = dict(cache.computed)
    unpaired_accuracy(ref, ref, first, tok, halves, EVAL, cache=cache)
    assert cache.computed == before  # every half was scored with its pair


def test_without_content_keys_nothing_persists(models, tmp_path):
    ref, first, _, tok = models
    cache = ScoreCache(tmp_path, max_trunk_bytes=2**30)
    log_ratios(ref, {"challenger": first}, tok, synthetic_pairs(3), EVAL, cache=cache)
    cache.close()
    with sqlite3.connect(tmp_path / FILE) as db:
        assert db.execute("SELECT COUNT(*) FROM scores").fetchone()[0] == 0


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_a_later_training_run_reads_the_trunk_outputs_back(tiny_base, tmp_path, bf16, monkeypatch):
    """Also with the bf16 trunk and a bf16 autocast of the trained layers: the autocast is the top's alone, so the
    trunk outputs are the stored ones."""
    from flywheel.models import device
    from flywheel.models.dpo import train_dpo
    from flywheel.models.policy import encode

    monkeypatch.setattr(device, "bf16_fast", lambda _: True)  # as on a CPU with AVX512-BF16 / AMX, or a GPU
    params = shipped(
        "train_policy", frozen_layers=2, steps=3, batch_size=2, warmup_steps=1, sft_weight=0.5, sft_batch_size=2,
        frozen_bf16=bf16, bf16=bf16,
    )  # fmt: skip
    _, tok = load_policy(tiny_base / "policy")
    pairs = encode(tok, synthetic_pairs(6), 32, 8)
    sft = encode(
        tok, [{"prompt": p["prompt"], "completion": p["chosen"]} for p in synthetic_pairs(2)], 32, 8, ("completion",)
    )

    def run(store):
        model, _ = load_policy(tiny_base / "policy")
        return [row["loss"] for row in train_dpo(model, pairs, sft, tok.pad_token_id, params, store=store)]

    plain = run(None)
    first = ScoreCache(tmp_path, max_trunk_bytes=2**30)
    assert run(first) == pytest.approx(plain, abs=1e-5)
    assert first.computed["trunks"] == 12 and first.hits["trunks"] == 0  # the schedule visits all 6 pairs
    first.close()
    again = ScoreCache(tmp_path, max_trunk_bytes=2**30)
    assert run(again) == pytest.approx(plain, abs=1e-5)
    assert again.computed["trunks"] == 0 and again.hits["trunks"] == 12


def test_the_registry_copy_of_a_version_keeps_its_scores_key(tiny_base, tmp_path):
    import json
    import shutil

    from flywheel.models.scores import weights_hash

    copy_ = shutil.copytree(tiny_base / "policy", tmp_path / "registry-copy")
    cfg = copy_ / "tokenizer_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "is_local": True}))  # as MLflow's re-save differs
    assert weights_hash(copy_) == weights_hash(tiny_base / "policy")
    other = _perturbed(load_policy(tiny_base / "policy")[0], 3, 1.5)
    other.save_pretrained(tmp_path / "trained")
    assert weights_hash(tmp_path / "trained") != weights_hash(tiny_base / "policy")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no weight files"):
        weights_hash(tmp_path / "empty")


def test_a_challenger_and_any_re_save_of_it_share_the_scores_key(tiny_base, tmp_path):
    """The challenger folder train_policy writes, the registry's re-save of it (transformers writes a tied head
    once), the same tensors sharded, or with the tied head written out: one key; a changed head: another."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from flywheel.models.policy import cast_frozen
    from flywheel.models.scores import weights_hash
    from pipelines.train_policy import save

    model, tok = load_policy(tiny_base / "policy")
    cast_frozen(model, 2)  # the head gets its own copy of the embeddings, as in training
    assert save(model, tok, tmp_path / "challenger") == "full"
    with safe_open(tmp_path / "challenger" / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied again before saving: the embedding is stored once
    key = weights_hash(tmp_path / "challenger")

    again = AutoModelForCausalLM.from_pretrained(tmp_path / "challenger", dtype="auto")
    again.save_pretrained(tmp_path / "registry-copy")
    assert weights_hash(tmp_path / "registry-copy") == key
    again.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    assert weights_hash(tmp_path / "sharded") == key

    tensors = load_file(tmp_path / "challenger" / "model.safetensors")
    head = tensors["model.embed_tokens.weight"].clone()
    (tmp_path / "head-copy").mkdir()
    save_file({**tensors, "lm_head.weight": head}, tmp_path / "head-copy" / "model.safetensors", {"format": "pt"})
    assert weights_hash(tmp_path / "head-copy") == key
    head[0, 0] += 1.0
    save_file({**tensors, "lm_head.weight": head}, tmp_path / "head-copy" / "model.safetensors", {"format": "pt"})
    assert weights_hash(tmp_path / "head-copy") != key


def test_the_registry_copy_of_a_version_reads_its_cached_answers(tiny_base, tmp_path):
    import json
    import shutil

    from flywheel.models.scores import answers_hash

    copy_ = shutil.copytree(tiny_base / "policy", tmp_path / "registry-copy")
    cfg = copy_ / "tokenizer_config.json"
    original = json.loads(cfg.read_text())
    cfg.write_text(json.dumps({**original, "is_local": True, "local_files_only": False}, indent=1))
    assert answers_hash(copy_) == answers_hash(tiny_base / "policy")
    cfg.write_text(json.dumps({**original, "chat_template": "{{ messages }}"}))  # answers would change
    assert answers_hash(copy_) != answers_hash(tiny_base / "policy")


def test_a_reward_models_scores_are_read_back_by_a_later_evaluation(tiny_base, tmp_path):
    from flywheel.models.reward import RewardModel, pairwise_correct
    from flywheel.models.scores import CachedRewards, answers_hash

    model = RewardModel.load(tiny_base / "reward")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # a head that does not score everything alike
    pairs = synthetic_pairs(5)
    plain = pairwise_correct(model, pairs)
    key = answers_hash(tiny_base / "reward")
    first = ScoreCache(tmp_path)
    assert pairwise_correct(CachedRewards(model, key, first), pairs) == plain
    assert first.computed["scores"] == 10
    first.close()
    again = ScoreCache(tmp_path)
    wrapped = CachedRewards(model, key, again)
    assert pairwise_correct(wrapped, pairs) == plain and again.computed["scores"] == 0
    assert wrapped.max_length == model.max_length  # everything else is the model's
