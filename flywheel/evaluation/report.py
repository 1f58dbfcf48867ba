"""The evaluation report: Markdown with plots (accuracy by slice beside the length-only baseline,
win rates with intervals), written beside the JSON metrics and logged to MLflow."""

from __future__ import annotations

import itertools
from pathlib import Path


def headline_metrics(metrics: dict) -> dict[str, float]:
    """The primary metrics' numbers for MLflow, which takes numbers only: a metric not measured is left out."""
    out = {}
    names = (
        ("pref_accuracy", "golden_pref_accuracy", "heldout_pref_accuracy"),
        ("pairwise_accuracy", "golden_pairwise_accuracy", "heldout_pairwise_accuracy"),
    )
    for kind, keys in zip(("policy", "reward"), names):
        for key, part in itertools.product(keys, ("challenger", "champion", "diff")):
            if key in metrics[kind] and metrics[kind][key].get(part) is not None:
                out[f"{kind}.{key}.{part}"] = metrics[kind][key][part]
    return out


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
    for dx, key, label, color in (
        (-w, "champion", "champion", None),
        (0, "challenger", "challenger", None),
        (w, "length_baseline", "pick-the-shorter baseline", "0.7"),
    ):
        values = [slices[n][key] or 0.0 for n in names]
        bars = ax.bar(x + dx, values, w, label=label, color=color, edgecolor="0.3", linewidth=0.4)
        ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)  # a 0.00 bar is a label on the axis, not a gap
    ax.axhline(0.5, color="k", lw=0.6, ls=":")
    ax.set_xticks(x, [f"{n}\n(n={slices[n]['n']})" for n in names], fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{kind}: held-out preference accuracy by slice")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3, frameon=False)  # off the bars
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
    fig, ax = plt.subplots(figsize=(7, 2.8))
    for i, (_name, m) in enumerate(rows):
        lo, hi = m["ci"]
        ax.errorbar([m["value"]], [i], xerr=[[m["value"] - lo], [hi - m["value"]]], fmt="o", capsize=4)
    ax.axvline(0.5, color="k", lw=0.6, ls=":")
    ax.set_yticks(range(len(rows)), [f"{n} (n={m['n']})" for n, m in rows])
    ax.set_xlim(0, 1)
    ax.set_title("challenger vs champion: win rate, 95% interval\n(judged by the champion reward model)", fontsize=9)
    if not rows:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def cut(text: str, n: int = 300) -> str:
    """``text`` cut at a word boundary before ``n`` characters, with an ellipsis when cut."""
    text = " ".join(str(text).split())
    if len(text) <= n:
        return text
    head = text[:n].rsplit(" ", 1)[0]
    return (head if len(head) > n // 2 else text[:n]) + " …"


def versions(champion: dict) -> str:
    """``policy v3, reward v2`` from ``{"policy": "3", "reward": "2"}``."""
    return ", ".join(f"{k} v{v}" for k, v in champion.items())


def figures(values: dict, unit: str = "") -> str:
    """``champion 12.3 ms, challenger 11.9 ms`` from a dict of numbers (3 significant decimals at most)."""
    out = []
    for k, v in values.items():
        num = "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))
        out.append(f"{k.replace('_', ' ')} {num}{unit}")
    return ", ".join(out)


def at_a_glance(metrics: dict) -> list[str]:
    """One line per model: the held-out difference the default gate decides on, and whether it is beyond noise.
    The gate's verdict itself (every rule) is reports/blessing.md, written after this report by ``bless``."""
    lines = []
    for kind, keys in (
        ("policy", ("heldout_pref_accuracy", "pref_accuracy")),
        ("reward", ("heldout_pairwise_accuracy", "pairwise_accuracy")),
    ):
        key = next((k for k in keys if (metrics[kind].get(k) or {}).get("diff") is not None), None)
        m = metrics[kind][key] if key else None
        if m is None:
            lines.append(f"- **{kind}**: not measured (no held-out pairs)")
            continue
        lo, hi = m["ci"]
        word = "better beyond noise" if lo > 0 else "worse beyond noise" if hi < 0 else "within noise"
        lines.append(
            f"- **{kind}** ({key}, n={m['n']}): {m['champion']:.3f} -> {m['challenger']:.3f}, "
            f"{m['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]: **{word}**"
        )
    return lines


def sample_lines(samples: list[dict], n: int = 5) -> list[str]:
    """Markdown for the example answers drawn from a shipped suite; anything else (a held-out sample written
    by an older evaluation, without ``suite``) is left out."""
    lines = []
    for s in [x for x in samples if isinstance(x, dict) and x.get("suite")][:n]:
        refused = {k: " (refused)" if s.get(f"{k}_refused") else "" for k in ("champion", "challenger")}
        lines += [
            f"**Instruction ({s['suite']}):** {cut(s['prompt'])}",
            "",
            f"- champion{refused['champion']}: {cut(s['champion'])}",
            f"- challenger{refused['challenger']}: {cut(s['challenger'])}",
            "",
        ]
    return lines


def to_html(markdown_text: str, out_dir: Path, title: str) -> str:
    """The report as one self-contained HTML page (plots inlined): the MLflow artifact viewer renders HTML but
    shows a Markdown file's image links as text."""
    import base64
    import html
    import re

    from markdown_it import MarkdownIt  # rich's Markdown parser: no extra dependency

    def inline(match: re.Match) -> str:
        f = out_dir / match[2]
        if not f.is_file():
            return match[0]
        return f"![{match[1]}](data:image/png;base64,{base64.b64encode(f.read_bytes()).decode()})"

    text = re.sub(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)", inline, markdown_text)
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(text)
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:1em auto;padding:0 1em;line-height:1.4}"
        "table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;padding:.2em .5em}"
        "img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>{body}</body></html>\n"
    )


def write(metrics: dict, out_dir: Path) -> list[Path]:
    """report.md, report.html (the same, plots inlined) and the plots in ``out_dir``; returns the files."""
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
        *at_a_glance(metrics),
        "",
        "The gate's verdict, rule by rule: `reports/blessing.md` (the `bless` stage, after this report).",
        "",
        f"Champion: {versions(metrics['champion'])}; judge: {metrics['judge']['name']} v{metrics['judge']['version']}.",
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
        lo, hi = m.get("ci") or [None, None]
        ci = "-" if lo is None else f"[{lo:.3f}, {hi:.3f}]"  # of the rate itself, not of a difference
        lines.append(f"| {k.replace('_', ' ')} (challenger wins) | | {_fmt(m['value'])} | | {ci} | {m['n']} |")
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
        f"Latency (ms per generated token): {figures(p['latency_ms_per_token'])}; "
        f"size (MB): {figures(metrics['size_mb'])}.",
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
    page = out_dir / "report.html"
    page.write_text(to_html(md.read_text(), out_dir, "Flywheel evaluation"))
    return [md, page, *files]
