"""``flywheel eval-policy``: any policy folder on any preference file, scored against the base; bad input is refused
with the reason. The planted models: the tiny policy trained towards the good answer, and one trained away from it."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from flywheel.cli import app
from tests.model.conftest import hh_lines, synthetic_pairs
from tests.model.test_dpo import _train


@pytest.fixture(scope="module")
def planted(tiny_base, tmp_path_factory):
    """``good`` (learnt the planted preference) and ``bad`` (learnt its opposite), saved as folders."""
    root = tmp_path_factory.mktemp("planted")
    for name, swap in (("good", False), ("bad", True)):
        _, model, tok, _ = _train(tiny_base / "policy", synthetic_pairs(16, swap=swap))
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


@pytest.fixture
def ws(workspace, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FLYWHEEL_HOME", raising=False)
    (tmp_path / "test.jsonl").write_text("\n".join(hh_lines(synthetic_pairs(12, start=100))) + "\n")
    return tmp_path


def _eval(*args: str):
    return CliRunner().invoke(app, ["eval-policy", *args])


def _json(*args: str) -> dict:
    r = _eval(*args, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_a_planted_better_model_scores_higher_than_its_opposite_and_the_base(ws, planted, tiny_base):
    good = _json("--model", str(planted / "good"), "--pairs", "test.jsonl", "--format", "hh-rlhf")
    bad = _json("--model", str(planted / "bad"), "--pairs", "test.jsonl", "--format", "hh-rlhf")
    base = _json("--model", str(ws / "models" / "base" / "policy"), "--pairs", "test.jsonl", "--format", "hh-rlhf")
    assert good["pref_accuracy"] == 1.0 and bad["pref_accuracy"] == 0.0
    assert base["pref_accuracy"] == 0.5  # the base against itself: every margin is 0, a tie
    assert good["n"] == 12 and good["prompts"] == 12 and good["ci95"][0] <= 1.0 <= good["ci95"][1]
    # "pick the shorter answer": the good answer is the longer one here, so the heuristic scores 0
    assert good["length_baseline"] == 0.0 and good["vs_length_baseline"]["diff"] == 1.0


def test_the_judge_scores_the_answers_of_the_model_against_the_base(ws, planted, tiny_base):
    r = _json(
        "--model",
        str(planted / "good"),
        "--pairs",
        "test.jsonl",
        "--format",
        "hh-rlhf",
        "--judge",
        str(tiny_base / "reward"),
        "--prompts",
        "3",
    )
    win = r["judged_win_rate"]
    assert win["n"] == 3 and 0.0 <= win["value"] <= 1.0 and win["judge"] == str(tiny_base / "reward")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "nowhere/at-all"], "no such model folder"),
        (["--model", "models:/flywheel-policy@champion"], "cannot resolve models:/flywheel-policy@champion"),
        (["--format", "csv"], "unknown format 'csv'"),
        (["--pairs", "missing.jsonl"], "missing.jsonl"),
        (["--pairs", "empty.jsonl"], "no preference pairs"),
        (["--prompts", "4"], "--prompts needs --judge"),
        (["--judge", "models/base/policy", "--prompts", "2"], "is not a Flywheel reward model"),
        (["--base", "nowhere/base"], "no such model folder"),
        (["--model", "models/base/reward"], "models/base/reward"),
    ],
    ids=[
        "unknown-folder",
        "unknown-uri",
        "format",
        "missing-file",
        "no-pairs",
        "prompts-without-judge",
        "judge-not-reward",
        "unknown-base",
        "not-a-policy",
    ],
)
def test_bad_input_is_refused_with_the_reason(ws, args, message):
    (ws / "empty.jsonl").write_text('{"not": "a pair"}\n')
    given = dict(zip(args[::2], args[1::2]))
    defaults = {"--model": "models/base/policy", "--pairs": "test.jsonl", "--format": "hh-rlhf"}
    flat = [x for k, v in {**defaults, **given}.items() for x in (k, v)]
    r = _eval(*flat)
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output


def test_a_model_with_another_tokenizer_is_refused(ws, tmp_path):
    """The implicit reward compares the model's and the base's log-probabilities of the same token ids."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from devkit.tiny_models import build_tokenizer

    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})  # a user's extended tokenizer
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4)
    cfg.num_attention_heads = cfg.num_key_value_heads = 2
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "other")
    tok.save_pretrained(tmp_path / "other")
    r = _eval("--model", str(tmp_path / "other"), "--pairs", "test.jsonl", "--format", "hh-rlhf")
    assert r.exit_code == 2 and "different tokenizers" in r.output, r.output
