"""The ``bless`` stage: the gate, as in TFX's Evaluator.

For each model (policy, reward) a primary metric must improve beyond noise: the lower bound of the
paired-bootstrap interval of (challenger − champion) must be above ``primary_min_ci_lower``. Every
other metric has a value threshold and a change threshold against the champion (absolute and
relative, with a direction), overall and per slice. The verdict and every reason are written down.

A check that cannot be applied (a metric the evaluation marked ``not_applied``, e.g. judged metrics when the
judge cannot tell answers apart, or fewer items than the rule's ``min_n``) is never counted as passed: it is
listed under ``not_applied`` with its reason, and blocks the blessing only when the rule says ``required``.
The blessing records the gate in force (name and rules' hash) and the judge, so that ``flywheel release``
can refuse a blessing from any other gate.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


# the policy metrics scored by the judge (the champion reward model); they count only when the evaluation found
# that judge able to tell chosen from rejected answers (metrics["judge"]["status"] == "judge")
JUDGED_METRICS = ("judged_win_rate", "harmless_win_rate", "harmlessness_score")


class MetricRule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    direction: Literal["higher", "lower"] = "higher"
    min_value: float | None = None
    max_value: float | None = None
    max_regression_abs: float | None = None   # how much worse than the champion, in the metric's units
    max_regression_rel: float | None = None   # ... as a fraction of the champion's value
    min_n: int = 0                            # gate only when at least this many items were scored
    required: bool = False                    # True: a check that cannot be applied blocks the blessing


class ModelGate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    primary: str
    primary_min_ci_lower: float = 0.0
    metrics: dict[str, MetricRule] = Field(default_factory=dict)
    slice_rule: MetricRule | None = None
    # slice families the slice rule gates; the others (e.g. chosen_shorter, where a model leaning either way
    # on length must lose on one side) are reported beside the length baseline, not gated
    gated_slices: list[str] = Field(default_factory=lambda: ["feedback_type", "turns"])
    block_length_only_gain: bool = False


class GateParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    policy: ModelGate
    reward: ModelGate


def _lookup(metrics: dict, name: str) -> dict | None:
    value = metrics.get(name)
    return value if isinstance(value, dict) else None


def check_rule(name: str, m: dict, rule: MetricRule) -> list[str]:
    """Reasons ``m`` (with ``challenger``/``champion`` or ``value``, and ``n``) breaks ``rule``; empty if none."""
    n = m.get("n", 0) or 0
    if n < rule.min_n:
        return []
    value = m.get("challenger", m.get("value"))
    champ = m.get("champion")
    reasons = []
    if value is None:
        return [f"{name}: no value measured"]
    if rule.min_value is not None and value < rule.min_value:
        reasons.append(f"{name}: {value:.4f} is below the minimum {rule.min_value}")
    if rule.max_value is not None and value > rule.max_value:
        reasons.append(f"{name}: {value:.4f} is above the maximum {rule.max_value}")
    if champ is not None:
        regression = (champ - value) if rule.direction == "higher" else (value - champ)
        if rule.max_regression_abs is not None and regression > rule.max_regression_abs:
            reasons.append(f"{name}: regresses by {regression:.4f} against the champion ({champ:.4f} -> "
                           f"{value:.4f}), over the allowed {rule.max_regression_abs}")
        if rule.max_regression_rel is not None and abs(champ) > 0 and regression / abs(champ) > rule.max_regression_rel:
            reasons.append(f"{name}: regresses by {100 * regression / abs(champ):.1f}% against the champion, over "
                           f"the allowed {100 * rule.max_regression_rel:.1f}%")
    return reasons


def _not_applied(m: dict, rule: MetricRule) -> str | None:
    """Why ``rule`` cannot be applied to ``m`` (None: it can)."""
    if m.get("not_applied"):
        return str(m["not_applied"])
    n = m.get("n", 0) or 0
    if n < rule.min_n:
        return f"{n} items scored, fewer than the rule's min_n {rule.min_n}"
    return None


def judge_model(metrics: dict, gate: ModelGate) -> dict:
    """Verdict for one model: ``{"blessed": bool, "reasons": [...], "passed": [...], "not_applied": [...]}``."""
    reasons, passed, not_applied = [], [], []
    primary = _lookup(metrics, gate.primary)
    if primary is None or primary.get("ci", [None])[0] is None:
        reasons.append(f"{gate.primary}: not measured")
    else:
        lo, hi = primary["ci"]
        line = (f"{gate.primary}: challenger {primary['challenger']:.4f} vs champion {primary['champion']:.4f}, "
                f"difference {primary['diff']:+.4f}, 95% interval [{lo:+.4f}, {hi:+.4f}] on {primary['n']} items")
        if lo > gate.primary_min_ci_lower:
            passed.append(line + f" - better beyond noise (lower bound > {gate.primary_min_ci_lower})")
        else:
            reasons.append(line + f" - not better beyond noise (lower bound <= {gate.primary_min_ci_lower})")
    for name, rule in gate.metrics.items():
        m = _lookup(metrics, name)
        if m is None:
            reasons.append(f"{name}: not measured")
            continue
        why = _not_applied(m, rule)
        if why is not None:
            (reasons if rule.required else not_applied).append(f"{name}: not applied: {why}")
            continue
        bad = check_rule(name, m, rule)
        reasons += bad
        if not bad:
            passed.append(f"{name}: ok")
    if gate.slice_rule is not None:
        slices = metrics.get("slices") or {}
        for family in gate.gated_slices:
            if not any(sname.split("=", 1)[0] == family for sname in slices):
                not_applied.append(f"{gate.primary}[{family}=*]: not applied: the evaluation has no {family} slice")
        for sname, m in slices.items():
            if sname.split("=", 1)[0] not in gate.gated_slices:
                continue
            bad = check_rule(f"{gate.primary}[{sname}]", m, gate.slice_rule)
            reasons += bad
    if gate.block_length_only_gain and metrics.get("gain_only_where_shorter_wins"):
        reasons.append("the gain is found only where the shorter answer wins (a length bias, not a better model)")
    return {"blessed": not reasons, "reasons": reasons, "passed": passed, "not_applied": not_applied}


def bless(metrics: dict, gate: GateParams) -> dict:
    """The verdict for every model evaluated; a model that failed to evaluate is never blessed."""
    verdict = {}
    judge = metrics.get("judge") or {}
    if judge.get("status") != "judge" and isinstance(metrics.get("policy"), dict):
        why = f"no judge: {judge.get('reason') or 'the evaluation recorded no judge able to discriminate'}"
        metrics = {**metrics, "policy": {**metrics["policy"], **{
            k: {**v, "not_applied": v.get("not_applied") or why}
            for k, v in metrics["policy"].items() if k in JUDGED_METRICS and isinstance(v, dict)}}}
    for kind in ("policy", "reward"):
        if kind not in metrics:
            verdict[kind] = {"blessed": False, "reasons": [f"{kind}: no evaluation"], "passed": [], "not_applied": []}
        else:
            verdict[kind] = judge_model(metrics[kind], getattr(gate, kind))
    return verdict


class GateError(ValueError):
    """params.yaml ``bless`` names no gate, or a gate's rules are malformed; the message names the key."""


