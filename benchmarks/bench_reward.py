"""Reward-model accuracy: the default recipe (params.yaml train_reward, demo profile) over 3 seeds, beside
the frozen-encoder baseline (MiniLM embeddings + a trained linear head), in the same process and on the
same split of the shipped HH-RLHF dev file (train on the train split, score the frozen test split).

    python benchmarks/bench_reward.py [--seeds 0 1 2] [--no-baseline] [--fp32-encoder] [--work benchmarks/out/pref]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from _prefdata import ROOT, params_section, prepared_sets

T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "pref")
    ap.add_argument("--no-baseline", action="store_true", help="skip the frozen-encoder baseline")
    ap.add_argument(
        "--fp32-encoder",
        action="store_true",
        help="an arm training the encoder in fp32 (train_reward.bf16: false), against the default's bf16 autocast",
    )
    args = ap.parse_args()
    import torch

    from flywheel.evaluation.stats import mean_ci
    from flywheel.models.reward import RewardModel, pairwise_correct, train_reward
    from pipelines.base_models import minilm_folder
    from pipelines.prepare import read_set

    torch.set_num_threads(2)
    prepared = prepared_sets(args.work)
    train, test = read_set(prepared, "reward_pairs", "train"), read_set(prepared, "reward_pairs", "test")
    print(f"reward pairs: {len(train)} train, {len(test)} test (HH-RLHF harmless dev file)")
    default = params_section("train_reward")
    frozen = default.updated(frozen_encoder=True, epochs=30.0)
    results = {}
    arms = [] if args.no_baseline else [("frozen-encoder baseline", frozen)]
    arms.append(("default recipe", default))
    if args.fp32_encoder:
        arms.append(("default recipe, encoder in fp32", default.updated(bf16=False)))
    for label, recipe in arms:
        accs, secs = [], []
        for seed in args.seeds:
            model = RewardModel.from_encoder(minilm_folder(), recipe.max_length, recipe.context_turns)
            t0 = time.perf_counter()
            train_reward(model, train, recipe.updated(seed=seed))
            secs.append(time.perf_counter() - t0)
            acc = mean_ci(pairwise_correct(model, test))
            accs.append(acc["value"])
            print(
                f"  {label}, seed {seed}: accuracy {acc['value']:.4f} "
                f"(bootstrap 95% [{acc['ci'][0]:.4f}, {acc['ci'][1]:.4f}]), train {secs[-1]:.0f} s",
                flush=True,
            )
        mean = statistics.mean(accs)
        half = T95[len(accs) - 1] * statistics.stdev(accs) / len(accs) ** 0.5 if len(accs) > 1 else float("nan")
        results[label] = {
            "mean": mean,
            "ci95": [mean - half, mean + half],
            "seeds": accs,
            "train_seconds": statistics.mean(secs),
        }
        print(
            f"{label}: mean accuracy over {len(accs)} seeds {mean:.4f} (95% t-interval "
            f"[{mean - half:.4f}, {mean + half:.4f}]), mean train time {statistics.mean(secs):.0f} s"
        )
    for other in [label for label, _ in arms if label != "default recipe"]:
        gain = results["default recipe"]["mean"] - results[other]["mean"]
        speed = results[other]["train_seconds"] / results["default recipe"]["train_seconds"]
        print(f"default - {other}: {gain:+.4f} accuracy, {speed:.2f}x its train time; target: default >= 0.65")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
