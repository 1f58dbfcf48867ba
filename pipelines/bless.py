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

from flywheel.evaluation.judge import JUDGED_METRICS
from flywheel.params import BlessParams, GateParams, MetricRule, ModelGate
from flywheel.settings import Settings
from flywheel.stages import StageFailed

# What this step's functions import, imported ahead by a DAG task's warm runner while DVC starts
# (flywheel/orchestration.py stage_runner): a module missing here is imported by the stage itself.
PRELOAD = ("mlflow",)


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
    lo, hi = (m.get("ci") or [None, None])[:2]
    if rule.no_regression_beyond_noise and lo is not None and hi is not None:
        worse = hi < 0 if rule.direction == "higher" else lo > 0
        if worse:
            reasons.append(
                f"{name}: worse than the champion beyond noise (difference {m.get('diff', 0):+.4f}, 95% interval "
                f"[{lo:+.4f}, {hi:+.4f}] on {n} items)"
            )
    if champ is not None:
        regression = (champ - value) if rule.direction == "higher" else (value - champ)
        if rule.max_regression_abs is not None and regression > rule.max_regression_abs:
            reasons.append(
                f"{name}: regresses by {regression:.4f} against the champion ({champ:.4f} -> "
                f"{value:.4f}), over the allowed {rule.max_regression_abs}"
            )
        if rule.max_regression_rel is not None and abs(champ) > 0 and regression / abs(champ) > rule.max_regression_rel:
            reasons.append(
                f"{name}: regresses by {100 * regression / abs(champ):.1f}% against the champion, over "
                f"the allowed {100 * rule.max_regression_rel:.1f}%"
            )
    return reasons


def passed_line(name: str, m: dict, rule: MetricRule) -> str:
    """What a rule checked and the value it saw, e.g. ``heldout_pref_accuracy: 0.6040 >= 0.5; no regression
    beyond noise (+0.0500 [+0.0100, +0.0900])``: a pass line that names only the metric reads as a contradiction
    beside a failed primary of the same name."""
    value = m.get("challenger", m.get("value"))
    checks = []
    if rule.min_value is not None:
        checks.append(f"{value:.4f} >= {rule.min_value}")
    if rule.max_value is not None:
        checks.append(f"{value:.4f} <= {rule.max_value}")
    lo, hi = (m.get("ci") or [None, None])[:2]
    if rule.no_regression_beyond_noise and lo is not None:
        checks.append(f"no regression beyond noise ({m.get('diff', 0):+.4f} [{lo:+.4f}, {hi:+.4f}])")
    limits = [f"{x}" for x in (rule.max_regression_abs,) if x is not None]
    limits += [f"{100 * rule.max_regression_rel:.1f}%" for _ in [0] if rule.max_regression_rel is not None]
    if limits and m.get("champion") is not None:
        checks.append(f"regression vs champion within {' and '.join(limits)} ({m['champion']:.4f} -> {value:.4f})")
    return f"{name} (rule): " + ("; ".join(checks) or "checked")


def _not_applied(m: dict, rule: MetricRule) -> str | None:
    """Why ``rule`` cannot be applied to ``m`` (None: it can)."""
    if m.get("not_applied"):
        return str(m["not_applied"])
    n = m.get("n", 0) or 0
    if n < rule.min_n:
        return f"{n} items scored, fewer than the rule's min_n {rule.min_n}"
    return None


def judge_model(metrics: dict, gate: ModelGate) -> dict:
    """Verdict for one model: ``{"blessed": bool, "reasons": [...], "passed": [...], "not_applied": [...],
    "primary": {"metric", "diff", "ci", "n", "beyond_noise"} or None when not measured}``."""
    reasons, passed, not_applied = [], [], []
    primary, summary = _lookup(metrics, gate.primary), None
    measured = primary is not None and primary.get("ci", [None])[0] is not None
    if not measured and gate.fallback_primary:  # e.g. no test pairs: the unpaired (KTO) examples decide, as strictly
        fallback = _lookup(metrics, gate.fallback_primary)
        if fallback is not None and fallback.get("ci", [None])[0] is not None:
            not_applied.append(
                f"{gate.primary}: not measured; the gate's fallback_primary {gate.fallback_primary} decides"
            )
            gate = gate.model_copy(update={"primary": gate.fallback_primary})
            primary = fallback
    if primary is None or primary.get("ci", [None])[0] is None:
        reasons.append(f"{gate.primary}: not measured")
    else:
        lo, hi = primary["ci"]
        summary = {
            "metric": gate.primary,
            "diff": primary["diff"],
            "ci": [lo, hi],
            "n": primary["n"],
            "beyond_noise": lo > gate.primary_min_ci_lower,
        }  # the one-line verdicts of status/release
        line = (
            f"{gate.primary}: challenger {primary['challenger']:.4f} vs champion {primary['champion']:.4f}, "
            f"difference {primary['diff']:+.4f}, 95% interval [{lo:+.4f}, {hi:+.4f}] on {primary['n']} items"
        )
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
            passed.append(passed_line(name, m, rule))
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
    return {
        "blessed": not reasons,
        "reasons": reasons,
        "passed": passed,
        "not_applied": not_applied,
        "primary": summary,
    }


