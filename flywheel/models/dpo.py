"""DPO (and SFT on corrections) for the policy's top layers, with the frozen trunk shared.

What trains: the top layers' weights (``adapter: none``) or a LoRA adapter on them (``adapter: lora``, PEFT).
Before the first step the batch schedule is drawn and, for every pair it visits, the trunk runs once (under
``no_grad``) and the reference log-probabilities are computed from the starting model (TRL's
``precompute_ref_log_probs``): no second copy of the model is kept, and for a new LoRA adapter (zero at the
start) the reference is the base. Loss: the sigmoid DPO loss, plus ``sft_weight`` times the mean token NLL of a
batch of SFT completions when there are any.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable

import torch
from torch import nn

from flywheel.models import device
from flywheel.models.packing import assemble, make_batch, packed_length, split
from flywheel.models.policy import (
    Batch,
    Encoded,
    cast_frozen,
    check_frozen_layers,
    collate,
    decoder_layers,
    device_of,
    freeze_trunk,
    run_trunk,
    top_logps,
)
from flywheel.models.scores import ScoreCache, seq_key, trunk_key, trunk_rows
from flywheel.models.training import adamw, disable_dropout
from flywheel.params import TrainPolicyParams


def answers_batch(items: list[Encoded], pad_id: int, model=None, k: int = 0) -> Batch:
    """Every item's first answer, then every item's second (chosen sequences first, then rejected), in one batch:
    packed (a pair's prompt once, flywheel/models/packing.py) where ``model`` is given and takes it."""
    width = len(items[0].answers)
    seqs = [(e.prompt, e.answers[w]) for w in range(width) for e in items]
    return collate(seqs, pad_id) if model is None else make_batch(model, k, seqs, pad_id)


def kto_loss(
    pol: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor, beta: float, w_desirable: float, w_undesirable: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al., 2024) on single answers: a desirable answer's log-ratio pushed above the reference
    point z, an undesirable one's below it. z, the KL term, is the batch's mean log-ratio (detached, at least 0):
    one pass over the batch's own answers instead of TRL's second pass over mismatched (prompt, answer) pairs.
    Returns (loss, log-ratios, z)."""
    ratio = pol - ref
    z = ratio.detach().mean().clamp(min=0)
    up = w_desirable * (1 - torch.sigmoid(beta * (ratio - z)))
    down = w_undesirable * (1 - torch.sigmoid(beta * (z - ratio)))
    return torch.where(desirable, up, down).mean(), ratio.detach(), z


def dpo_loss(pol: torch.Tensor, ref: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid DPO loss over a chosen-then-rejected batch; returns (loss, implicit-reward margins)."""
    n = pol.shape[0] // 2
    margin = (pol[:n] - ref[:n]) - (pol[n:] - ref[n:])
    return -nn.functional.logsigmoid(beta * margin).mean(), margin.detach()


class TrunkCache:
    """Reference log-probabilities per item, and (``keep_hidden``) the trunk's output rows, computed once. An item
    is a pair (chosen, rejected: DPO) or a single answer (KTO); a batch holds every item's first answer, then every
    item's second.

    With right padding and causal attention a sequence's hidden states do not depend on the batch it was
    computed in, so cached rows can be re-padded into any later batch.
    """

    def __init__(self, model, k: int, pad_id: int, keep_hidden: bool = True, store: ScoreCache | None = None):
        self.model, self.k, self.pad_id, self.keep_hidden = model, k, pad_id, keep_hidden
        self.store = store  # trunk outputs kept across runs (flywheel/models/scores.py): a later turn reuses them
        self.key = trunk_key(model, k) if store is not None else ""
        self.rows: dict[int, tuple[torch.Tensor, ...]] = {}
        self.ref: dict[int, tuple[float, ...]] = {}

    @torch.no_grad()
    def fill(
        self,
        idx: list[int],
        items: list[Encoded],
        bf16: bool,
        chunk: int = 8,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        """Trunk rows and reference log-probs of the items ``idx`` not seen yet, from the model as it is now;
        ``progress(done, total)`` after each chunk (minutes on a CPU for a few hundred pairs)."""
        todo = [i for i in dict.fromkeys(idx) if i not in self.ref]
        todo.sort(key=lambda i: packed_length(items[i].prompt, items[i].answers))  # little padding in a chunk
        was_training = self.model.training
        self.model.eval()
        try:
            for at in range(0, len(todo), chunk):
                if progress is not None and at:
                    progress(at, len(todo))
                part = todo[at : at + chunk]
                chosen = [items[i] for i in part]
                batch = answers_batch(chosen, self.pad_id, self.model, self.k)
                if self.store is not None:  # the trunk runs in its own dtype (bf16 autocast is the top's only)
                    seqs = [(e.prompt, e.answers[w]) for w in range(len(chosen[0].answers)) for e in chosen]
                    keyed = [(seq_key(*q), q) for q in seqs]
                    rows = trunk_rows(self.store, {}, self.model, self.key, self.k, keyed, self.pad_id)
                    hidden = assemble(rows, batch)
                else:
                    hidden = run_trunk(self.model, batch, self.k)
                    rows = split(hidden, batch)
                with device.bf16_autocast(device_of(self.model).type, bf16):
                    ref = top_logps(self.model, hidden, batch, self.k).float()
                n = len(chosen)
                for j, (i, e) in enumerate(zip(part, chosen)):
                    width = range(len(e.answers))
                    self.ref[i] = tuple(ref[w * n + j].item() for w in width)
                    if self.keep_hidden:
                        self.rows[i] = tuple(rows[w * n + j].float().clone() for w in width)
        finally:
            self.model.train(was_training)

    def batch(self, idx: list[int], items: list[Encoded], bf16: bool) -> tuple[Batch, torch.Tensor, torch.Tensor]:
        """(batch, trunk output, reference log-probs) for the items ``idx``, first answers first."""
        self.fill(idx, items, bf16)
        batch = answers_batch([items[i] for i in idx], self.pad_id, self.model, self.k)
        width = len(items[idx[0]].answers)
        if self.keep_hidden:
            hidden = assemble([self.rows[i][w] for w in range(width) for i in idx], batch)
        else:
            with torch.no_grad():
                hidden = run_trunk(self.model, batch, self.k).float()
        ref = torch.tensor([self.ref[i][w] for w in range(width) for i in idx], device=hidden.device)
        return batch, hidden, ref


def schedule(n: int, batch_size: int, steps: int, rng: random.Random) -> list[list[int]]:
    """Each step's indices: shuffled passes over ``range(n)``, cut into batches (empty lists when ``n`` is 0)."""
    order: list[int] = []
    out = []
    for _ in range(steps):
        if n and len(order) < batch_size:
            more = list(range(n))
            rng.shuffle(more)
            order += more
        out.append(order[:batch_size])
        order = order[batch_size:]
    return out


def attach_lora(model, params: TrainPolicyParams):
    """A new LoRA adapter (PEFT) on the layers above ``frozen_layers`` of ``model``: the trunk stays the base's, so
    its output is still computed once and shared. Zero at the start (LoRA's B is zero): the model is unchanged."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, lora_config(model, params))
    except ValueError as exc:  # PEFT names the target modules it could not find
        raise ValueError(f"train_policy.lora.target_modules: {exc}") from None


def lora_config(model, params: TrainPolicyParams):
    """The PEFT ``LoraConfig`` of ``train_policy.lora`` for ``model``: its target modules on the layers above
    ``frozen_layers``."""
    from peft import LoraConfig

    layers = decoder_layers(model)[1]
    n = len(layers)
    check_frozen_layers(model, params.frozen_layers)
    lora = params.lora
    targets = lora.target_modules
    if targets == "all-linear":  # PEFT's shorthand refuses a layer list: the linear layers of a trained layer, by name
        targets = sorted(
            {
                name.rsplit(".", 1)[-1]
                for name, m in layers[params.frozen_layers].named_modules()
                if isinstance(m, nn.Linear)
            }
        )
    elif isinstance(targets, str):
        targets = [targets]
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        layers_to_transform=list(range(params.frozen_layers, n)),
        bias="none",
        task_type="CAUSAL_LM",
    )


def trainable_parameters(model, k: int) -> list[nn.Parameter]:
    """A PEFT model trains its adapter (PEFT froze the rest); a plain model its layers above ``k``."""
    if hasattr(model, "peft_config"):
        return [p for p in model.parameters() if p.requires_grad]
    return freeze_trunk(model, k)


def train_kto(
    model,
    examples: list[Encoded],
    desirable: list[bool],
    sft: list[Encoded],
    pad_id: int,
    params: TrainPolicyParams,
    on_step: Callable[[int, dict], None] | None = None,
    store: ScoreCache | None = None,
) -> list[dict]:
    """KTO on unpaired examples (one answer each, desirable or not), as ``train_dpo`` trains on pairs."""
    if len(examples) != len(desirable):
        raise ValueError("one desirable flag per KTO example")
    return train_dpo(model, examples, sft, pad_id, params, on_step, desirable=desirable, store=store)


def train_dpo(
    model,
    pairs: list[Encoded],
    sft: list[Encoded],
    pad_id: int,
    params: TrainPolicyParams,
    on_step: Callable[[int, dict], None] | None = None,
    desirable: list[bool] | None = None,
    store: ScoreCache | None = None,
) -> list[dict]:
    """Train ``model`` in place from its current weights (also the reference): its top layers, or its LoRA
    adapter when it is a PEFT model. DPO on ``pairs``, or, with ``desirable`` (one flag per item), KTO on single
    answers (``train_kto``). ``store``: trunk outputs from earlier runs are read from it, new ones kept."""
    if not pairs and not sft:
        raise ValueError("nothing to train on: no preference data and no SFT examples")
    torch.manual_seed(params.seed)
    rng = random.Random(params.seed)
    k = params.frozen_layers
    check_frozen_layers(model, k)
    trainable = trainable_parameters(model, k)
    if not trainable:
        raise ValueError("the policy has no trainable parameters (train_policy.frozen_layers, train_policy.adapter)")
    if not device.bf16_fast(device_of(model)) and (params.frozen_bf16 or params.bf16):
        params = params.updated(frozen_bf16=False, bf16=False)  # emulated bf16 is many times slower than fp32 here
    if params.frozen_bf16:
        cast_frozen(model, k)
    plan = schedule(len(pairs), params.batch_size, params.steps, rng)
    cache = TrunkCache(model, k, pad_id, params.cache_trunk, store)
    sft_rows: dict = {}  # an SFT example's trunk output, computed once (a few examples recur in every step)
    t0 = time.perf_counter()

    def filling(done: int, total: int) -> None:  # every ~10%: the reference pass is a good part of the stage
        if on_step is not None and done // 8 % max(1, total // 80) == 0:
            took = time.perf_counter() - t0
            print(f"train_policy: reference pass {done}/{total} items ({took:.0f} s)", flush=True)

    # the reference: the starting model
    cache.fill([i for idx in plan for i in idx], pairs, params.bf16, progress=filling)
    opt = adamw(trainable, lr=params.lr, weight_decay=0.0)
    warm = max(1, params.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (params.steps - s) / max(1, params.steps - warm))
    )
    sft_order: list[int] = []
    history = []
    disable_dropout(model)  # as TRL's DPOTrainer and KTOTrainer (their default): the reference had none either
    model.train()
    for step in range(params.steps):
        loss = torch.zeros((), device=device_of(model))
        row: dict = {"step": step}
        if plan[step]:
            batch, hidden, ref = cache.batch(plan[step], pairs, params.bf16)
            with device.bf16_autocast(device_of(model).type, params.bf16):
                pol = top_logps(model, hidden, batch, k)
            if desirable is not None:
                flags = torch.tensor([desirable[i] for i in plan[step]], device=pol.device)
                kloss, ratio, z = kto_loss(pol.float(), ref.float(), flags, params.beta, *params.kto_weights)
                loss = loss + kloss
                row.update(
                    kto_loss=kloss.item(),
                    kl=z.item(),
                    reward_accuracy=((ratio > z) == flags).float().mean().item(),
                    reward_margin=params.beta * (ratio[flags].mean() - ratio[~flags].mean()).nan_to_num().item(),
                )
                dloss = None
            else:
                dloss, margin = dpo_loss(pol.float(), ref.float(), params.beta)
                loss = loss + dloss
        if plan[step] and dloss is not None:
            row.update(
                dpo_loss=dloss.item(),
                reward_accuracy=(margin > 0).float().mean().item(),
                reward_margin=params.beta * margin.mean().item(),
            )
        if sft and params.sft_weight > 0:
            if len(sft_order) < params.sft_batch_size:
                more = list(range(len(sft)))
                rng.shuffle(more)
                sft_order += more
            idx, sft_order = sft_order[: params.sft_batch_size], sft_order[params.sft_batch_size :]
            batch = collate([(sft[i].prompt, sft[i].answers[0]) for i in idx], pad_id)
            with torch.no_grad():
                if params.cache_trunk:
                    was_training = model.training
                    model.eval()
                    keyed = [(f"sft{i}", (sft[i].prompt, sft[i].answers[0])) for i in idx]
                    hidden = assemble(trunk_rows(None, sft_rows, model, "", k, keyed, pad_id), batch)
                    model.train(was_training)
                else:
                    hidden = run_trunk(model, batch, k)
            with device.bf16_autocast(device_of(model).type, params.bf16):
                lp = top_logps(model, hidden, batch, k)
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
