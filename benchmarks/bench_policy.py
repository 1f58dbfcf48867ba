"""Policy training: the default CPU recipe (params.yaml train_policy: lower 24 of 30 layers frozen, their
outputs and the reference log-probs cached per pair) against full-parameter DPO (every decoder layer
trained; same loss, data, tokenisation, batches, steps and learning rate), in the same process.
Prints seconds per step and held-out preference accuracy of the implicit reward (vs the base model) on
the frozen test split of the shipped HH-RLHF dev file.

    python benchmarks/bench_policy.py [--steps 24] [--work benchmarks/out/pref]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

from _prefdata import ROOT, params_section, prepared_sets


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=None, help="default: params.yaml train_policy.steps")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "pref")
    ap.add_argument("--base", type=Path, default=ROOT / "models" / "base" / "policy",
                    help="the base policy folder (built by `dvc repro base_models` when missing)")
    args = ap.parse_args()
    import torch

    from pipelines.base_models import build_policy
    from pipelines.dpo import train_dpo
    from pipelines.evaluate import EvalParams, implicit_margins
    from pipelines.policy_model import encode, load_policy
    from pipelines.prepare import read_set
    from pipelines.stats import correct_from_margin, mean_ci, paired_diff
    from pipelines.train_policy import PolicyParams

    torch.set_num_threads(2)
    if not (args.base / "model.safetensors").exists():
        build_policy(args.base)
    prepared = prepared_sets(args.work)
    train, test = read_set(prepared, "pairs", "train"), read_set(prepared, "pairs", "test")
    default = PolicyParams(**params_section("train_policy"))
    if args.steps:
        default = replace(default, steps=args.steps)
    full = replace(default, frozen_layers=0)
    evalp = EvalParams(**{**params_section("evaluate"), "frozen_layers": default.frozen_layers})
    reference, tok = load_policy(args.base)
    pairs = encode(tok, train, default.max_prompt_tokens, default.max_answer_tokens)
    print(f"pairs: {len(train)} train, {len(test)} test; {default.steps} steps of {default.batch_size} pairs")
    results, correct = {}, {}
    for label, recipe in (("default recipe (24 frozen, cached trunk)", default), ("full-parameter DPO", full)):
        model = copy.deepcopy(reference)
        stamps = []
        t0 = time.perf_counter()
        train_dpo(model, pairs, [], tok.pad_token_id, recipe, on_step=lambda s, r: stamps.append(time.perf_counter()))
        per_step = [b - a for a, b in zip([t0] + stamps[:-1], stamps)]
        trainable = sum(p.numel() for layer in model.model.layers[recipe.frozen_layers:] for p in layer.parameters())
        margins = implicit_margins(reference, {"m": model}, tok, test, evalp)["m"]
        correct[label] = correct_from_margin(margins)
        acc = mean_ci(correct[label])
        results[label] = {"seconds_per_step_mean": statistics.mean(per_step),
                          "seconds_per_step_median": statistics.median(per_step),
                          "trainable_params": trainable, "accuracy": acc["value"], "accuracy_ci95": acc["ci"]}
        print(f"{label}: {statistics.mean(per_step):.2f} s/step (median {statistics.median(per_step):.2f}), "
              f"{trainable / 1e6:.1f}M trainable, held-out accuracy {acc['value']:.4f} "
              f"[{acc['ci'][0]:.4f}, {acc['ci'][1]:.4f}] on {acc['n']} pairs", flush=True)
        del model
    a, b = results.values()
    speed = b["seconds_per_step_mean"] / a["seconds_per_step_mean"]
    diff = paired_diff(*correct.values())
    print(f"speed-up of the default recipe per step: {speed:.2f}x (target >= 2x)")
    print(f"accuracy, default - full: {diff['diff']:+.4f} (paired 95% [{diff['ci'][0]:+.4f}, {diff['ci'][1]:+.4f}]); "
          "target: within 1 point")
    print(json.dumps({"results": results, "speedup": speed, "accuracy_diff": diff}))


if __name__ == "__main__":
    main()