@dataclass(frozen=True)
class GateInForce:
    """The gate params.yaml's ``bless.gate`` names: its name, typed rules and their hash."""

    name: str
    rules: GateParams
    sha256: str


def gate_sha256(rules: GateParams) -> str:
    """A hash of the gate's rules (defaults included): a blessing is valid only under the same rules."""
    return hashlib.sha256(json.dumps(rules.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def gate_in_force(section: dict, name: str | None = None) -> GateInForce:
    """The gate of params.yaml's ``bless`` section (``name``: another gate it defines, e.g. ``--allow-gate``)."""
    from pydantic import ValidationError

    name = name or section.get("gate", "default")
    gates = section.get("gates") or {}
    if name not in gates:
        raise GateError(f"params.yaml bless.gate: unknown gate {name!r}; defined: {', '.join(gates) or 'none'}")
    try:
        rules = GateParams.model_validate(gates[name])
    except ValidationError as exc:
        raise GateError(f"params.yaml bless.gates.{name}: {exc}") from exc
    return GateInForce(name, rules, gate_sha256(rules))


def judge_label(judge: dict | None) -> str:
    """Which reward model judged the policy's answers: ``NAME vVERSION (HASH)``, or ``none`` when the
    evaluation found it cannot discriminate (or recorded no judge)."""
    if not judge or judge.get("status") != "judge":
        return "none"
    digest = (judge.get("content_hash") or "")[:12]
    return f"{judge.get('name')} v{judge.get('version')}" + (f" ({digest})" if digest else "")


def to_markdown(verdict: dict, gate_name: str) -> str:
    """The verdict as a readable page (beside the evaluation report)."""
    lines = [f"# Gate verdict ({gate_name} gate)", ""]
    if verdict.get("gate_sha256"):
        lines += [f"Gate `{gate_name}`, rules sha256 `{verdict['gate_sha256'][:16]}`; "
                  f"judge: {verdict.get('judge', 'none')}"
                  + (f" ({verdict['judge_reason']})" if verdict.get("judge_reason") else "")
                  + (f"; evaluated on the `{verdict['profile']}` profile" if verdict.get("profile") else "") + ".", ""]
    for kind in ("policy", "reward"):
        v = verdict.get(kind, {})
        lines += [f"## {kind}: {'BLESSED' if v.get('blessed') else 'NOT BLESSED'}", ""]
        lines += [f"- fails: {r}" for r in v.get("reasons", [])]
        lines += [f"- passes: {r}" for r in v.get("passed", [])]
        lines += [f"- {r}" for r in v.get("not_applied", [])]
        lines.append("")
    lines.append("Only the checks listed as passes were applied; a check \"not applied\" was not counted as a pass.")
    lines += ["", "Evaluation details: [evaluate/report.md](evaluate/report.md)"]
    return "\n".join(lines) + "\n"


def main(metrics_file: Path, gate: GateParams, out: Path, gate_name: str = "default") -> dict:
    """Judge the evaluation in ``metrics_file``; writes ``out`` (JSON) and the same name with ``.md``, with the
    gate in force (name, rules, their hash) and the judge recorded."""
    metrics = json.loads(metrics_file.read_text())
    verdict = bless(metrics, gate)
    judge = metrics.get("judge") or {}
    verdict.update(gate=gate_name, gate_sha256=gate_sha256(gate), gate_rules=gate.model_dump(mode="json"),
                   judge=judge_label(judge), judge_reason=judge.get("reason", "the evaluation recorded no judge"),
                   profile=metrics.get("profile", ""), candidates=metrics.get("candidates", {}))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(verdict, indent=2))
    out.with_suffix(".md").write_text(to_markdown(verdict, gate_name))
    return verdict
