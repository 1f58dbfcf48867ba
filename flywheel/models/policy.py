"""The policy (a causal LM such as SmolLM2) split into a frozen trunk and a trainable top.

Every policy Flywheel trains keeps the lower ``frozen_layers`` layers (and the embeddings) of the
base model. So the trunk's output for a sequence is the same for the reference, the champion and
the challenger: it is computed once per batch and shared, which is what makes DPO and held-out
scoring affordable on a CPU. Log-probabilities are computed only at answer positions.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


def best_device() -> str:
    """``cuda`` when a GPU is present, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_policy(folder: Path | str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer) from a saved folder, on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    model.eval()
    return model, tok


def end_token(tok) -> int:
    """The token that closes an assistant turn in the chat template (``<|im_end|>`` for SmolLM2)."""
    ids = tok.convert_tokens_to_ids(["<|im_end|>"])
    if ids and ids[0] is not None and ids[0] != tok.unk_token_id:
        return ids[0]
    return tok.eos_token_id


def prompt_ids(tok, messages: list[dict], max_tokens: int) -> list[int]:
    """The chat-template rendering of ``messages`` up to the assistant's turn, keeping its last tokens."""
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)[-max_tokens:]


def answer_ids(tok, text: str, max_tokens: int) -> list[int]:
    """At most ``max_tokens`` ids of an answer. Only an answer that ends within the budget gets the end-of-turn
    token: a cut one must not teach (or score) stopping mid-sentence, so it keeps ``max_tokens`` text tokens."""
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    if len(ids) < max_tokens:
        return ids + [end_token(tok)]
    return ids[:max_tokens]


@dataclass
class Encoded:
    prompt: list[int]
    answers: list[list[int]]  # chosen, rejected (or a single SFT completion)


def encode(tok, records: list[dict], max_prompt: int, max_answer: int, fields=("chosen", "rejected")) -> list[Encoded]:
    return [Encoded(prompt_ids(tok, r["prompt"], max_prompt), [answer_ids(tok, r[f], max_answer) for f in fields])
            for r in records]


@dataclass
class Batch:
    ids: torch.Tensor          # (B, T) right-padded
    attention: torch.Tensor    # (B, T)
    target_pos: torch.Tensor   # (N,) flat positions (b * T + t) whose next token is an answer token
    targets: torch.Tensor      # (N,) the answer tokens
    seq_of_target: torch.Tensor  # (N,) which sequence each target belongs to


def collate(seqs: list[tuple[list[int], list[int]]], pad_id: int) -> Batch:
    """Sequences of (prompt, answer) token ids into one right-padded batch."""
    width = max(len(p) + len(a) for p, a in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), width), dtype=torch.long)
    pos, tgt, which = [], [], []
    for b, (p, a) in enumerate(seqs):
        full = p + a
        ids[b, : len(full)] = torch.tensor(full)
        att[b, : len(full)] = 1
        for j in range(len(a)):
            pos.append(b * width + len(p) + j - 1)
            tgt.append(a[j])
            which.append(b)
    return Batch(ids, att, torch.tensor(pos), torch.tensor(tgt), torch.tensor(which))


@dataclass
class TrunkOut:
    hidden: torch.Tensor
    mask: object
    position_ids: torch.Tensor
    position_embeddings: tuple


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def trunk_context(model, batch: Batch, dtype: torch.dtype = torch.float32) -> TrunkOut:
    """Mask, positions and rotary embeddings of a batch (no layer run; ``hidden`` left empty)."""
    from transformers.masking_utils import create_causal_mask

    base = model.model
    dev = device_of(model)
    shape = (*batch.ids.shape, base.config.hidden_size)
    probe = torch.zeros(1, 1, shape[-1], dtype=dtype, device=dev).expand(shape)
    position_ids = torch.arange(batch.ids.shape[1], device=dev).unsqueeze(0)
    mask = create_causal_mask(config=base.config, inputs_embeds=probe, attention_mask=batch.attention.to(dev),
                              cache=None, position_ids=position_ids)
    pe = base.rotary_emb(probe, position_ids=position_ids)
    return TrunkOut(None, mask, position_ids, pe)


def param_dtype(module) -> torch.dtype:
    return next(module.parameters()).dtype