def bless(metrics: dict, gate: GateParams) -> dict:
    """The verdict for every model evaluated; a model that failed to evaluate is never blessed."""
    verdict = {}
    judge = metrics.get("judge") or {}
    if judge.get("status") != "judge" and isinstance(metrics.get("policy"), dict):
        why = f"no judge: {judge.get('reason') or 'the evaluation recorded no judge able to discriminate'}"
        metrics = {
            **metrics,
            "policy": {
                **metrics["policy"],
                **{
                    k: {**v, "not_applied": v.get("not_applied") or why}
                    for k, v in metrics["policy"].items()
                    if k in JUDGED_METRICS and isinstance(v, dict)
                },
            },
        }
    for kind in ("policy", "reward"):
        if kind not in metrics:
            verdict[kind] = {"blessed": False, "reasons": [f"{kind}: no evaluation"], "passed": [], "not_applied": []}
        else:
            verdict[kind] = judge_model(metrics[kind], getattr(gate, kind))
    return verdict


class GateError(ValueError):
    """A gate asked for by name (``--allow-gate``) that params.yaml does not define (``bless.gate`` itself and the
    rules are checked when params.yaml is loaded)."""


@dataclass(frozen=True)
class GateInForce:
    """The gate params.yaml's ``bless.gate`` names: its name, typed rules and their hash."""

    name: str
    rules: GateParams
    sha256: str


def gate_sha256(rules: GateParams) -> str:
    """A hash of the gate's rules (defaults included): a blessing is valid only under the same rules."""
    return hashlib.sha256(json.dumps(rules.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def gate_in_force(section: BlessParams, name: str | None = None) -> GateInForce:
    """The gate of params.yaml's ``bless`` section (``name``: another gate it defines, e.g. ``--allow-gate``)."""
    name = name or section.gate
    if name not in section.gates:
        raise GateError(f"params.yaml bless.gates: unknown gate {name!r}; defined: {', '.join(section.gates)}")
    rules = section.gates[name]
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
    from flywheel import verdicts

    lines = [f"# Gate verdict ({gate_name} gate)", ""]
    if verdict.get("gate_sha256"):
        lines += [
            f"Gate `{gate_name}`, rules sha256 `{verdict['gate_sha256'][:16]}`; "
            f"judge: {verdict.get('judge', 'none')}"
            + (f" ({verdict['judge_reason']})" if verdict.get("judge_reason") else "")
            + (f"; evaluated on the `{verdict['profile']}` profile" if verdict.get("profile") else "")
            + ".",
            "",
        ]
    for kind in ("policy", "reward"):
        v = verdict.get(kind, {})
        figure = verdicts.figure(v.get("primary"))
        metric = (v.get("primary") or {}).get("metric", "")
        head = f"## {kind}: {'BLESSED' if v.get('blessed') else 'NOT BLESSED'}"
        lines += [head + (f" ({metric} {figure})" if figure else ""), ""]
        if v.get("reasons"):
            lines += ["Failed:", ""] + [f"- {r}" for r in v["reasons"]] + [""]
        if v.get("passed"):
            lines += ["Passed:", ""] + [f"- {r}" for r in v["passed"]] + [""]
        if v.get("not_applied"):
            lines += ["Not applied:", ""] + [f"- {r}" for r in v["not_applied"]] + [""]
    lines.append("Only the checks listed as passes were applied; a check \"not applied\" was not counted as a pass.")
    lines += ["", "Evaluation details: [evaluate/report.md](evaluate/report.md)"]
    return "\n".join(lines) + "\n"


def main(metrics_file: Path, gate: GateParams, out: Path, gate_name: str = "default") -> dict:
    """Judge the evaluation in ``metrics_file``; writes ``out`` (JSON) and the same name with ``.md``, with the
    gate in force (name, rules, their hash) and the judge recorded."""
    metrics = json.loads(metrics_file.read_text())
    verdict = bless(metrics, gate)
    judge = metrics.get("judge") or {}
    verdict.update(
        gate=gate_name,
        gate_sha256=gate_sha256(gate),
        gate_rules=gate.model_dump(mode="json"),
        judge=judge_label(judge),
        judge_reason=judge.get("reason", "the evaluation recorded no judge"),
        profile=metrics.get("profile", ""),
        candidates=metrics.get("candidates", {}),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(verdict, indent=2))
    out.with_suffix(".md").write_text(to_markdown(verdict, gate_name))
    return verdict


def stage(settings: Settings, params: BlessParams, *, metrics: Path, out: Path) -> str:
    """The gate in force (``bless.gate``) on the evaluation in ``metrics``: the verdict to ``out`` and MLflow."""
    import mlflow

    from flywheel import tracking, verdicts

    try:
        gate = gate_in_force(params)
    except GateError as exc:
        raise StageFailed(str(exc)) from exc
    with tracking.stage_run(settings, "bless"):
        verdict = main(metrics, gate.rules, out, gate.name)
        mlflow.log_artifact(str(out))
        mlflow.log_artifact(str(out.with_suffix(".md")))
        mlflow.log_metrics({f"{k}_blessed": float(verdict[k]["blessed"]) for k in ("policy", "reward")})
        mlflow.set_tags({"gate": gate.name, "gate_sha256": gate.sha256, "judge": verdict["judge"]})
    report = out.with_suffix(".md")
    report = report.relative_to(settings.root) if report.is_relative_to(settings.root) else report
    models = ", ".join(
        " ".join(
            x
            for x in (
                kind,
                "blessed" if verdict[kind]["blessed"] else "not blessed",
                verdicts.figure(verdict[kind].get("primary")),
            )
            if x
        )
        for kind in ("policy", "reward")
    )
    return f"bless ({gate.name} gate, judge: {verdict['judge']}): {models}; the reasons: {report}"
