"""Tiny randomly initialised models (no download, seconds to build) for unit and model tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from devkit.tiny_models import CHAT_TEMPLATE, CORPUS, build_tokenizer  # noqa: F401  (re-exported)


def build_policy(folder: Path, seed: int = 0) -> Path:
    """A 4-layer Llama with the tiny tokenizer, saved like the real base policy."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def build_reward(folder: Path, seed: int = 0) -> Path:
    """A 2-layer BERT encoder with MiniLM's tokenizer (shipped on disk) and a zero head."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from flywheel.models.reward import RewardModel
    from pipelines.base_models import minilm_folder

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(minilm_folder())
    enc = BertModel(
        BertConfig(
            vocab_size=tok.vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
        )
    )
    RewardModel(enc, tok, max_length=64).save(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """``<dir>/policy`` and ``<dir>/reward``: the tiny stand-ins of the base_models stage's output."""
    root = tmp_path_factory.mktemp("tiny-base")
    build_policy(root / "policy")
    build_reward(root / "reward")
    return root


@pytest.fixture
def workspace(tmp_path, repo_root, tiny_base):
    """(settings, registry) of a workspace with the repository's params.yaml and the tiny base models."""
    import shutil

    from flywheel.registry import Registry
    from flywheel.settings import load_settings

    shutil.copy(repo_root / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(tiny_base, tmp_path / "models" / "base")
    settings = load_settings(tmp_path, env={})
    return settings, Registry(settings)


def hh_lines(pairs: list[dict]) -> list[str]:
    """Single-turn pairs as HH-RLHF lines (``{"chosen", "rejected"}`` dialogues)."""
    import json

    out = []
    for p in pairs:
        head = f"\n\nHuman: {p['prompt'][0]['content']}\n\nAssistant: "
        out.append(json.dumps({"chosen": head + p["chosen"], "rejected": head + p["rejected"]}))
    return out


def synthetic_pairs(n: int, swap: bool = False, start: int = 0) -> list[dict]:
    """Pairs where the chosen answer is always 'good answer' (or 'bad answer' when swapped)."""
    out = []
    for i in range(start, start + n):
        good, bad = "the good answer is helpful", "the bad answer is rude"
        chosen, rejected = (bad, good) if swap else (good, bad)
        out.append(
            {
                "prompt": [{"role": "user", "content": f"please help me with my garden {i}"}],
                "chosen": chosen,
                "rejected": rejected,
                "source": "preference",
                "split": "train",
                "conversation_id": f"c{i}",
                "event_ids": [f"e{i}"],
                "user_ids": [],
                "n_turns": 1,
            }
        )
    return out