def cast_frozen(model, k: int, dtype: torch.dtype = torch.bfloat16) -> None:
    """Cast the frozen trunk (embeddings and the lower ``k`` layers) to ``dtype`` in place. CPUs with AMX /
    AVX512-BF16 run bf16 matrix products several times faster than fp32; the trunk's weights come from bf16
    files, so only its activations lose precision. The output head keeps its dtype (bf16 logits would blur
    log-probabilities by ~0.1): a head tied to the embeddings gets its own copy first."""
    if model.lm_head.weight is model.model.embed_tokens.weight:
        model.lm_head.weight = nn.Parameter(model.model.embed_tokens.weight.detach().clone(),
                                            requires_grad=model.lm_head.weight.requires_grad)
    model.model.embed_tokens.to(dtype)
    for layer in model.model.layers[:k]:
        layer.to(dtype)


def run_trunk(model, batch: Batch, k: int) -> TrunkOut:
    """Embeddings and the lower ``k`` layers (call under ``torch.no_grad`` when they are frozen). The trunk
    runs in its own dtype; its output comes back in the dtype of the layers above it."""
    layers = model.model.layers
    trunk_dt = param_dtype(layers[0]) if k else param_dtype(model.model.embed_tokens)
    top_dt = param_dtype(layers[k]) if k < len(layers) else param_dtype(model.model.norm)
    ctx = trunk_context(model, batch, top_dt)
    inner = ctx if trunk_dt == top_dt else trunk_context(model, batch, trunk_dt)
    h = model.model.embed_tokens(batch.ids.to(device_of(model))).to(trunk_dt)
    for layer in layers[:k]:
        h = layer(h, attention_mask=inner.mask, position_embeddings=inner.position_embeddings,
                  position_ids=inner.position_ids)
    ctx.hidden = h.to(top_dt)
    return ctx


def top_logps(layers: nn.ModuleList, model, trunk: TrunkOut, batch: Batch) -> torch.Tensor:
    """Sum of answer-token log-probabilities per sequence, running ``layers`` on top of the trunk."""
    h = trunk.hidden
    for layer in layers:
        h = layer(h, attention_mask=trunk.mask, position_embeddings=trunk.position_embeddings,
                  position_ids=trunk.position_ids)
    dev = h.device
    flat = h.reshape(-1, h.shape[-1])[batch.target_pos.to(dev)]
    logits = model.lm_head(model.model.norm(flat).to(param_dtype(model.lm_head))).float()
    lp = torch.log_softmax(logits, dim=-1).gather(1, batch.targets.to(dev).unsqueeze(1)).squeeze(1)
    out = torch.zeros(batch.ids.shape[0], dtype=lp.dtype, device=dev)
    return out.index_add(0, batch.seq_of_target.to(dev), lp)


def top_layers(model, k: int) -> nn.ModuleList:
    return model.model.layers[k:]


def trunk_fingerprint(model, k: int) -> str:
    """A hash of the frozen part (embeddings and lower ``k`` layers): equal fingerprints share a trunk."""
    h = hashlib.sha256()
    params = [model.model.embed_tokens.weight] + [p for layer in model.model.layers[:k] for p in layer.parameters()]
    for p in params:
        head = p.detach().reshape(-1)[:1024].to(torch.float32)     # the first 4 KiB; NumPy needs host memory
        h.update(head.cpu().numpy().tobytes())
        h.update(str(float(p.detach().float().sum())).encode())
    return h.hexdigest()[:16]


def freeze_trunk(model, k: int) -> list[nn.Parameter]:
    """Freeze everything but the top layers; returns the trainable parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = [p for layer in model.model.layers[k:] for p in layer.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    return trainable


@torch.no_grad()
def generate(model, tok, prompts: list[list[dict]], max_new_tokens: int, batch_size: int = 16,
             max_prompt: int = 256) -> list[str]:
    """Greedy answers to chat prompts, batched with left padding."""
    tok.padding_side = "left"
    out: list[str] = []
    stop = end_token(tok)
    for i in range(0, len(prompts), batch_size):
        chunk = [prompt_ids(tok, p, max_prompt) for p in prompts[i:i + batch_size]]
        width = max(len(c) for c in chunk)
        ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        att = torch.zeros_like(ids)
        for b, c in enumerate(chunk):
            ids[b, width - len(c):] = torch.tensor(c)
            att[b, width - len(c):] = 1
        dev = device_of(model)
        gen = model.generate(input_ids=ids.to(dev), attention_mask=att.to(dev), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=[stop, tok.eos_token_id], pad_token_id=tok.pad_token_id)
        for row in gen[:, width:].cpu():        # one copy to host memory per batch, not one per answer
            out.append(tok.decode(row, skip_special_tokens=True).strip())
    return out
