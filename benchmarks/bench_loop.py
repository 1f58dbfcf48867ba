"""Does the flywheel turn? The shipped HH-RLHF data (and the native batch) streamed through the loop in K batches.

Each turn is what a user runs: `flywheel ingest` of the next batch, `flywheel repro` (= dvc repro), `flywheel
release`, in a fresh workspace (a copy of this repository, the params of the checkout: the demo profile and the
default gate). After every turn the evaluate stage has scored the champion and the challenger on the golden set
(params.yaml ``golden``, never trained on: metrics/evaluate.json), so the benchmark reads:

- per turn: golden-set accuracy of champion and challenger with intervals, for the policy and the reward model,
  and whether the challenger was promoted;
- false promotions: a promoted challenger worse than the champion it replaced beyond noise on the golden set;
- missed gains: a refused challenger better than the champion beyond noise on the golden set;
- the final champion against the turn-1 champion on the golden set (paired difference and interval), and the
  final policy against "pick the shorter answer".

It writes a table (markdown), a plot and a JSON file under --out, and logs them to the workspace's MLflow (run
"bench_loop"). Minutes per turn on a CPU: run it alone.

    python benchmarks/bench_loop.py --turns 4 [--out benchmarks/out/loop] [--set train_policy.steps=60 ...]
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devkit.workspaces import clean_env, copy_repo, sh  # noqa: E402

HH = [ROOT / "data/demo/hh-rlhf-batch1.jsonl.gz", ROOT / "data/demo/hh-rlhf-batch2.jsonl.gz"]
NATIVE = ROOT / "data/demo/native-batch.jsonl"
KINDS = (("policy", "golden_pref_accuracy"), ("reward", "golden_pairwise_accuracy"))
PRIMARY = {"policy": "pref_accuracy", "reward": "pairwise_accuracy"}  # on the rolling test split
DECIDES = {"policy": "heldout_pref_accuracy", "reward": "heldout_pairwise_accuracy"}  # the default gate's primary


def _set_params(root: Path, overrides: list[str]) -> None:
    """``section.key=value`` overrides (YAML values) written into the workspace's params.yaml."""
    import yaml

    if not overrides:
        return
    path = root / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for item in overrides:
        key, _, value = item.partition("=")
        node = params
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    sh(["git", "commit", "-qam", "bench_loop params"], root)


