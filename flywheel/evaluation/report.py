"""The evaluation report: Markdown with plots (accuracy by slice beside the length-only baseline,
win rates with intervals), written beside the JSON metrics and logged to MLflow."""

from __future__ import annotations

from pathlib import Path


def _fmt(x) -> str:
    return "-" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))


def _ci(m: dict) -> str:
    lo, hi = m.get("ci") or [None, None]
    return "-" if lo is None else f"[{lo:+.3f}, {hi:+.3f}]"


def plot_slices(kind: str, metrics: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    slices = metrics.get("slices", {})
    names = list(slices)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names) + 2), 3.6))
    w = 0.27
    ax.bar(x - w, [slices[n]["champion"] for n in names], w, label="champion")
    ax.bar(x, [slices[n]["challenger"] for n in names], w, label="challenger")
    ax.bar(x + w, [slices[n]["length_baseline"] for n in names], w, label="pick-the-shorter baseline", color="0.7")
    ax.axhline(0.5, color="k", lw=0.6, ls=":")
    ax.set_xticks(x, [f"{n}\n(n={slices[n]['n']})" for n in names], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{kind}: held-out preference accuracy by slice")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_rates(policy: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [
        (k, policy[k])
        for k in ("judged_win_rate", "harmless_win_rate")
        if k in policy and policy[k].get("value") is not None
    ]  # not measured: nothing to plot
    fig, ax = plt.subplots(figsize=(6, 2.6))
    for i, (_name, m) in enumerate(rows):
        lo, hi = m["ci"]
        ax.errorbar([m["value"]], [i], xerr=[[m["value"] - lo], [hi - m["value"]]], fmt="o", capsize=4)
    ax.axvline(0.5, color="k", lw=0.6, ls=":")
    ax.set_yticks(range(len(rows)), [f"{n} (n={m['n']})" for n, m in rows])
    ax.set_xlim(0, 1)
    ax.set_title("challenger vs champion, judged by the champion reward model (95% CI)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def sample_lines(samples: list[dict], n: int = 5) -> list[str]:
    """Markdown for the example answers drawn from a shipped suite; anything else (a held-out sample written
    by an older evaluation, without ``suite``) is left out."""
    lines = []
    for s in [x for x in samples if isinstance(x, dict) and x.get("suite")][:n]:
        refused = {k: " (refused)" if s.get(f"{k}_refused") else "" for k in ("champion", "challenger")}
        lines += [
            f"**Instruction ({s['suite']}):** {s['prompt'][:300]}",
            "",
            f"- champion{refused['champion']}: {s['champion'][:300]}",
            f"- challenger{refused['challenger']}: {s['challenger'][:300]}",
            "",
        ]
    return lines


def write(metrics: dict, out_dir: Path) -> list[Path]:
    """report.md and its plots in ``out_dir``; returns the files written."""
    p, r = metrics["policy"], metrics["reward"]
    files = [
        plot_slices("policy", p, out_dir / "policy_slices.png"),
        plot_slices("reward", r, out_dir / "reward_slices.png"),
        plot_rates(p, out_dir / "win_rates.png"),
    ]
    pa, ra = p["pref_accuracy"], r["pairwise_accuracy"]
    lines = [
        "# Flywheel evaluation: challenger vs champion",
        "",
        f"Champion versions: {metrics['champion']}; judge: {metrics['judge']['name']} v{metrics['judge']['version']}.",
        "",
        "| metric | champion | challenger | difference | 95% interval | n |",
        "|---|---|---|---|---|---|",
        f"| policy preference accuracy (implicit reward) | {_fmt(pa['champion'])} | {_fmt(pa['challenger'])} | "
        f"{_fmt(pa['diff'])} | {_ci(pa)} | {pa['n']} |",
        f"| reward pairwise accuracy | {_fmt(ra['champion'])} | {_fmt(ra['challenger'])} | {_fmt(ra['diff'])} | "
        f"{_ci(ra)} | {ra['n']} |",
    ]
    golden = "golden set (fixed, never trained on)"
    pooled = "held out: test split + golden set (the default gate's primary)"
    for label, m in (
        (f"policy, {golden}", p.get("golden_pref_accuracy")),
        (f"reward, {golden}", r.get("golden_pairwise_accuracy")),
        (f"policy, {pooled}", p.get("heldout_pref_accuracy")),
        (f"reward, {pooled}", r.get("heldout_pairwise_accuracy")),
    ):
        if m:
            lines.append(
                f"| {label} | {_fmt(m['champion'])} | {_fmt(m['challenger'])} | {_fmt(m['diff'])} | {_ci(m)} | "
                f"{m['n']} |"
            )
    for k in ("benign_refusal_rate", "behaviour_pass_rate", "harmlessness_score"):
        m = p[k]
        lines.append(
            f"| {k.replace('_', ' ')} | {_fmt(m['champion'])} | {_fmt(m['challenger'])} | {_fmt(m['diff'])} "
            f"| {_ci(m)} | {m['n']} |"
        )
    for k in ("judged_win_rate", "harmless_win_rate"):
        m = p[k]
        lines.append(f"| {k.replace('_', ' ')} (challenger wins) | | {_fmt(m['value'])} | | {_ci(m)} | {m['n']} |")
    lines += ["", f"Pick-the-shorter-answer baseline on the policy test pairs: {_fmt(p['length_baseline'])}.", ""]
    if p.get("gain_only_where_shorter_wins"):
        lines += [
            "**Warning: the policy's gain is found only where the shorter answer wins: "
            "a length bias, not necessarily a better model.**",
            "",
        ]
    lines += [
        "## Slices",
        "",
        "| model | slice | n | champion | challenger | difference | 95% interval | length baseline |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, m in (("policy", p), ("reward", r)):
        for name, s in m["slices"].items():
            lines.append(
                f"| {kind} | {name} | {s['n']} | {_fmt(s['champion'])} | {_fmt(s['challenger'])} | "
                f"{_fmt(s['diff'])} | {_ci(s)} | {_fmt(s['length_baseline'])} |"
            )
    lines += [
        "",
        f"Latency (ms per generated token): {p['latency_ms_per_token']}; size (MB): {metrics['size_mb']}.",
        "",
        "![slices](policy_slices.png)",
        "",
        "![reward slices](reward_slices.png)",
        "",
        "![win rates](win_rates.png)",
        "",
        "## Sample answers (shipped suites only)",
        "",
        "Held-out prompts are users' text: they are never quoted here (nor in metrics/evaluate.json).",
        "",
    ]
    lines += sample_lines(p.get("samples", []))
    md = out_dir / "report.md"
    md.write_text("\n".join(lines) + "\n")
    return [md, *files]
