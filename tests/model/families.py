"""Tiny random "user's own" policy models of several decoder families, each saved as a folder with a tokenizer
whose special tokens and chat template are its family's (as a team's fine-tuned model would ship)."""

from __future__ import annotations

from pathlib import Path

from tests.model.conftest import build_tokenizer

# family -> (special tokens the template uses, chat template, the end-of-turn token the template puts after an answer)
TEMPLATES = {
    "chatml": (
        [],
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        "<|im_end|>",
    ),
    "gemma": (
        ["<start_of_turn>", "<end_of_turn>"],
        "{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
        "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
        "<end_of_turn>",
    ),
    "phi3": (
        ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"],
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
        "<|end|>",
    ),
    "llama3": (
        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
        "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
        "<|eot_id|>",
    ),
}

# architecture -> (config class name, its extra config arguments, template family)
FAMILIES = {
    "llama": ("LlamaConfig", {}, "llama3"),
    "qwen2": ("Qwen2Config", {}, "chatml"),
    "qwen3": ("Qwen3Config", {"head_dim": 8}, "chatml"),
    "mistral": ("MistralConfig", {"sliding_window": 16}, "chatml"),
    "gemma": ("GemmaConfig", {"head_dim": 8}, "gemma"),
    "phi3": ("Phi3Config", {"pad_token_id": None}, "phi3"),
    "gpt_neox": ("GPTNeoXConfig", {"rotary_pct": 0.5, "use_parallel_residual": True}, "chatml"),
}


def family_tokenizer(template: str):
    extra, chat_template, _ = TEMPLATES[template]
    tok = build_tokenizer()
    if extra:
        tok.add_special_tokens({"additional_special_tokens": extra})
    tok.chat_template = chat_template
    return tok


def build_family(folder: Path, family: str, seed: int = 0, layers: int = 4) -> Path:
    """A ``family`` causal LM (4 layers, hidden size 32, random weights) with its tokenizer, saved to ``folder``."""
    import torch
    import transformers

    cls_name, extra, template = FAMILIES[family]
    torch.manual_seed(seed)
    tok = family_tokenizer(template)
    args = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    args.update(extra)
    if args["pad_token_id"] is None:
        args["pad_token_id"] = tok.pad_token_id
    config = getattr(transformers, cls_name)(**args)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def build_seqcls_reward(folder: Path, seed: int = 0, num_labels: int = 1) -> Path:
    """A one-label ``AutoModelForSequenceClassification`` (a tiny Qwen2 scorer with a chat template), the form TRL's
    RewardTrainer writes and public reward models ship in."""
    import torch
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    torch.manual_seed(seed)
    tok = family_tokenizer("chatml")
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        num_labels=num_labels,
        pad_token_id=tok.pad_token_id,
    )
    Qwen2ForSequenceClassification(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_lora(**over):
    """params.yaml's train_policy, made for the tiny models: LoRA on the 2 layers above a 2-layer trunk, a few steps."""
    from shipped import shipped

    params = dict(frozen_layers=2, steps=2, batch_size=4, lr=1e-2, sft_weight=0.0, frozen_bf16=False, adapter="lora")
    return shipped("train_policy", **{**params, "lora": {"r": 4, "alpha": 8}, **over})