def _batches(root: Path, turns: int) -> list[list[tuple[str, Path]]]:
    """The HH rows of both demo files in ``turns`` consecutive slices (the native batch joins the first)."""
    rows = [line for f in HH for line in gzip.open(f, "rt").read().splitlines() if line.strip()]
    size = -(-len(rows) // turns)
    out = []
    for t in range(turns):
        path = root / f"stream-{t + 1}.jsonl.gz"
        with gzip.open(path, "wt") as fh:
            fh.write("\n".join(rows[t * size : (t + 1) * size]) + "\n")
        out.append([("hh-rlhf", path)] + ([("native", NATIVE)] if t == 0 else []))
    return out


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _ci(ci: list | None) -> str:
    return "-" if not ci or ci[0] is None else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def _turn(root: Path, turn: int, batches: list[tuple[str, Path]], env: dict) -> dict:
    t0 = time.perf_counter()
    for fmt, path in batches:
        sh(["flywheel", "ingest", "--format", fmt, str(path)], root, env, timeout=1800)
    sh(["flywheel", "repro"], root, env, timeout=7200)
    release = json.loads(sh(["flywheel", "release", "--json"], root, env).stdout.strip().splitlines()[-1])
    metrics = json.loads((root / "metrics/evaluate.json").read_text())
    prepare = json.loads((root / "metrics/prepare.json").read_text())
    row = {"turn": turn, "seconds": round(time.perf_counter() - t0, 1), "pairs_train": prepare["pairs_train"]}
    for kind, key in KINDS:
        g = metrics[kind][key]
        outcome = next(r for r in release if r["model"] == kind)
        row[kind] = {
            "champion": g["champion"],
            "champion_ci": g["champion_ci"],
            "challenger": g["challenger"],
            "challenger_ci": g["challenger_ci"],
            "diff": g["diff"],
            "diff_ci": g["ci"],
            "n": g["n"],
            "length_baseline": g["length_baseline"],
            "test_split_diff": metrics[kind][PRIMARY[kind]]["diff"],
            "test_split_ci": metrics[kind][PRIMARY[kind]]["ci"],
            "test_split_n": metrics[kind][PRIMARY[kind]]["n"],
            "heldout_diff": metrics[kind].get(DECIDES[kind], {}).get("diff"),
            "heldout_ci": metrics[kind].get(DECIDES[kind], {}).get("ci"),
            "promoted": bool(outcome["promoted"]),
            "version": outcome["version"],
        }
    return row


def _paired_final(root: Path, first: dict[str, str], last: dict[str, str]) -> dict:
    """The final champions against the turn-1 champions on the golden set, paired, in this process."""
    from flywheel.data.golden import load_golden
    from flywheel.evaluation import stats
    from flywheel.evaluation.eval_reward import resolve_model
    from flywheel.evaluation.policy_eval import implicit_margins
    from flywheel.evaluation.slices import cluster_keys, length_baseline
    from flywheel.models.policy import load_policy
    from flywheel.models.reward import RewardModel, pairwise_correct
    from flywheel.registry import MODELS
    from flywheel.settings import load_settings

    s = load_settings(root, env={})
    p, c = s.params, s.params.contract
    golden = load_golden(root / p.golden.path, p.golden.format, c.max_text_chars, c.max_turns).pairs
    base = root / "models/base/policy"
    out = {}
    folders = {
        kind: {
            w: resolve_model(s, f"models:/{MODELS[kind]}/{v[kind]}", kind)
            for w, v in (("first", first), ("last", last))
        }
        for kind in ("policy", "reward")
    }
    ref, tok = load_policy(base)
    models = {w: load_policy(f, base=base)[0] for w, f in folders["policy"].items()}
    margins = implicit_margins(ref, models, tok, golden, p.evaluate)
    correct = {w: stats.correct_from_margin(m) for w, m in margins.items()}
    e = p.evaluate
    keys = cluster_keys(golden)
    out["policy"] = stats.paired_diff(correct["last"], correct["first"], e.confidence, e.bootstrap, e.seed, keys)
    out["policy_vs_length"] = stats.paired_diff(
        correct["last"], length_baseline(golden), e.confidence, e.bootstrap, e.seed, keys
    )
    rewards = {w: pairwise_correct(RewardModel.load(f), golden) for w, f in folders["reward"].items()}
    out["reward"] = stats.paired_diff(rewards["last"], rewards["first"], e.confidence, e.bootstrap, e.seed, keys)
    out["reward_vs_length"] = stats.paired_diff(
        rewards["last"], length_baseline(golden), e.confidence, e.bootstrap, e.seed, keys
    )
    out["versions"] = {"first": first, "last": last}
    return out


def _plot(rows: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    turns = [r["turn"] for r in rows]
    for ax, (kind, _) in zip(axes, KINDS):
        for who, color, dx in (("champion", "tab:blue", -0.06), ("challenger", "tab:orange", 0.06)):
            ys = [r[kind][who] for r in rows]
            lo = [y - r[kind][f"{who}_ci"][0] for y, r in zip(ys, rows)]
            hi = [r[kind][f"{who}_ci"][1] - y for y, r in zip(ys, rows)]
            ax.errorbar([t + dx for t in turns], ys, yerr=[lo, hi], fmt="o-", color=color, capsize=3, label=who)
        for r in rows:
            mark, color = ("promoted", "tab:green") if r[kind]["promoted"] else ("refused", "tab:red")
            ax.annotate(
                mark,
                (r["turn"], r[kind]["challenger_ci"][1]),
                textcoords="offset points",
                xytext=(0, 6),
                ha="center",
                fontsize=8,
                color=color,
            )
        ax.axhline(rows[0][kind]["length_baseline"], color="grey", ls=":", lw=1, label="pick the shorter answer")
        ax.set_title(f"{kind}: golden-set accuracy (95% CI)")
        ax.set_xlabel("turn")
        ax.set_xticks(turns)
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _table(rows: list[dict], final: dict, counts: dict) -> str:
    lines = [
        "| turn | model | train pairs | golden: champion | golden: challenger | golden: difference [95% CI] | "
        "test split (n): difference | test + golden (decides) | released |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for kind, _ in KINDS:
            m = r[kind]
            lines.append(
                f"| {r['turn']} | {kind} | {r['pairs_train']} | {_fmt(m['champion'])} {_ci(m['champion_ci'])} | "
                f"{_fmt(m['challenger'])} {_ci(m['challenger_ci'])} | {_fmt(m['diff'])} {_ci(m['diff_ci'])} | "
                f"({m['test_split_n']}) {_fmt(m['test_split_diff'])} {_ci(m['test_split_ci'])} | "
                f"{_fmt(m['heldout_diff'])} {_ci(m['heldout_ci'])} | {'promoted' if m['promoted'] else 'refused'} |"
            )
    lines += ["", f"False promotions: {counts['false_promotions']}; missed gains: {counts['missed_gains']}.", ""]
    for kind in ("policy", "reward"):
        f, vs = final[kind], final[f"{kind}_vs_length"]
        lines.append(
            f"- {kind}: final champion (v{final['versions']['last'][kind]}) against the turn-1 champion "
            f"(v{final['versions']['first'][kind]}) on the golden set: {f['diff']:+.3f} {_ci(f['ci'])} "
            f"({f['challenger']:.3f} vs {f['champion']:.3f}, n={f['n']}); against pick-the-shorter-answer "
            f"({vs['champion']:.3f}): {vs['diff']:+.3f} {_ci(vs['ci'])}"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "loop")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value in params.yaml")
    args = ap.parse_args()
    if args.turns < 2:
        ap.error("--turns must be 2 or more (a loop turns)")
    from flywheel.cli._common import quiet_libraries
    from flywheel.models.device import cpu_summary

    quiet_libraries()  # no progress bars in a log

    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    root = copy_repo(ROOT, args.out / "workspace")
    _set_params(root, args.overrides)
    env = clean_env()
    print(f"bench_loop: {args.turns} turns in {root}\nmachine: {cpu_summary()}", flush=True)
    sh(["dvc", "repro", "base_models"], root, env, timeout=1800)
    sh(["flywheel", "bootstrap"], root, env)
    rows, champions = [], []
    for turn, batches in enumerate(_batches(root, args.turns), 1):
        row = _turn(root, turn, batches, env)
        rows.append(row)
        status = json.loads(sh(["flywheel", "status", "--json"], root, env).stdout.strip().splitlines()[-1])
        champions.append(
            {
                k: next(
                    str(v["version"]) for v in status if v["model"] == f"flywheel-{k}" and "champion" in v["aliases"]
                )
                for k in ("policy", "reward")
            }
        )
        print(
            f"turn {turn} ({row['seconds']:.0f} s, {row['pairs_train']} train pairs): "
            + "; ".join(
                f"{k} golden {_fmt(row[k]['champion'])} -> {_fmt(row[k]['challenger'])} "
                f"{_ci(row[k]['diff_ci'])} {'promoted' if row[k]['promoted'] else 'refused'}"
                for k, _ in KINDS
            ),
            flush=True,
        )
    counts = {
        "false_promotions": sum(r[k]["promoted"] and r[k]["diff_ci"][1] < 0 for r in rows for k, _ in KINDS),
        "missed_gains": sum(not r[k]["promoted"] and r[k]["diff_ci"][0] > 0 for r in rows for k, _ in KINDS),
    }
    final = _paired_final(root, champions[0], champions[-1])
    table = _table(rows, final, counts)
    print("\n" + table)
    plot = _plot(rows, args.out / "bench_loop.png")
    (args.out / "bench_loop.md").write_text(f"# bench_loop: {args.turns} turns on {cpu_summary()}\n\n" + table)
    result = {"machine": cpu_summary(), "turns": rows, "champions": champions, "final": final, **counts}
    (args.out / "bench_loop.json").write_text(json.dumps(result, indent=2))
    import mlflow

    from flywheel import tracking
    from flywheel.settings import load_settings

    exp = tracking.configure_from(load_settings(root, env={}))
    with mlflow.start_run(experiment_id=exp, run_name="bench_loop", tags={"flywheel.benchmark": "loop"}):
        for r in rows:
            for kind, _ in KINDS:
                for who in ("champion", "challenger"):
                    mlflow.log_metric(f"golden.{kind}.{who}", r[kind][who], step=r["turn"])
                mlflow.log_metric(f"golden.{kind}.promoted", float(r[kind]["promoted"]), step=r["turn"])
        mlflow.log_metrics({**counts, **{f"final.{k}.diff": final[k]["diff"] for k in ("policy", "reward")}})
        for f in (plot, args.out / "bench_loop.md", args.out / "bench_loop.json"):
            mlflow.log_artifact(str(f))
    print(f"wrote {args.out}/bench_loop.{{md,png,json}}; MLflow run 'bench_loop' in {root}/mlruns.db")


if __name__ == "__main__":
    main()
