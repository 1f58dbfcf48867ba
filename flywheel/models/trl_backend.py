"""The ``trl`` training back-end: TRL's DPOTrainer, KTOTrainer and RewardTrainer on the fast loop's inputs.

Same inputs as the fast loop (``backend: fast``): the prompts and answers are the token ids ``policy.encode`` made
(the prompt's end kept, answers cut and closed by the end-of-turn token), handed to TRL as text it re-tokenizes to
the same ids; the reward pairs are tokenized here, the end of each text kept, as the fast loop does. Same outputs: the
trained model (top layers or a LoRA adapter on them) and one history row per step with the fast loop's keys
(``loss``, ``reward_accuracy``, ``reward_margin``, ``grad_norm``, ``lr``), which the stage logs to MLflow as it
does for the fast loop: the gate cannot tell which back-end trained a challenger.

What differs is how a step runs: TRL runs the whole model forward for every batch (no shared trunk cache: slower on
a CPU), and it brings TRL's devices: CUDA, bf16, 4-bit bases, and several processes under ``accelerate launch``
(DDP, DeepSpeed ZeRO), where the fast loop is one process. The reference log-probabilities are precomputed before
the first step (``precompute_ref_log_probs``), as in the fast loop, so no reference copy is kept in memory.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING

from flywheel.models.trl_common import _args, _history_callback, _quiet, distributed
from flywheel.params import TrainPolicyParams

if TYPE_CHECKING:
    from flywheel.models.policy import Encoded


def _decode(tok, ids: list[int], added: list[int]) -> str:
    """Token ids as text that the tokenizer turns back into the same ids (the tokens it adds itself left off)."""
    if added and ids[: len(added)] == added:
        ids = ids[len(added) :]
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def policy_dataset(tok, items: list[Encoded], method: str, desirable: list[bool] | None = None):
    """The encoded items as a TRL text dataset: ``prompt``/``chosen``/``rejected`` (DPO) or
    ``prompt``/``completion``/``label`` (KTO)."""
    from datasets import Dataset

    added = tok("", add_special_tokens=True)["input_ids"]
    prompts = [_decode(tok, e.prompt, added) for e in items]
    if method == "kto":
        flags = desirable or []
        return Dataset.from_dict(
            {
                "prompt": prompts,
                "completion": [tok.decode(e.answers[0], skip_special_tokens=False) for e in items],
                "label": [bool(f) for f in flags],
            }
        )
    return Dataset.from_dict(
        {
            "prompt": prompts,
            "chosen": [tok.decode(e.answers[0], skip_special_tokens=False) for e in items],
            "rejected": [tok.decode(e.answers[1], skip_special_tokens=False) for e in items],
        }
    )


def train_policy(
    model,
    tok,
    items: list[Encoded],
    params: TrainPolicyParams,
    desirable: list[bool] | None = None,
    on_step: Callable[[int, dict], None] | None = None,
    callbacks: list | None = None,
) -> list[dict]:
    """DPO (``params.method: dpo``, items are pairs) or KTO (``kto``, items are single answers with ``desirable``
    flags) through TRL on ``model`` in place (its trainable parameters: the top layers or the LoRA adapter, as the
    fast loop's set-up left them); ``callbacks``: more TrainerCallbacks (a benchmark's timer). Returns the history
    rows."""
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    from flywheel.models.dpo import trainable_parameters

    if not items:
        raise ValueError("no training examples")
    if not trainable_parameters(model, params.frozen_layers):  # the top layers, or PEFT's adapter
        raise ValueError("the policy has no trainable parameters (train_policy.frozen_layers, train_policy.adapter)")
    longest = max(len(e.prompt) + max(len(a) for a in e.answers) for e in items)
    rows: list[dict] = []
    # One process: the reference log-probs are computed once before the first step. Several: TRL caches them in a
    # file beside the dataset, which for data held in memory is a folder of each process's own; so each step runs
    # the reference (the adapter disabled, or a frozen copy of a model trained without one).
    precompute = distributed()[1] == 1
    ref_model = None
    if not precompute and not hasattr(model, "peft_config"):
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    common = dict(
        beta=params.beta,
        max_length=longest + 8,  # the inputs are cut already: TRL cuts nothing more
        precompute_ref_log_probs=precompute,
        warmup_steps=params.warmup_steps,
        gradient_checkpointing=params.gradient_checkpointing,
        disable_dropout=True,
    )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    quiet = logging.getLogger("transformers.trainer")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        with tempfile.TemporaryDirectory(prefix="flywheel-trl-") as out:
            if params.method == "kto":
                dataset = policy_dataset(tok, items, "kto", desirable)
                args = _args(
                    KTOConfig,
                    params,
                    params.steps,
                    params.batch_size,
                    out,
                    cpu_bf16=params.bf16,
                    desirable_weight=params.kto.desirable_weight,
                    undesirable_weight=params.kto.undesirable_weight,
                    **common,
                )
                trainer_cls = KTOTrainer
            else:
                dataset = policy_dataset(tok, items, "dpo")
                # sft_weight: TRL's combined loss adds the NLL of the chosen answers (RPO); the fast loop's separate
                # SFT batches of corrections have no TRL counterpart in one trainer
                losses = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, params.sft_weight]}
                if params.sft_weight == 0:
                    losses = {"loss_type": ["sigmoid"]}
                args = _args(
                    DPOConfig, params, params.steps, params.batch_size, out, cpu_bf16=params.bf16, **common, **losses
                )
                trainer_cls = DPOTrainer
            trainer = trainer_cls(
                model=model,
                ref_model=ref_model,
                args=args,
                train_dataset=dataset,
                processing_class=tok,
                callbacks=[_history_callback(rows, on_step), *(callbacks or [])],
            )
            _quiet(trainer)
            trainer.train()
            keep_gathered(trainer, model)
    finally:
        quiet.setLevel(level)
    return rows


GATHERED = "_flywheel_state_dict"  # a model trained under ZeRO-3: its whole weights, gathered for the writer


def keep_gathered(trainer, model) -> None:
    """Under DeepSpeed ZeRO-3 each process holds a shard of the weights: gather them (every process takes part) and
    keep the whole state dict on the model for the main process to write (``save_pretrained(state_dict=...)``)."""
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if plugin is None or getattr(plugin, "zero_stage", 0) != 3:
        return
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if hasattr(model, "peft_config"):  # an adapter version keeps its adapter weights only
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(model, state_dict=state)
    setattr(model, GATHERED, state)
