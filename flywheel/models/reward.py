"""The reward model: a MiniLM encoder, mean pooling and a linear scoring head.

It reads the end of the conversation (the last ``context_turns`` turns of the prompt and the answer),
since chosen and rejected answers share everything before the last answer: shorter inputs are both
faster and easier to learn from. Trained with the pairwise Bradley-Terry loss; the frozen-encoder
variant trains the head alone on cached embeddings (seconds).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from flywheel.params import TrainRewardParams

CONFIG = "flywheel_reward.json"


def reward_text(prompt: list[dict], answer: str, context_turns: int = 1) -> str:
    """The text the reward model reads: the last turns of the prompt and the answer."""
    turns = prompt[-context_turns:] if context_turns > 0 else []
    parts = [f"{'User' if m['role'] == 'user' else m['role'].capitalize()}: {m['content']}" for m in turns]
    return "\n".join(parts + [f"Assistant: {answer}"])


class RewardModel(nn.Module):
    def __init__(self, encoder: nn.Module, tokenizer, max_length: int = 256, context_turns: int = 1):
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.tokenizer.truncation_side = "left"  # keep the end: the answer
        self.max_length = max_length
        self.context_turns = context_turns
        self.head = nn.Linear(encoder.config.hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_encoder(cls, folder: Path | str, max_length: int = 256, context_turns: int = 1) -> "RewardModel":
        from transformers import AutoModel, AutoTokenizer

        return cls(AutoModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder), max_length, context_turns)

    @classmethod
    def load(cls, folder: Path | str) -> "RewardModel":
        folder = Path(folder)
        cfg = json.loads((folder / CONFIG).read_text())
        model = cls.from_encoder(folder / "encoder", cfg["max_length"], cfg.get("context_turns", 1))
        model.head.load_state_dict(torch.load(folder / "head.pt", weights_only=True))
        model.eval()
        return model

    def save(self, folder: Path | str) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(folder / "encoder")
        self.tokenizer.save_pretrained(folder / "encoder")
        torch.save(self.head.state_dict(), folder / "head.pt")
        (folder / CONFIG).write_text(
            json.dumps({"kind": "flywheel-reward", "max_length": self.max_length, "context_turns": self.context_turns})
        )
        return folder

    def embed(self, texts: list[str]) -> torch.Tensor:
        """Mean-pooled encoder output, one row per text."""
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        out = self.encoder(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(out.dtype)
        return (out * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def forward(self, texts: list[str]) -> torch.Tensor:
        return self.head(self.embed(texts)).squeeze(-1)

    @torch.no_grad()
    def score(self, prompts: list[list[dict]], answers: list[str], batch_size: int = 32) -> list[float]:
        """Scalar rewards for (prompt, answer) pairs."""
        self.eval()
        texts = [reward_text(p, a, self.context_turns) for p, a in zip(prompts, answers)]
        out: list[float] = []
        for i in range(0, len(texts), batch_size):
            out.extend(self(texts[i : i + batch_size]).tolist())
        return out


def length_grouped_order(lengths: list[int], batch_size: int, rng: random.Random, group: int = 50) -> list[int]:
    """One epoch's order: shuffled, then sorted by length within windows of ``group`` batches, cut into
    batches that are shuffled again (as transformers' group_by_length). Every index appears once."""
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    window = batch_size * group
    batches = []
    for i in range(0, len(idx), window):
        chunk = sorted(idx[i : i + window], key=lambda j: lengths[j], reverse=True)
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    short = [b for b in batches if len(b) < batch_size]  # kept last: the rest stay aligned to batches
    batches = [b for b in batches if len(b) == batch_size]
    rng.shuffle(batches)
    return [j for b in batches + short for j in b]


def _sides(pairs: list[dict], ctx: int) -> tuple[list[str], list[str]]:
    return (
        [reward_text(p["prompt"], p["chosen"], ctx) for p in pairs],
        [reward_text(p["prompt"], p["rejected"], ctx) for p in pairs],
    )


def pairwise_correct(model: RewardModel, pairs: list[dict], batch_size: int = 32) -> list[float]:
    """Per pair: 1 when chosen scores higher, 0 when lower, 0.5 for a tie."""
    chosen = model.score([p["prompt"] for p in pairs], [p["chosen"] for p in pairs], batch_size)
    rejected = model.score([p["prompt"] for p in pairs], [p["rejected"] for p in pairs], batch_size)
    return [1.0 if c > r else (0.5 if c == r else 0.0) for c, r in zip(chosen, rejected)]


def train_reward(
    model: RewardModel,
    pairs: list[dict],
    params: TrainRewardParams,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Bradley-Terry training in place; returns the loss per step."""
    if not pairs:
        raise ValueError("no reward pairs to train on")
    torch.manual_seed(params.seed)
    rng = random.Random(params.seed)
    model.max_length, model.context_turns = params.max_length, params.context_turns
    chosen, rejected = _sides(pairs, params.context_turns)
    losses: list[float] = []
    steps = max(1, math.ceil(len(pairs) * params.epochs / params.batch_size))
    if params.frozen_encoder:
        model.encoder.eval()
        with torch.no_grad():
            ec = torch.cat([model.embed(chosen[i : i + 64]) for i in range(0, len(chosen), 64)])
            er = torch.cat([model.embed(rejected[i : i + 64]) for i in range(0, len(rejected), 64)])
        opt = torch.optim.AdamW(model.head.parameters(), lr=params.head_lr, weight_decay=params.weight_decay)
        for step in range(steps):
            idx = torch.tensor(rng.sample(range(len(pairs)), min(params.batch_size, len(pairs))))
            loss = -nn.functional.logsigmoid(model.head(ec[idx]) - model.head(er[idx])).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if on_step:
                on_step(step, losses[-1])
        return losses
    model.train()
    opt = torch.optim.AdamW(
        [
            {"params": model.encoder.parameters(), "lr": params.lr},
            {"params": model.head.parameters(), "lr": params.head_lr},
        ],
        weight_decay=params.weight_decay,
    )
    warm = max(1, int(steps * params.warmup_ratio))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warm) * max(0.0, (steps - s) / max(1, steps - warm)) if s >= warm else (s + 1) / warm
        ),
    )
    order: list[int] = []
    lengths = []
    if params.group_by_length:  # a pair's batch row is as long as the longer of its two sides
        tok = model.tokenizer
        lengths = [max(len(a), len(b)) for a, b in zip(tok(chosen)["input_ids"], tok(rejected)["input_ids"])]
    for step in range(steps):
        if len(order) < params.batch_size:
            if params.group_by_length:
                more = length_grouped_order(lengths, params.batch_size, rng)
            else:
                more = list(range(len(pairs)))
                rng.shuffle(more)
            order += more
        idx, order = order[: params.batch_size], order[params.batch_size :]
        scores = model([chosen[i] for i in idx] + [rejected[i] for i in idx])
        n = len(idx)
        loss = -nn.functional.logsigmoid(scores[:n] - scores[n:]).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if on_step:
            on_step(step, losses[-1])
    model.eval()
    return losses
