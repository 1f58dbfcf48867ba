"""The ``trl`` back-end of the reward model: TRL's RewardTrainer on the fast loop's reward pairs (the end of each
text kept, ``train_reward.max_length``), the same optimizer groups (body ``lr``, head ``head_lr``), schedule and
seed (flywheel/models/trl_backend.py has the policy's trainers and what both share)."""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable

import torch

from flywheel.models.reward import RewardModel, _sides
from flywheel.models.trl_common import _args, _history_callback, _quiet
from flywheel.params import TrainRewardParams


def reward_dataset(model, pairs: list[dict]):
    """The reward pairs tokenized as the fast loop reads them (the end of each text kept, ``max_length``)."""
    from datasets import Dataset

    chosen, rejected = _sides(model, pairs)
    tok = model.tokenizer
    enc = dict(truncation=True, max_length=model.max_length, add_special_tokens=not model.templated)
    return Dataset.from_dict(
        {"chosen_ids": tok(chosen, **enc)["input_ids"], "rejected_ids": tok(rejected, **enc)["input_ids"]}
    )


def train_reward(
    model: RewardModel,
    pairs: list[dict],
    params: TrainRewardParams,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Bradley-Terry training through TRL's RewardTrainer on a sequence-classification ``model`` (RewardModel,
    form ``seqcls``) in place; returns the loss per step."""
    from trl import RewardConfig, RewardTrainer

    if model.form != "seqcls":
        raise ValueError("backend trl trains a sequence-classification reward model (RewardModel.as_seqcls)")
    if not pairs:
        raise ValueError("no reward pairs to train on")
    model.max_length, model.context_turns = params.max_length, params.context_turns
    steps = max(1, math.ceil(len(pairs) * params.epochs / params.batch_size))
    rows: list[dict] = []

    def step_loss(step: int, row: dict) -> None:
        if on_step is not None:
            on_step(step, row["loss"])

    if params.frozen_encoder:
        for p in model.body_parameters():
            p.requires_grad_(False)
    groups = [  # as the fast loop: the new head learns at head_lr, the body at lr
        {"params": [p for p in model.body_parameters() if p.requires_grad], "lr": params.lr},
        {"params": model.head_parameters(), "lr": params.head_lr},
    ]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=params.weight_decay)
    tok = model.tokenizer
    if tok.eos_token is None:  # RewardTrainer reads it; encoders (BERT) close a text with [SEP]
        tok.eos_token = tok.sep_token or tok.pad_token
    with tempfile.TemporaryDirectory(prefix="flywheel-trl-") as out:
        args = _args(
            RewardConfig,
            params,  # train_reward.bf16 is the fast loop's alone: TRL's CPU bf16 did not learn a planted preference
            steps,  # with the head alone (tests/model/test_trl_backend.py), so no cpu_bf16 here
            params.batch_size,
            out,
            warmup_steps=max(1, int(steps * params.warmup_ratio)),
            max_length=params.max_length + 8,
            gradient_checkpointing=False,
            disable_dropout=True,
        )
        trainer = RewardTrainer(
            model=model.encoder,
            args=args,
            train_dataset=reward_dataset(model, pairs),
            processing_class=tok,
            callbacks=[_history_callback(rows, step_loss)],
            optimizers=(opt, None),
        )
        _quiet(trainer)
        trainer.train()
    model.eval()
    return [r["loss"] for r in rows]
