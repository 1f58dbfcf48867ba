"""Policy training: the default CPU recipe (params.yaml train_policy: lower 24 of 30 layers frozen, their
outputs and the reference log-probs cached per pair) against full-parameter DPO (every decoder layer
trained; same loss, data, tokenisation, batches, steps and learning rate), in the same process.
Prints seconds per step and held-out preference accuracy of the implicit reward (vs the base model) on
the frozen test split of the shipped HH-RLHF dev file.

A LoRA arm (``--lora-lr``; 0 skips it) trains a LoRA adapter (params.yaml ``train_policy.lora``) on the same top
layers with the same trunk cache, the way ``train_policy.adapter: lora`` does: the measurement behind the demo's
default ``adapter`` (README "Use your own model").

A short arm times TRL's own DPOTrainer on the same pairs, with the same lower layers frozen and
``precompute_ref_log_probs=True`` (TRL's option for a frozen reference), so the choice of our training
loop over TRL's stays checked against the installed TRL (seconds per step only; ``--trl-steps 0`` skips it).

    python benchmarks/bench_policy.py [--steps 24] [--trl-steps 4] [--fp32-top] [--work benchmarks/out/pref]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

from _prefdata import ROOT, params_section, policy_pairs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=None, help="default: params.yaml train_policy.steps")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "pref")
    ap.add_argument(
        "--base",
        type=Path,
        default=ROOT / "models" / "base" / "policy",
        help="the base policy folder (built by `dvc repro base_models` when missing)",
    )
    ap.add_argument("--trl-steps", type=int, default=4, help="steps of the TRL DPOTrainer arm (0: skip it)")
    ap.add_argument("--lora-lr", type=float, default=1e-3, help="learning rate of the LoRA arm (0: skip it)")
    ap.add_argument("--no-full", action="store_true", help="skip the full-parameter arm")
    ap.add_argument("--no-default", action="store_true", help="skip the default-recipe arm")
    ap.add_argument(
        "--fp32-top",
        action="store_true",
        help="an arm with the trained layers in fp32 (train_policy.bf16: false), against the default's bf16 autocast",
    )
    args = ap.parse_args()

    from flywheel.evaluation.policy_eval import implicit_margins
    from flywheel.evaluation.stats import correct_from_margin, mean_ci, paired_diff
    from flywheel.models.dpo import attach_lora, train_dpo
    from flywheel.models.policy import encode, load_policy

    train, test = policy_pairs(args.base, args.work)
    default = params_section("train_policy")
    if args.steps:
        default = default.updated(steps=args.steps)
    full = default.updated(frozen_layers=0)
    evalp = params_section("evaluate").updated(frozen_layers=default.frozen_layers)
    reference, tok = load_policy(args.base)
    pairs = encode(tok, train, default.max_prompt_tokens, default.max_answer_tokens)
    print(f"pairs: {len(train)} train, {len(test)} test; {default.steps} steps of {default.batch_size} pairs")
    results, correct = {}, {}
    arms = [] if args.no_default else [("default recipe (24 frozen, cached trunk)", default)]
    if not args.no_full:
        arms.append(("full-parameter DPO", full))
    if args.lora_lr:
        lora = default.updated(adapter="lora", lr=args.lora_lr)
        arms.append((f"LoRA r={lora.lora.r} on the top layers (lr {args.lora_lr:g})", lora))
    if args.fp32_top:
        arms.append(("default recipe, trained layers in fp32", default.updated(bf16=False)))
    for label, recipe in arms:
        model = copy.deepcopy(reference)
        if recipe.adapter == "lora":
            model = attach_lora(model, recipe)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        else:
            trainable = sum(
                p.numel() for layer in model.model.layers[recipe.frozen_layers :] for p in layer.parameters()
            )
        stamps = []
        t0 = time.perf_counter()
        train_dpo(model, pairs, [], tok.pad_token_id, recipe, on_step=lambda s, r: stamps.append(time.perf_counter()))
        per_step = [b - a for a, b in zip([t0] + stamps[:-1], stamps)]
        if recipe.adapter == "lora":
            model = model.merge_and_unload()
        margins = implicit_margins(reference, {"m": model}, tok, test, evalp)["m"]
        correct[label] = correct_from_margin(margins)
        acc = mean_ci(correct[label])
        results[label] = {
            "seconds_per_step_mean": statistics.mean(per_step),
            "seconds_per_step_median": statistics.median(per_step),
            "trainable_params": trainable,
            "accuracy": acc["value"],
            "accuracy_ci95": acc["ci"],
        }
        print(
            f"{label}: {statistics.mean(per_step):.2f} s/step (median {statistics.median(per_step):.2f}), "
            f"{trainable / 1e6:.1f}M trainable, held-out accuracy {acc['value']:.4f} "
            f"[{acc['ci'][0]:.4f}, {acc['ci'][1]:.4f}] on {acc['n']} pairs",
            flush=True,
        )
        del model
    a, b = results[arms[0][0]], results[arms[-1][0]]
    if args.trl_steps:
        results["TRL DPOTrainer"] = trl_arm(args.base, train, default, args.trl_steps)
        print(
            f"TRL DPOTrainer ({default.frozen_layers} frozen, precompute_ref_log_probs): "
            f"{results['TRL DPOTrainer']['seconds_per_step_mean']:.2f} s/step over {args.trl_steps} steps "
            f"(+ {results['TRL DPOTrainer']['precompute_seconds']:.0f} s precomputing reference log-probs)",
            flush=True,
        )
    speed = b["seconds_per_step_mean"] / a["seconds_per_step_mean"]
    diff = paired_diff(correct[arms[0][0]], correct[arms[-1][0]])
    print(f"s/step, {arms[-1][0]} / default recipe: {speed:.2f}x")
    print(
        f"accuracy, default - {arms[-1][0]}: {diff['diff']:+.4f} "
        f"(paired 95% [{diff['ci'][0]:+.4f}, {diff['ci'][1]:+.4f}])"
    )
    print(json.dumps({"results": results, "speedup": speed, "accuracy_diff": diff}))


def trl_arm(base: Path, train: list[dict], recipe, steps: int) -> dict:
    """TRL's DPOTrainer on the same pairs and recipe: seconds per optimisation step (first step excluded)."""
    import tempfile

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from flywheel.models.device import bf16_fast
    from flywheel.models.policy import freeze_trunk, load_policy

    model, tok = load_policy(base)
    ref, _ = load_policy(base)
    freeze_trunk(model, recipe.frozen_layers)
    rows = [
        {
            "prompt": p["prompt"],
            "chosen": [{"role": "assistant", "content": p["chosen"]}],
            "rejected": [{"role": "assistant", "content": p["rejected"]}],
        }
        for p in train[: (steps + 1) * recipe.batch_size]
    ]
    stamps: list[float] = []

    class Timer(TrainerCallback):
        def on_step_end(self, *_, **__):
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        cfg = DPOConfig(
            output_dir=out,
            per_device_train_batch_size=recipe.batch_size,
            max_steps=steps + 1,
            learning_rate=recipe.lr,
            beta=recipe.beta,
            warmup_steps=0,
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            logging_steps=1,
            bf16=recipe.bf16 and bf16_fast("cpu"),
            precompute_ref_log_probs=True,
            precompute_ref_batch_size=recipe.batch_size,
            dataset_num_proc=None,
            max_length=recipe.max_prompt_tokens + recipe.max_answer_tokens,
            truncation_mode="keep_end",
        )
        trainer = DPOTrainer(
            model=model,
            ref_model=ref,
            args=cfg,
            train_dataset=Dataset.from_list(rows),
            processing_class=tok,
            callbacks=[Timer()],
        )
        t0 = time.perf_counter()
        trainer.train()
    per_step = [b - a for a, b in zip(stamps, stamps[1:])]
    first = stamps[0] - t0  # the reference log-probs are precomputed before the first step
    return {
        "seconds_per_step_mean": statistics.mean(per_step),
        "seconds_per_step_median": statistics.median(per_step),
        "precompute_seconds": max(0.0, first - statistics.mean(per_step)),
        "steps_timed": len(per_step),
    }


if __name__ == "__main__":
    main()
