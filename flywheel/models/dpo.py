"""DPO (and SFT on corrections) for the policy's top layers, with the frozen trunk shared.

Per batch the trunk runs once, under ``no_grad`` and bf16 autocast; the reference's log-probabilities
come from a frozen copy of the starting model's top layers on the same trunk output (what TRL's
``precompute_ref_log_probs`` buys, without a second pass over the trunk). Loss: the sigmoid DPO
loss, plus ``sft_weight`` times the mean token NLL of a batch of SFT completions when there are any.
"""

from __future__ import annotations

import copy
import math
import random
from contextlib import nullcontext
from typing import Callable

import torch
from torch import nn

from flywheel.models.policy import (Batch, Encoded, TrunkOut, cast_frozen, collate, freeze_trunk, run_trunk, top_layers, top_logps,
                                    device_of, trunk_context)
from flywheel.params import TrainPolicyParams


def _autocast(enabled: bool, device: str = "cpu"):
    return torch.autocast(device, dtype=torch.bfloat16) if enabled else nullcontext()


def pair_batch(items: list[Encoded], pad_id: int) -> Batch:
    """Chosen sequences first, then rejected ones, in one batch."""
    return collate([(e.prompt, e.answers[0]) for e in items] + [(e.prompt, e.answers[1]) for e in items], pad_id)


def dpo_loss(pol: torch.Tensor, ref: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid DPO loss over a chosen-then-rejected batch; returns (loss, implicit-reward margins)."""
    n = pol.shape[0] // 2
    margin = (pol[:n] - ref[:n]) - (pol[n:] - ref[n:])
    return -nn.functional.logsigmoid(beta * margin).mean(), margin.detach()


class TrunkCache:
    """Trunk outputs and reference log-probabilities per pair, computed once and reused every epoch.

    With right padding and causal attention a sequence's hidden states do not depend on the batch it
    was computed in, so cached rows can be re-padded into any later batch.
    """

    def __init__(self, model, reference: nn.ModuleList, k: int, pad_id: int, enabled: bool = True):
        self.model, self.reference, self.k, self.pad_id, self.enabled = model, reference, k, pad_id, enabled
        self.rows: dict[int, tuple[torch.Tensor, torch.Tensor, float, float]] = {}

    @torch.no_grad()
    def _fill(self, idx: list[int], items: list[Encoded], bf16: bool) -> None:
        batch = pair_batch(items, self.pad_id)
        with _autocast(bf16, device_of(self.model).type):
            trunk = run_trunk(self.model, batch, self.k)
            ref = top_logps(self.reference, self.model, trunk, batch).float()
        n = len(items)
        for j, (i, e) in enumerate(zip(idx, items)):
            lc, lr = len(e.prompt) + len(e.answers[0]), len(e.prompt) + len(e.answers[1])
            self.rows[i] = (trunk.hidden[j, :lc].float().clone(), trunk.hidden[n + j, :lr].float().clone(),
                            ref[j].item(), ref[n + j].item())

    def batch(self, idx: list[int], pairs: list[Encoded], bf16: bool) -> tuple[Batch, TrunkOut, torch.Tensor]:
        """(batch, trunk output, reference log-probs) for the pairs ``idx``, chosen first then rejected."""
        items = [pairs[i] for i in idx]
        if not self.enabled:
            self.rows.clear()
        missing = [i for i in idx if i not in self.rows]
        if missing:
            self._fill(missing, [pairs[i] for i in missing], bf16)
        batch = pair_batch(items, self.pad_id)
        trunk = trunk_context(self.model, batch)
        hidden = torch.zeros((*batch.ids.shape, self.model.config.hidden_size), device=device_of(self.model))
        rows = [self.rows[i] for i in idx]
        n = len(idx)
        for j, (hc, hr, _, _) in enumerate(rows):
            hidden[j, : hc.shape[0]] = hc
            hidden[n + j, : hr.shape[0]] = hr
        trunk.hidden = hidden
        ref = torch.tensor([r[2] for r in rows] + [r[3] for r in rows], device=hidden.device)
        return batch, trunk, ref


def train_dpo(model, pairs: list[Encoded], sft: list[Encoded], pad_id: int, params: TrainPolicyParams,
              on_step: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Train ``model``'s top layers in place from its current weights (also the reference)."""
    if not pairs and not sft:
        raise ValueError("nothing to train on: no preference pairs and no SFT examples")
    torch.manual_seed(params.seed)
    rng = random.Random(params.seed)
    k = params.frozen_layers
    reference = copy.deepcopy(top_layers(model, k)).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    trainable = freeze_trunk(model, k)
    if params.frozen_bf16:
        cast_frozen(model, k)
    cache = TrunkCache(model, reference, k, pad_id, params.cache_trunk)
    opt = torch.optim.AdamW(trainable, lr=params.lr, weight_decay=0.0)
    warm = max(1, params.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (params.steps - s) / max(1, params.steps - warm)))
    order: list[int] = []
    sft_order: list[int] = []
    history = []
    model.train()
    for step in range(params.steps):
        loss = torch.zeros((), device=device_of(model))
        row: dict = {"step": step}
        if pairs:
            if len(order) < params.batch_size:
                more = list(range(len(pairs)))
                rng.shuffle(more)
                order += more
            idx, order = order[:params.batch_size], order[params.batch_size:]
            batch, trunk, ref = cache.batch(idx, pairs, params.bf16)
            with _autocast(params.bf16, device_of(model).type):
                pol = top_logps(top_layers(model, k), model, trunk, batch)
            dloss, margin = dpo_loss(pol.float(), ref.float(), params.beta)
            loss = loss + dloss
            row.update(dpo_loss=dloss.item(), reward_accuracy=(margin > 0).float().mean().item(),
                       reward_margin=params.beta * margin.mean().item())
        if sft and params.sft_weight > 0:
            if len(sft_order) < params.sft_batch_size:
                more = list(range(len(sft)))
                rng.shuffle(more)
                sft_order += more
            idx, sft_order = sft_order[:params.sft_batch_size], sft_order[params.sft_batch_size:]
            batch = collate([(sft[i].prompt, sft[i].answers[0]) for i in idx], pad_id)
            with _autocast(params.bf16, device_of(model).type):
                with torch.no_grad():
                    trunk = run_trunk(model, batch, k)
                lp = top_logps(top_layers(model, k), model, trunk, batch)
            nll = -lp.float().sum() / max(1, batch.targets.numel())
            loss = loss + params.sft_weight * nll
            row["sft_nll"] = nll.item()
        opt.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, params.max_grad_norm)
        opt.step()
        sched.step()
        row.update(loss=loss.item(), grad_norm=float(grad_norm), lr=sched.get_last_lr()[0])
        if not math.isfinite(row["loss"]):
            raise FloatingPointError(f"loss became {row['loss']} at step {step}; lower the learning rate")
        history.append(row)
        if on_step:
            on_step(step, row)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return history
