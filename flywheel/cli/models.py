"""``flywheel`` model commands: bootstrap, release, promote, rollback, status (the registry), eval-reward,
eval-policy.

``status`` and ``release`` print one line per version, at most the terminal's width (80 columns in a log): the
model, the version, its aliases and a one-line verdict (flywheel/verdicts.py); ``--verbose`` adds every reason,
``--json`` prints everything."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from flywheel.cli._common import aligned, console, fail, fit, gate, print_record, registry, settings, width, wrapped
from flywheel.settings import Settings

app = typer.Typer()

_ALLOW_GATE_HELP = "also accept a version blessed by this gate of params.yaml (logged)"
_VERBOSE_HELP = "every reason under each line"


def _kind(model: str) -> str:
    from flywheel.registry import MODELS

    if model not in MODELS:
        fail("--model must be policy or reward")
    return model


@app.command()
def bootstrap(base: Path = typer.Option(Path("models/base"), help="the base_models stage's output")) -> None:
    """On an empty registry, register the base models as version 1 and make them champion."""
    from flywheel import release as rel

    s = settings()
    if not (s.root / base / "policy").exists():
        fail(f"{base} has no base models yet: run `dvc repro base_models` first")
    done = rel.bootstrap(registry(s), s.root / base)
    console.print("bootstrap: " + ("; ".join(done) if done else "registry already has champions"))


def _accepted_gates(s: Settings, allow_gate: str | None) -> dict[str, str]:
    """Gate name -> rules' sha256 whose blessings count: params.yaml's bless.gate, plus an ``--allow-gate``
    (said out loud: it is how a test accepts another gate, never how production runs)."""
    in_force = gate(s)
    gates = {in_force.name: in_force.sha256}
    if allow_gate and allow_gate != in_force.name:
        gates[allow_gate] = gate(s, allow_gate).sha256
        console.print(
            f"warning: --allow-gate {allow_gate}: accepting the {allow_gate!r} gate besides params.yaml's "
            f"{in_force.name!r} (tagged gate_override on the version)",
            style="yellow",
            markup=False,
        )
    return gates


@app.command()
def release(
    challenger: Path = typer.Option(Path("models/challenger")),
    blessing: Path = typer.Option(Path("reports/blessing.json")),
    base: Path = typer.Option(Path("models/base")),
    as_json: bool = typer.Option(False, "--json"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=_VERBOSE_HELP),
    approved_by: str | None = typer.Option(None, "--approved-by", help="who approved the release (tagged)"),
    rejected_by: str | None = typer.Option(
        None, "--rejected-by", help="who rejected it: register and check, never promote (tagged)"
    ),
    hold: str | None = typer.Option(
        None,
        "--hold",
        help="why not promote now: a blessed, checked version "
        "becomes `challenger` (tagged with this) awaiting `flywheel promote`",
    ),
    allow_gate: str | None = typer.Option(
        None,
        "--allow-gate",
        metavar="NAME",
        help="also accept a blessing from this gate of params.yaml (tests only; logged and tagged on the version)",
    ),
) -> None:
    """Register the challengers, smoke-check them, and promote those the gate in force (params.yaml
    bless.gate) blessed."""
    from flywheel import release as rel
    from flywheel import verdicts
    from flywheel.registry import MODELS, RegistryError

    s = settings()
    gates = _accepted_gates(s, allow_gate)
    for path in (challenger, blessing):
        if not (s.root / path).exists():
            fail(f"{path} not found: run `dvc repro` first")
    reg = registry(s)
    rel.bootstrap(reg, s.root / base)
    verdict = json.loads((s.root / blessing).read_text())
    lineage = rel.lineage(s)
    if approved_by and rejected_by:
        fail("--approved-by and --rejected-by exclude each other")
    if approved_by or rejected_by:
        lineage.update(approval="approved" if approved_by else "rejected", approval_by=approved_by or rejected_by)
    if allow_gate and verdict.get("gate") == allow_gate != next(iter(gates)):
        lineage["gate_override"] = f"--allow-gate {allow_gate} (params.yaml bless.gate is {next(iter(gates))})"
    reject = f"release rejected by {rejected_by}" if rejected_by else None
    try:
        outcomes = rel.release(
            reg,
            s.root / challenger,
            verdict,
            lineage,
            s.params.release.smoke,
            log=console.print,
            base=s.root / base,
            gates=gates,
            reject=reject,
            hold=hold,
        )
    except RegistryError as exc:
        fail(f"release refused: {exc}")
    rows = [
        {
            "model": o.kind,
            "version": o.version,
            "new_version": o.created,
            "blessed": o.blessed,
            "smoke_check": o.smoke_ok,
            "promoted": o.promoted,
            "reasons": o.reasons,
            "verdict": verdicts.of_outcome(o.promoted, o.blessed, o.smoke_ok, o.reasons, verdict.get(o.kind)),
        }
        for o in outcomes
    ]
    _log_to_loop(s, rows, verdict.get("gate", "?"))
    if as_json:
        typer.echo(json.dumps(rows))
        return
    limit = width()
    typer.echo(fit(f"release ({verdict.get('gate', '?')} gate, judge: {verdict.get('judge', 'none')})", limit))
    table = [["model", "version", "verdict"]] + [
        [r["model"], f"v{r['version']}" + (" (new)" if r["new_version"] else "") if r["version"] else "-", r["verdict"]]
        for r in rows
    ]
    lines = aligned(table, limit)
    typer.echo(lines[0])
    for r, line in zip(rows, lines[1:]):
        typer.echo(line)
        if verbose:
            facts = (
                f"{MODELS[r['model']]}: blessed {str(r['blessed']).lower()}, smoke check "
                f"{'passed' if r['smoke_check'] else 'not passed'}, promoted {str(r['promoted']).lower()}"
            )
            for text in [facts, *r["reasons"]]:
                for out in wrapped(text, "    ", limit):
                    typer.echo(out)


def _log_to_loop(s, rows: list[dict], gate_name: str) -> None:
    """The turn's verdicts and headline metrics on its MLflow loop run (the run list shows them)."""
    from flywheel import tracking
    from flywheel.evaluation.report import headline_metrics

    metrics_file = s.root / "metrics" / "evaluate.json"
    metrics = headline_metrics(json.loads(metrics_file.read_text())) if metrics_file.exists() else {}
    # validate and prepare log no MLflow run of their own (importing MLflow would cost each a few seconds in
    # the DAG): their figures land on the loop run
    for stage, name in (("data", "data_quality.json"), ("prepare", "prepare.json")):
        path = s.root / "metrics" / name
        figures = json.loads(path.read_text()) if path.exists() else {}
        metrics.update(
            {f"{stage}.{k}": v for k, v in figures.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        )
    metrics.update({f"{r['model']}.promoted": float(r["promoted"]) for r in rows})
    tags = {f"verdict_{r['model']}": f"v{r['version']} {r['verdict']}" for r in rows if r["version"]}
    note = "\n".join(f"- **{r['model']}** v{r['version']}: {r['verdict']}" for r in rows if r["version"])
    tracking.log_loop_outcome(s, metrics, tags, f"Release ({gate_name} gate)\n\n{note}")


@app.command()
def promote(
    version: str,
    model: str = typer.Option("policy", help="policy or reward"),
    allow_gate: str | None = typer.Option(None, "--allow-gate", metavar="NAME", help=_ALLOW_GATE_HELP),
) -> None:
    """Make VERSION the champion (blessed by the gate in force and smoke-checked, or the base model)."""
    from flywheel.registry import RegistryError
    from flywheel.release import promote as do_promote

    kind = _kind(model)
    s = settings()
    in_force = gate(s).name
    if allow_gate:
        console.print(f"warning: --allow-gate {allow_gate}: a version blessed by it may be promoted", markup=False)
    try:
        notes = do_promote(registry(s), kind, version, in_force, allow_gate)
    except RegistryError as exc:
        fail(str(exc))
    for note in notes:
        console.print(note, markup=False)
    console.print(f"flywheel-{kind} v{version} is champion")


@app.command()
def rollback(
    model: str = typer.Option("policy", help="policy or reward"),
    to: str | None = typer.Option(None, help="version (default: previous-champion)"),
    allow_gate: str | None = typer.Option(None, "--allow-gate", metavar="NAME", help=_ALLOW_GATE_HELP),
) -> None:
    """Point champion back at the previous champion (or a named version): only a version blessed by the gate
    in force and smoke-checked, or the base model. The former champion is tagged rolled_back."""
    from flywheel.registry import MODELS, RegistryError
    from flywheel.release import rollback as do_rollback

    kind = _kind(model)
    s = settings()
    in_force = gate(s).name
    if allow_gate:
        console.print(
            f"warning: --allow-gate {allow_gate}: a version blessed by it may be rolled back to", markup=False
        )
    try:
        new, old, notes = do_rollback(registry(s), kind, to, in_force, allow_gate)
    except RegistryError as exc:
        fail(str(exc))
    for note in notes:
        console.print(note, markup=False)
    console.print(f"{MODELS[kind]}: champion v{old.version} -> v{new.version}")


def _details(tags: dict[str, str]) -> list[str]:
    """What ``status --verbose`` prints under a version: gate, judge, smoke check, then every reason."""

    def listed(key: str) -> list[str]:
        try:
            value = json.loads(tags.get(key) or "[]")
        except ValueError:
            return [tags[key]]
        return [str(v) for v in value] if isinstance(value, list) else []

    reasons = listed("gate_reasons")
    out = [
        f"gate {tags.get('gate') or '-'}, judge {tags.get('judge') or '-'}, smoke check "
        f"{tags.get('smoke_check') or '-'}"
    ]
    out += [f"fails: {r}" for r in reasons]
    out += listed("gate_not_applied")  # each reads "METRIC: not applied: WHY"
    out += [f"refused: {r}" for r in (tags.get("refused") or "").split("; ") if r and r not in reasons]
    out += [
        f"{key.replace('_', ' ')}: {tags[key]}" for key in ("awaiting", "rolled_back", "approval_by") if tags.get(key)
    ]
    return out


def _aliases(aliases: list[str]) -> str:
    """The aliases in few columns (``previous-champion`` reads ``previous``; --json has the names)."""
    return ",".join(a.removesuffix("-champion") for a in aliases) or "-"


@app.command()
def status(
    as_json: bool = typer.Option(False, "--json"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=_VERBOSE_HELP),
) -> None:
    """Versions, aliases and verdicts of the registered models, one line each."""
    from flywheel import verdicts
    from flywheel.registry import MODELS
    from flywheel.settings import mask_url

    s = settings()
    reg = registry(s)
    rows, tags = [], []
    for kind, name in MODELS.items():
        for v in reg.versions(name):
            rows.append(
                {
                    "model": name,
                    "version": v.version,
                    "aliases": v.aliases,
                    "blessed": v.tags.get("blessed", ""),
                    "smoke_check": v.tags.get("smoke_check", ""),
                    "origin": v.tags.get("origin", "fine-tuned"),
                    "reasons": json.loads(v.tags.get("gate_reasons", "[]")),
                    "gate": v.tags.get("gate", ""),
                    "judge": v.tags.get("judge", ""),
                    "refused": v.tags.get("refused", ""),
                    "rolled_back": v.tags.get("rolled_back", ""),
                    "verdict": verdicts.of_version(v.tags),
                }
            )
            tags.append((kind, v.tags))
    if as_json:
        typer.echo(json.dumps(rows))
        return
    limit = width()
    typer.echo(fit(f"registry: {mask_url(s.registry_uri)}", limit))
    table = [["model", "version", "aliases", "verdict"]] + [
        [kind, f"v{r['version']}", _aliases(r["aliases"]), r["verdict"]] for r, (kind, _) in zip(rows, tags)
    ]
    lines = aligned(table, limit)
    typer.echo(lines[0])
    for (_, t), line in zip(tags, lines[1:]):
        typer.echo(line)
        if verbose:
            for text in _details(t):
                for out in wrapped(text, "    ", limit):
                    typer.echo(out)


@app.command("eval-reward")
def eval_reward(
    model_uri: str = typer.Option(..., "--model", help="a folder or models:/flywheel-reward@champion"),
    pairs_file: Path = typer.Option(..., "--pairs"),
    fmt: str = typer.Option("native", "--format", help="native (preference events) or hh-rlhf"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Pairwise accuracy of a reward model on any preference file."""
    from flywheel.evaluation.eval_reward import EvalRewardError, run

    s = settings()
    try:
        result = run(s, model_uri, pairs_file, fmt, s.params.contract)
    except EvalRewardError as exc:
        fail(str(exc))
    print_record(result, as_json, "eval-reward")


@app.command("eval-policy")
def eval_policy(
    model_uri: str = typer.Option(..., "--model", help="a folder or models:/flywheel-policy@champion"),
    pairs_file: Path = typer.Option(..., "--pairs"),
    fmt: str = typer.Option("native", "--format", help="native (preference events) or hh-rlhf"),
    base_uri: str = typer.Option(None, "--base", help="the reference model (default: models/base/policy)"),
    judge_uri: str = typer.Option(None, "--judge", help="a reward model that judges greedy answers"),
    prompts: int = typer.Option(0, "--prompts", help="with --judge: how many prompts to answer and judge"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Held-out preference accuracy of a policy's implicit reward on any preference file (against its base, with
    the length heuristic beside it); with --judge, the judged win rate of its answers over the base's."""
    from flywheel.evaluation.eval_policy import run
    from flywheel.evaluation.eval_reward import EvalRewardError

    s = settings()
    try:
        result = run(s, model_uri, pairs_file, fmt, base_uri, judge_uri, prompts, log=lambda m: typer.echo(m, err=True))
    except EvalRewardError as exc:
        fail(str(exc))
    print_record(result, as_json, "eval-policy")
