"""One-line verdicts of model versions, for ``flywheel status`` and ``flywheel release``: what became of a version
(promoted, refused, held, rolled back) and the gate's primary figure, e.g.
``refused: +0.020 [-0.010, +0.049], not beyond noise``. The full reasons stay in the registry tags and the
blessing (``--verbose``/``--json`` print them)."""

from __future__ import annotations

import json
import re

# the primary line pipelines/bless.py writes; read only for versions tagged before the figure was kept apart
_PRIMARY_LINE = re.compile(r"difference ([+-]\d+\.\d+), 95% interval \[([+-]\d+\.\d+), ([+-]\d+\.\d+)\]")


def primary_from_lines(lines: list[str]) -> dict | None:
    """The primary figure (``diff``, ``ci``, ``beyond_noise``) found in the gate's reason lines, or None."""
    for line in lines:
        m = _PRIMARY_LINE.search(line)
        if m:
            return {
                "diff": float(m[1]),
                "ci": [float(m[2]), float(m[3])],
                "beyond_noise": "not better beyond noise" not in line,
            }
    return None


def figure(primary: dict | None) -> str:
    """``+0.119 [+0.037, +0.201]``: the primary metric's challenger - champion difference and its 95% interval."""
    if not primary or primary.get("diff") is None:
        return ""
    lo, hi = primary["ci"]
    return f"{primary['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def short_reason(reason: str) -> str:
    """A reason cut before its details (the figures in parentheses, the advice after a dash)."""
    cut = min((i for i in (reason.find(" ("), reason.find(" - "), reason.find("; ")) if i > 0), default=len(reason))
    return reason[:cut]


def _line(word: str, primary: dict | None, reasons: list[str]) -> str:
    """``WORD: FIGURE, first cause (+N more)``; the primary line itself counts as "not beyond noise"."""
    causes = ["not beyond noise"] if primary and not primary.get("beyond_noise", True) else []
    causes += [short_reason(r) for r in reasons if not _PRIMARY_LINE.search(r)]
    head = ", ".join(x for x in (figure(primary), causes[0] if causes else "") if x)
    more = f" (+{len(causes) - 1} more)" if len(causes) > 1 else ""
    return f"{word}: {head}{more}" if head else word


def _json_list(text: str | None) -> list[str]:
    try:
        value = json.loads(text or "[]")
    except ValueError:
        return [text or ""]
    return [str(v) for v in value] if isinstance(value, list) else []


def of_version(tags: dict[str, str]) -> str:
    """The verdict of a registered version, from its tags (flywheel/release.py writes them)."""
    if tags.get("origin") == "base":
        return "base model"
    reasons = _json_list(tags.get("gate_reasons"))
    try:
        primary = json.loads(tags.get("gate_primary") or "null")
    except ValueError:
        primary = None
    primary = primary or primary_from_lines(reasons)
    if tags.get("rolled_back"):  # "<when>, champion moved back to vN"
        when, _, what = tags["rolled_back"].partition(", ")
        return _line("rolled back", primary, [f"{what} ({when})" if what else when])
    if tags.get("refused"):
        return _line("refused", primary, tags["refused"].split("; "))
    if tags.get("awaiting"):
        return _line("held", primary, [tags["awaiting"]])
    if tags.get("blessed") == "true" and tags.get("smoke_check") == "passed":
        return _line("promoted" if tags.get("promoted_at") else "blessed", primary, [])
    if tags.get("blessed") == "false":
        return _line("not blessed", primary, reasons)
    return "registered"


def of_outcome(promoted: bool, blessed: bool, smoke_ok: bool, reasons: list[str], verdict: dict | None) -> str:
    """The verdict of one model in a release (flywheel.release.Outcome) and its blessing ``verdict``."""
    verdict = verdict or {}
    primary = verdict.get("primary") or primary_from_lines(verdict.get("reasons", []) + verdict.get("passed", []))
    if promoted:
        return _line("promoted", primary, [])
    if reasons == ["already the champion"]:
        return "already the champion"
    if blessed and smoke_ok and reasons and reasons[-1].startswith("not promoted: ") and "`challenger`" in reasons[-1]:
        return _line("held", primary, reasons)
    return _line("refused", primary, reasons)


def of_blessing(verdict: dict) -> str:
    """The gate's verdict on one model (a ``reports/blessing.json`` entry), e.g.
    ``not blessed: +0.020 [-0.010, +0.049], not beyond noise``."""
    primary = verdict.get("primary") or primary_from_lines(verdict.get("reasons", []) + verdict.get("passed", []))
    if verdict.get("blessed"):
        return _line("blessed", primary, [])
    return _line("not blessed", primary, verdict.get("reasons") or ["no verdict"])
