"""Packed batches (a pair's prompt once, then both answers; flywheel/models/packing.py) against padded ones, in one
process on the demo's data: the reference pass of ``train_dpo`` (trunk and reference log-probabilities for every
pair its schedule visits), its first DPO steps, and the held-out margins of ``evaluate`` on the test pairs. Prints
seconds and the packed/padded ratio of each, the tokens each layout runs, and the largest difference between the
two layouts' log-probabilities (they compute the same numbers, up to float rounding).

    python benchmarks/bench_packing.py [--steps 12] [--test-pairs 80] [--work benchmarks/out/pref]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from _common import load_line, machine_line
from _prefdata import ROOT, params_section, policy_pairs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12, help="DPO steps per layout (their pairs: the reference pass)")
    ap.add_argument("--test-pairs", type=int, default=80, help="held-out pairs scored per layout (0: all)")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "pref")
    ap.add_argument("--base", type=Path, default=ROOT / "models" / "base" / "policy")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()

    from flywheel.evaluation.policy_eval import log_ratios
    from flywheel.models import packing
    from flywheel.models.dpo import train_dpo
    from flywheel.models.policy import encode, load_policy

    train, test = policy_pairs(args.base, args.work)
    test = test[: args.test_pairs or None]
    params = params_section("train_policy")
    evalp = params_section("evaluate")
    base, tok = load_policy(args.base)
    pairs = encode(tok, train, params.max_prompt_tokens, params.max_answer_tokens)
    print(machine_line())
    print(load_line())
    print(f"{args.steps} steps of {params.batch_size} pairs (of {len(pairs)}); {len(test)} test pairs")
    recipe = params.updated(steps=args.steps)
    real_packs = packing.packs
    out: dict[str, dict] = {}
    for layout in ("padded", "packed"):
        packing.packs = real_packs if layout == "packed" else (lambda model, k: False)
        model = copy.deepcopy(base)
        stamps: list[float] = []
        t0 = time.perf_counter()
        history = train_dpo(
            model,
            pairs,
            [],
            tok.pad_token_id,
            recipe,
            on_step=lambda s, r: stamps.append(time.perf_counter()),
        )
        per_step = (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)
        reference_pass = stamps[0] - t0 - per_step  # the first stamp: the pass and step 1
        t1 = time.perf_counter()
        ratios = log_ratios(base, {"m": model}, tok, test, evalp)  # the trained model against the base
        margins_s = time.perf_counter() - t1
        out[layout] = {
            "reference_pass_s": reference_pass,
            "s_per_step": per_step,
            "margins_s": margins_s,
            "first_loss": history[0]["dpo_loss"],
            "ratios": ratios["m"][:5],
        }
        print(
            f"{layout}: reference pass {reference_pass:.1f} s, {per_step:.2f} s/step, "
            f"test margins {margins_s:.1f} s, first loss {history[0]['dpo_loss']:.5f}",
            flush=True,
        )
        del model
    packing.packs = real_packs
    a, b = out["padded"], out["packed"]
    for key in ("reference_pass_s", "s_per_step", "margins_s"):
        print(f"{key}: packed / padded = {b[key] / a[key]:.2f}")
    print(f"first DPO loss: padded {a['first_loss']:.6f}, packed {b['first_loss']:.6f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
