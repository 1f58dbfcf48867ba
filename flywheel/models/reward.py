"""The reward model, in one of two forms behind one interface (score, train, save, load):

- ``encoder``: a sentence encoder (MiniLM by default), mean pooling and a linear scoring head;
- ``seqcls``: any one-label ``AutoModelForSequenceClassification`` (the form TRL's RewardTrainer writes and public
  reward models ship in), reading the dialogue through its chat template when its tokenizer has one.

It reads the end of the conversation (the last ``context_turns`` turns of the prompt and the answer),
since chosen and rejected answers share everything before the last answer: shorter inputs are both
faster and easier to learn from. Trained with the pairwise Bradley-Terry loss; the frozen-encoder
variant trains the head alone (on cached embeddings for the encoder form: seconds).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from flywheel.models.device import bf16_autocast, bf16_fast
from flywheel.models.training import adamw, disable_dropout
from flywheel.params import TrainRewardParams

CONFIG = "flywheel_reward.json"
HEAD_NAMES = ("score", "classifier")  # the scoring head of a sequence-classification model, by family


def reward_text(prompt: list[dict], answer: str, context_turns: int = 1, tokenizer=None) -> str:
    """The text the reward model reads: the last turns of the prompt and the answer (through ``tokenizer``'s chat
    template when one is given)."""
    turns = prompt[-context_turns:] if context_turns > 0 else []
    if tokenizer is not None:
        return tokenizer.apply_chat_template([*turns, {"role": "assistant", "content": answer}], tokenize=False)
    parts = [f"{'User' if m['role'] == 'user' else m['role'].capitalize()}: {m['content']}" for m in turns]
    return "\n".join(parts + [f"Assistant: {answer}"])


def is_seqcls_folder(folder: Path | str) -> bool:
    """Whether a Hugging Face model folder holds a sequence-classification model (by its config's architectures)."""
    cfg = Path(folder) / "config.json"
    if not cfg.is_file():
        return False
    archs = json.loads(cfg.read_text()).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in archs)


class RewardModel(nn.Module):
    def __init__(
        self, encoder: nn.Module, tokenizer, max_length: int = 256, context_turns: int = 1, form: str = "encoder"
    ):
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.tokenizer.truncation_side = "left"  # keep the end: the answer
        self.max_length = max_length
        self.context_turns = context_turns
        self.form = form
        if form == "encoder":
            self.head = nn.Linear(encoder.config.hidden_size, 1)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        else:
            if encoder.config.num_labels != 1:
                raise ValueError(
                    f"a sequence-classification reward model must have one label (a scalar reward); this one has "
                    f"{encoder.config.num_labels}"
                )
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            if encoder.config.pad_token_id is None:
                encoder.config.pad_token_id = tokenizer.pad_token_id
            self.head = next(
                (getattr(encoder, n) for n in HEAD_NAMES if isinstance(getattr(encoder, n, None), nn.Module)), None
            )

    @classmethod
    def from_encoder(cls, folder: Path | str, max_length: int = 256, context_turns: int = 1) -> RewardModel:
        from transformers import AutoModel, AutoTokenizer

        return cls(AutoModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder), max_length, context_turns)

    @classmethod
    def from_seqcls(cls, folder: Path | str, max_length: int = 256, context_turns: int = 1, **load) -> RewardModel:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model = AutoModelForSequenceClassification.from_pretrained(folder, **load)
        return cls(model, AutoTokenizer.from_pretrained(folder), max_length, context_turns, form="seqcls")

    @classmethod
    def load(cls, folder: Path | str) -> RewardModel:
        folder = Path(folder)
        cfg = json.loads((folder / CONFIG).read_text())
        if cfg.get("kind") == "seqcls":
            model = cls.from_seqcls(folder, cfg["max_length"], cfg.get("context_turns", 1))
        else:
            model = cls.from_encoder(folder / "encoder", cfg["max_length"], cfg.get("context_turns", 1))
            model.head.load_state_dict(torch.load(folder / "head.pt", weights_only=True))
        model.eval()
        return model

    @classmethod
    def from_base(cls, folder: Path | str, max_length: int, context_turns: int, as_seqcls: bool = False) -> RewardModel:
        """The starting point of training: the base reward model's encoder with a new zero head (encoder form), or
        the base sequence-classification model as it is. ``as_seqcls`` (TRL's RewardTrainer trains that form): an
        encoder base becomes a one-label sequence-classification model of its family (a new head on its pooled
        output)."""
        folder = Path(folder)
        cfg = json.loads((folder / CONFIG).read_text())
        if cfg.get("kind") == "seqcls":
            return cls.from_seqcls(folder, max_length, context_turns)
        if as_seqcls:
            return cls.from_seqcls(folder / "encoder", max_length, context_turns, num_labels=1)
        return cls.from_encoder(folder / "encoder", max_length, context_turns)

    def save(self, folder: Path | str) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.form == "seqcls":
            self.encoder.save_pretrained(folder)
            self.tokenizer.save_pretrained(folder)
            kind = "seqcls"
        else:
            self.encoder.save_pretrained(folder / "encoder")
            self.tokenizer.save_pretrained(folder / "encoder")
            torch.save(self.head.state_dict(), folder / "head.pt")
            kind = "flywheel-reward"
        (folder / CONFIG).write_text(
            json.dumps({"kind": kind, "max_length": self.max_length, "context_turns": self.context_turns})
        )
        return folder

    def text(self, prompt: list[dict], answer: str) -> str:
        """What this model reads for (prompt, answer)."""
        return reward_text(prompt, answer, self.context_turns, self.tokenizer if self.templated else None)

    @property
    def templated(self) -> bool:
        """A sequence-classification model whose tokenizer has a chat template reads the dialogue through it."""
        return self.form == "seqcls" and bool(getattr(self.tokenizer, "chat_template", None))

    def _tokens(self, texts: list[str]) -> dict:
        dev = next(self.parameters()).device
        enc = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
            add_special_tokens=not self.templated,
        )
        return {k: v.to(dev) for k, v in enc.items()}

    def embed(self, texts: list[str]) -> torch.Tensor:
        """Mean-pooled encoder output, one row per text (encoder form)."""
        enc = self._tokens(texts)
        out = self.encoder(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(out.dtype)
        return (out * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def forward(self, texts: list[str]) -> torch.Tensor:
        if self.form == "seqcls":
            return self.encoder(**self._tokens(texts)).logits[:, 0].float()
        pooled = self.embed(texts)
        with torch.autocast(pooled.device.type, enabled=False):  # the head in fp32 under a bf16 autocast
            return self.head(pooled.float()).squeeze(-1)

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters()) if self.head is not None else []

    def body_parameters(self) -> list[nn.Parameter]:
        head = {id(p) for p in self.head_parameters()}
        return [p for p in self.encoder.parameters() if id(p) not in head]

    @torch.no_grad()
    def score(self, prompts: list[list[dict]], answers: list[str], batch_size: int = 32) -> list[float]:
        """Scalar rewards for (prompt, answer) pairs."""
        self.eval()
        if self.form == "encoder" and not self.head.weight.any():
            # a zero head (the base reward model's, before any training) gives its bias to every text: the
            # encoder's output would be multiplied by zero (turn 1 of the demo: 804 texts, ~15 s on an AMX Xeon)
            return [float(self.head.bias)] * len(prompts)
        texts = [self.text(p, a) for p, a in zip(prompts, answers)]
        # batches of similar lengths, each padded to its own longest: on the demo's 239 test pairs 8.9 s instead
        # of 11.0 in data order (AMX Xeon, fp32). A text's score does not depend on its batch.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = [0.0] * len(texts)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            for j, v in zip(idx, self([texts[j] for j in idx]).tolist()):
                out[j] = v
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


def _sides(model: RewardModel, pairs: list[dict]) -> tuple[list[str], list[str]]:
    return [model.text(p["prompt"], p["chosen"]) for p in pairs], [
        model.text(p["prompt"], p["rejected"]) for p in pairs
    ]


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
    chosen, rejected = _sides(model, pairs)
    losses: list[float] = []
    steps = max(1, math.ceil(len(pairs) * params.epochs / params.batch_size))
    if params.frozen_encoder and model.form == "seqcls":  # the head alone, on full forward passes
        for p in model.body_parameters():
            p.requires_grad_(False)
        if not model.head_parameters():
            raise ValueError(
                "train_reward.frozen_encoder: this sequence-classification model has no head to train alone"
            )
    elif params.frozen_encoder:
        model.encoder.eval()
        with torch.no_grad():
            ec = torch.cat([model.embed(chosen[i : i + 64]) for i in range(0, len(chosen), 64)])
            er = torch.cat([model.embed(rejected[i : i + 64]) for i in range(0, len(rejected), 64)])
        opt = adamw(model.head.parameters(), lr=params.head_lr, weight_decay=params.weight_decay)
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
    disable_dropout(model)  # as the trl back-end (TRL's default)
    model.train()
    groups = [
        {"params": [p for p in model.body_parameters() if p.requires_grad], "lr": params.lr},
        {"params": model.head_parameters(), "lr": params.head_lr},
    ]
    opt = adamw([g for g in groups if g["params"]], weight_decay=params.weight_decay)
    warm = max(1, int(steps * params.warmup_ratio))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warm) * max(0.0, (steps - s) / max(1, steps - warm)) if s >= warm else (s + 1) / warm
        ),
    )
    # bf16 matrix products where they run fast (AVX512-BF16 / AMX CPUs, GPUs): measured on the demo's turn 1
    # (benchmarks/bench_reward.py --fp32-encoder), in the params.yaml comment
    dev = next(model.parameters()).device
    fast = params.bf16 and bf16_fast(dev)
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
        with bf16_autocast(dev.type, fast):
            scores = model([chosen[i] for i in idx] + [rejected[i] for i in idx])
        n = len(idx)
        loss = -nn.functional.logsigmoid(scores[:n] - scores[n:]).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if on_step:
            on_step(step, losses[-1])
    model.eval()
    return losses
