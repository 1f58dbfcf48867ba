"""The ``flywheel`` command line: the edge where settings are read once and steps are called."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from flywheel.settings import Settings, SettingsError, load_settings


def _repeated_option(ctx: typer.Context) -> str | None:
    """The first single-value option given more than once to the subcommand the arguments name, else None
    (options that take a list, like ``tokens create --scope``, may repeat). Parsed with the subcommand's own
    parser, so ``--x=1``, flags and ``--x/--no-x`` pairs count; what the parser refuses is left to the real parse."""
    args = [*(getattr(ctx, "_protected_args", None) or []), *ctx.args]
    cmd, sub = ctx.command, ctx
    try:
        while hasattr(cmd, "resolve_command"):   # a group: find the subcommand its first argument names
            if not args or args[0].startswith("-"):
                return None
            name, cmd, args = cmd.resolve_command(sub, args)
            if cmd is None:
                return None
            sub = type(ctx)(cmd, parent=sub, info_name=name, **cmd.context_settings)
        _, _, order = cmd.make_parser(sub).parse_args(args=list(args))
    except Exception:  # noqa: BLE001 - a usage error (unknown command or option): click reports it itself
        return None
    seen: set[str] = set()
    for param in order:
        if param.param_type_name == "option" and not getattr(param, "multiple", False) \
                and not getattr(param, "count", False):
            if param.name in seen:
                return "/".join([*param.opts, *param.secondary_opts])
            seen.add(param.name)
    return None


class _RootGroup(TyperGroup):
    """The root command: refuses a repeated single-value option before anything runs (typer/click would keep
    the last value silently: `--name a --name b` meant b alone)."""

    def invoke(self, ctx: typer.Context):
        repeated = _repeated_option(ctx)
        if repeated:
            fail(f"option {repeated} given twice; give it once")
        return super().invoke(ctx)


app = typer.Typer(cls=_RootGroup, add_completion=False, no_args_is_help=True, help=__doc__)
stage_app = typer.Typer(no_args_is_help=True, help="Run one pipeline stage (what dvc.yaml calls).")
quarantine_app = typer.Typer(no_args_is_help=True, help="Inspect and purge quarantined input.")
contract_app = typer.Typer(no_args_is_help=True, help="The feedback contract.")
app.add_typer(stage_app, name="stage")
app.add_typer(quarantine_app, name="quarantine")
app.add_typer(contract_app, name="contract")
console = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    console.print(f"error: {message}", style="red", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        fail(str(exc))


@contextlib.contextmanager
def _feedback_store(url: str | None = None):
    """The service's feedback store (settings.feedback_store unless ``url``), closed afterwards."""
    from service.store import FeedbackStore

    store = FeedbackStore(url or settings().feedback_store)
    try:
        yield store
    finally:
        store.close()


def _print(data: dict, as_json: bool, title: str) -> None:
    if as_json:
        typer.echo(json.dumps(data))
        return
    table = Table(title=title, show_header=False)
    for k, v in data.items():
        table.add_row(escape(k), escape(json.dumps(v) if isinstance(v, (dict, list)) else str(v)))
    Console().print(table)


@contextlib.contextmanager
def _changing_raw_store(s: Settings, command: str):
    """Around every command that changes the raw store (ingest, export, erase): the workspace lock (one for all
    of them and the DAG tasks, so none interleaves) and, with a DVC remote, the remote's latest state pulled
    first (never over unpublished local changes) and this command's result pushed and published after, as a DAG
    task does: the next task's sync then neither deletes what it added nor brings back what it erased. Yields
    the list of extra paths to push (the raw store's pointer always is)."""
    from flywheel import workspace
    from flywheel import orchestration as orch
    from flywheel import remote

    push: list[str] = []
    try:
        with workspace.locked(s.root, f"flywheel {command}"):
            if not s.dvc_remote:
                yield push
                return
            if not workspace.is_dvc_repo(s.root):
                fail(f"dvc_remote is set but {s.root} is not a DVC repository: run `flywheel init` first")
            env, extra = dict(os.environ), [s.reports / orch.WATERMARK]
            run_id = s.airflow_run_id or time.strftime("cli__%Y-%m-%dT%H:%M:%SZ", time.gmtime()) + f"-{os.getpid()}"
            remote.sync_in(s.root, s.dvc_remote, env, None, log=console.print, extra=extra, task=f"{run_id}/{command}")
            yield push
            pointer = s.raw_store.with_name(s.raw_store.name + ".dvc")
            targets = [str(p.relative_to(s.root)) for p in (pointer,) if p.is_file()] + push
            remote.sync_out(s.root, s.dvc_remote, env, run_id, command, targets, extra, log=console.print)
            console.print(f"published to {s.dvc_remote} as the latest state (run {run_id}, task {command})")
    except (workspace.WorkspaceError, remote.RemoteError) as exc:
        fail(str(exc), 1)


def _no_track_with_remote(s: Settings, track: bool) -> None:
    if not track and s.dvc_remote:
        fail("--no-track cannot be used with a DVC remote (dvc_remote is set): an untracked batch is never "
             "published, and the next sync would delete it")


@app.command()
def init() -> None:
    """Make the workspace a git + DVC repository where it is not one yet."""
    from flywheel import workspace

    s = settings()
    done = workspace.init(s.root)
    console.print("initialised: " + (", ".join(done) if done else "nothing to do"))


@app.command()
def demo(turns: int = typer.Option(2, min=1, max=2)) -> None:
    """Turn the improvement loop on the shipped data and models (what `make demo` runs)."""
    from flywheel import workspace
    from flywheel.demo import run

    s = settings()
    try:
        run(s, turns)
    except workspace.WorkspaceError as exc:
        fail(str(exc), code=1)


@app.command()
def ingest(
    files: list[Path] = typer.Argument(..., help="JSONL or JSONL.gz files, read as one batch"),
    fmt: str = typer.Option("native", "--format", help="native (contract v1) or hh-rlhf"),
    as_json: bool = typer.Option(False, "--json", help="print the counts as one JSON object"),
    track: bool = typer.Option(True, help="`dvc add` the raw store after a committed batch"),
) -> None:
    """Check, redact, de-duplicate and store a batch of feedback events."""
    from flywheel import workspace
    from flywheel.data.ingest import IngestError, ingest as run_ingest

    s = settings()
    _no_track_with_remote(s, track)
    with _changing_raw_store(s, "ingest"):
        try:
            result = run_ingest(files, fmt, s.raw_store, s.quarantine, s.params.ingest, s.params.contract)
        except IngestError as exc:
            fail(str(exc))
        if result.accepted and track:
            workspace.track(s.root, s.raw_store)
    summary = {k: getattr(result, k) for k in ("read", "accepted", "duplicates", "quarantined")}
    summary.update(batch_id=result.batch_id, pii_redacted=result.pii)
    if result.quarantine_dir:
        summary["quarantine"] = result.quarantine_dir
    if result.failed_checks:
        summary["failed_checks"] = result.failed_checks
    _print(summary, as_json, "ingest")
    if result.failed_checks:
        fail("batch quarantined whole, failed checks:\n  " + "\n  ".join(result.failed_checks)
             + f"\nData Docs: {result.quarantine_dir}/data_docs/index.html", code=1)


@app.command()
def erase(user_id: str = typer.Option(..., "--user-id", help="the pseudonymous user id to forget")) -> None:
    """Remove a user's data from every place Flywheel keeps user text: the feedback store, the raw store, the
    quarantine, the training sets, older evaluation samples and the answer cache (README, Security model)."""
    from flywheel import workspace
    from flywheel.data import erase as erasure

    s = settings()
    with _changing_raw_store(s, "erase") as push:
        try:
            result = erasure.erase_user(user_id, s.raw_store, s.prepared, s.quarantine,
                                        evaluation=(s.root / "metrics" / "evaluate.json", s.reports / "evaluate"),
                                        answer_cache=s.models / "answer-cache")
        except ValueError as exc:
            fail(str(exc))
        store_rows = 0
        if not (s.feedback_store.startswith("sqlite:///")
                and not Path(s.feedback_store[len("sqlite:///"):]).exists()):
            with _feedback_store(s.feedback_store) as store:
                store_rows = sum(store.erase_user(u) for u in [user_id, *result.variants])
        if result.raw_events:
            workspace.track(s.root, s.raw_store)
        # record the rewritten stage outputs in dvc.lock, so what a sync hands other workspaces is the erased data
        committed, uncommitted = workspace.commit_outputs(s.root, result.outputs_rewritten)
        push += committed
    mlflow_deleted, mlflow_how = _erase_mlflow_copies(s)
    _print({"user_id": user_id, "feedback_store_events_removed": store_rows, "raw_events_removed": result.raw_events,
            "quarantined_removed": result.quarantined, "training_records_removed": result.training_records,
            "evaluation_samples_removed": result.evaluation_samples,
            "answer_cache_files_removed": result.answer_cache_files, "mlflow_reports_removed": mlflow_deleted},
           False, "erase")
    if uncommitted:
        console.print(f"Not recorded in dvc.lock (the next `dvc repro` rebuilds them): {', '.join(uncommitted)}.")
    console.print("Older copies may remain in the DVC cache and remotes. To purge them: commit the new "
                  "data/raw.dvc and dvc.lock, then run `dvc gc --workspace --cloud` (and the same on each remote); "
                  "models trained before this erase learned from the data: the next training excludes it.")
    if mlflow_how:
        console.print(mlflow_how)
    console.print("The quarantine and the answer cache are local to each workspace: run this erase on every "
                  "machine that runs `flywheel ingest` or `evaluate` too.")


def _erase_mlflow_copies(s: Settings) -> tuple[int, str]:
    """Delete report.md from MLflow evaluate runs logged before samples came only from the shipped suites;
    returns how many were deleted and, for those that could not be, how to purge them by hand."""
    from flywheel.data import erase as erasure

    how = ("MLflow may keep evaluation reports logged before samples came only from the shipped suites (runs "
           "tagged flywheel.stage=evaluate without flywheel.samples=suites): delete those runs "
           "(`mlflow runs delete --run-id RUN_ID`), then `mlflow gc --backend-store-uri {uri}{ids}`.")
    if s.tracking_uri.startswith(("http://", "https://")):
        how = how.replace("{uri}", "<the server's --backend-store-uri>") + " (with MLFLOW_TRACKING_URI set)"
    local_db = s.tracking_uri.startswith("sqlite:///") and not Path(s.tracking_uri[len("sqlite:///"):]).exists()
    if local_db:
        return 0, ""
    try:
        runs = erasure.evaluation_runs_with_samples(s)
        left = erasure.purge_evaluation_artifacts(runs)
    except Exception as exc:       # the tracking server is unreachable: the user purges later, told how
        return 0, f"(MLflow not reachable: {exc.__class__.__name__}) " + how.format(uri=s.tracking_uri, ids="")
    return len(runs) - len(left), (how.format(uri=s.tracking_uri, ids=" --run-ids " + ",".join(left)) if left else "")


@quarantine_app.command("purge")
def quarantine_purge(older_than: Optional[int] = typer.Option(None, help="days (default: params)")) -> None:
    """Delete quarantined batches older than the retention period."""
    from flywheel.data.erase import purge_quarantine

    s = settings()
    days = s.params.ingest.quarantine_retention_days if older_than is None else older_than
    removed = purge_quarantine(s.quarantine, days)
    console.print(f"purged {len(removed)} quarantined batch(es) older than {days} days")


@contract_app.command("schema")
def contract_schema(write: bool = typer.Option(False, help="rewrite the shipped schema file")) -> None:
    """Print (or rewrite) the JSON Schema of feedback contract v1."""
    from flywheel.contract import json_schema, write_schema

    if write:
        console.print(f"wrote {write_schema()}")
    else:
        typer.echo(json.dumps(json_schema(), indent=2, sort_keys=True))


@stage_app.command("validate")
def stage_validate(out: Path = typer.Option(...), metrics: Path = typer.Option(...)) -> None:
    """Great Expectations suite over the training window."""
    from pipelines.validate import ValidationFailed, main

    s = settings()
    try:
        result = main(s.raw_store, s.params.validate_, s.root / out, s.root / metrics)
    except ValidationFailed as exc:
        fail(str(exc), code=1)
    console.print(f"validate: {result.metrics['rows']} events, all expectations met")


@stage_app.command("prepare")
def stage_prepare(out: Path = typer.Option(...), metrics: Path = typer.Option(...)) -> None:
    """De-duplicate and compile preference pairs, SFT examples and reward pairs."""
    from pipelines.prepare import main

    s = settings()
    result = main(s.raw_store, s.params.prepare, s.root / out, s.root / metrics)
    console.print("prepare: " + json.dumps(result.metrics))


def _typed(cls, section: dict, name: str):
    """A stage's params section as its typed object; an unknown key fails naming it."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(section) - known)
    if unknown:
        fail(f"params.yaml {name}: unknown key(s) {', '.join(unknown)}; expected some of {', '.join(sorted(known))}")
    return cls(**section)


def _section(s: Settings, name: str) -> dict:
    try:
        return s.params.section(name)
    except SettingsError as exc:
        fail(str(exc))


@stage_app.command("base_models")
def stage_base_models(out: Path = typer.Option(...)) -> None:
    """Make the shipped pretrained models loadable folders (policy and base reward model)."""
    from pipelines.base_models import main as build

    s = settings()
    info = build(s.root / out, int(_section(s, "train_reward").get("max_length", 192)))
    console.print(f"base_models: {info}")


@stage_app.command("resolve_champion")
def stage_resolve_champion(base: Path = typer.Option(...), out: Path = typer.Option(...)) -> None:
    """Write which registry versions are champion now (always runs)."""
    from pipelines.resolve_champion import main as resolve

    s = settings()
    info = resolve(s, s.root / base, s.root / out)
    console.print("champion: " + ", ".join(f"{k} v{v['version']}" for k, v in info.items()))


@stage_app.command("train_reward")
def stage_train_reward(base: Path = typer.Option(...), prepared: Path = typer.Option(...),
                       out: Path = typer.Option(...), metrics: Path = typer.Option(...)) -> None:
    """Train the reward model on the reward pairs."""
    from flywheel.models.reward import RewardTrainParams
    from pipelines.train_reward import main as train

    s = settings()
    params = _typed(RewardTrainParams, _section(s, "train_reward"), "train_reward")
    summary = train(s, params, s.root / base, s.root / prepared, s.root / out, s.root / metrics)
    console.print(f"train_reward: {summary}")


@stage_app.command("train_policy")
def stage_train_policy(champion: Path = typer.Option(...), prepared: Path = typer.Option(...),
                       out: Path = typer.Option(...), metrics: Path = typer.Option(...)) -> None:
    """Fine-tune the champion policy (DPO + SFT on corrections, frozen lower layers)."""
    from pipelines.resolve_champion import load
    from pipelines.train_policy import PolicyParams, main as train

    s = settings()
    params = _typed(PolicyParams, _section(s, "train_policy"), "train_policy")
    info = load(s.root / champion, s)
    summary = train(s, params, Path(info["policy"]["path"]), info["policy"], s.root / prepared, s.root / out,
                    s.root / metrics)
    console.print(f"train_policy: {summary}")


@stage_app.command("evaluate")
def stage_evaluate(champion: Path = typer.Option(...), base: Path = typer.Option(...),
                   challenger: Path = typer.Option(...), prepared: Path = typer.Option(...),
                   suites: Path = typer.Option(...), out: Path = typer.Option(...),
                   metrics: Path = typer.Option(...)) -> None:
    """Evaluate the challengers against the champions on the same test split."""
    from pipelines.evaluate import EvalParams, main as run_eval
    from pipelines.resolve_champion import load

    s = settings()
    params = _typed(EvalParams, _section(s, "evaluate"), "evaluate")
    m = run_eval(s, params, load(s.root / champion, s), s.root / base, s.root / challenger, s.root / prepared,
                 s.root / suites, s.root / out, s.root / metrics)
    pa, ra = m["policy"]["pref_accuracy"], m["reward"]["pairwise_accuracy"]
    console.print(f"evaluate: policy accuracy {pa['champion']:.3f} -> {pa['challenger']:.3f}, "
                  f"reward accuracy {ra['champion']:.3f} -> {ra['challenger']:.3f}")


def _gate(s: Settings, name: str | None = None):
    """The gate in force (params.yaml ``bless.gate``; ``name``: another gate params.yaml defines)."""
    from pipelines.bless import GateError, gate_in_force

    try:
        return gate_in_force(_section(s, "bless"), name)
    except GateError as exc:
        fail(str(exc))


@stage_app.command("bless")
def stage_bless(evaluation: Path = typer.Option(..., "--metrics"), out: Path = typer.Option(...)) -> None:
    """The gate: bless a challenger only if better beyond noise and no regression."""
    from pipelines.bless import main as run_bless

    import mlflow

    from flywheel import tracking

    s = settings()
    gate = _gate(s)
    with tracking.stage_run(s, "bless"):
        verdict = run_bless(s.root / evaluation, gate.rules, s.root / out, gate.name)
        mlflow.log_artifact(str(s.root / out))
        mlflow.log_artifact(str((s.root / out).with_suffix(".md")))
        mlflow.log_metrics({f"{k}_blessed": float(verdict[k]["blessed"]) for k in ("policy", "reward")})
        mlflow.set_tags({"gate": gate.name, "gate_sha256": gate.sha256, "judge": verdict["judge"]})
    verdict_table(verdict, f"gate verdict ({gate.name} gate, judge: {verdict['judge']})")


def verdict_table(verdict: dict, title: str) -> None:
    table = Table(title=title, show_lines=True)
    table.add_column("model")
    table.add_column("blessed")
    table.add_column("reasons / checks")
    for kind in ("policy", "reward"):
        v = verdict.get(kind, {})
        lines = (v.get("reasons") or v.get("passed") or []) + v.get("not_applied", [])
        table.add_row(kind, "yes" if v.get("blessed") else "no", escape("\n".join(lines)))
    Console().print(table)


def _smoke(s: Settings):
    from flywheel.release import SmokeParams

    return _typed(SmokeParams, _section(s, "release").get("smoke", {}), "release.smoke")


def _registry(s: Settings):
    from flywheel.registry import Registry

    return Registry(s)


@app.command()
def bootstrap(base: Path = typer.Option(Path("models/base"), help="the base_models stage's output")) -> None:
    """On an empty registry, register the base models as version 1 and make them champion."""
    from flywheel.release import bootstrap as boot

    s = settings()
    if not (s.root / base / "policy").exists():
        fail(f"{base} has no base models yet: run `dvc repro base_models` first")
    done = boot(_registry(s), s.root / base)
    console.print("bootstrap: " + ("; ".join(done) if done else "registry already has champions"))


@app.command()
def release(
    challenger: Path = typer.Option(Path("models/challenger")),
    blessing: Path = typer.Option(Path("reports/blessing.json")),
    base: Path = typer.Option(Path("models/base")),
    as_json: bool = typer.Option(False, "--json"),
    approved_by: Optional[str] = typer.Option(None, "--approved-by", help="who approved the release (tagged)"),
    rejected_by: Optional[str] = typer.Option(None, "--rejected-by",
                                              help="who rejected it: register and check, never promote (tagged)"),
    hold: Optional[str] = typer.Option(None, "--hold", help="why not promote now: a blessed, checked version "
                                       "becomes `challenger` (tagged with this) awaiting `flywheel promote`"),
    allow_gate: Optional[str] = typer.Option(None, "--allow-gate", metavar="NAME",
                                             help="also accept a blessing from this gate of params.yaml (tests "
                                                  "only; logged and tagged on the version)"),
) -> None:
    """Register the challengers, smoke-check them, and promote those the gate in force (params.yaml
    bless.gate) blessed."""
    from flywheel.registry import RegistryError
    from flywheel.release import bootstrap as boot, release as run_release

    s = settings()
    gates = _accepted_gates(s, allow_gate)
    for path in (challenger, blessing):
        if not (s.root / path).exists():
            fail(f"{path} not found: run `dvc repro` first")
    registry = _registry(s)
    boot(registry, s.root / base)
    verdict = json.loads((s.root / blessing).read_text())
    lineage = _lineage(s)
    if approved_by and rejected_by:
        fail("--approved-by and --rejected-by exclude each other")
    if approved_by or rejected_by:
        lineage.update(approval="approved" if approved_by else "rejected", approval_by=approved_by or rejected_by)
    if allow_gate and verdict.get("gate") == allow_gate != next(iter(gates)):
        lineage["gate_override"] = f"--allow-gate {allow_gate} (params.yaml bless.gate is {next(iter(gates))})"
    reject = f"release rejected by {rejected_by}" if rejected_by else None
    try:
        outcomes = run_release(registry, s.root / challenger, verdict, lineage, _smoke(s), log=console.print,
                               gates=gates, reject=reject, hold=hold)
    except RegistryError as exc:
        fail(f"release refused: {exc}")
    rows = [{"model": o.kind, "version": o.version, "new_version": o.created, "blessed": o.blessed,
             "smoke_check": o.smoke_ok, "promoted": o.promoted, "reasons": o.reasons} for o in outcomes]
    if as_json:
        typer.echo(json.dumps(rows))
        return
    table = Table(title="release", show_lines=True)
    for col in ("model", "version", "blessed", "smoke check", "promoted", "reasons"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["model"], str(r["version"]), str(r["blessed"]), str(r["smoke_check"]), str(r["promoted"]),
                      escape("\n".join(r["reasons"])))
    Console().print(table)


def _accepted_gates(s: Settings, allow_gate: str | None) -> dict[str, str]:
    """Gate name -> rules' sha256 whose blessings count: params.yaml's bless.gate, plus an ``--allow-gate``
    (said out loud: it is how a test accepts another gate, never how production runs)."""
    gate = _gate(s)
    gates = {gate.name: gate.sha256}
    if allow_gate and allow_gate != gate.name:
        gates[allow_gate] = _gate(s, allow_gate).sha256
        console.print(f"warning: --allow-gate {allow_gate}: accepting the {allow_gate!r} gate besides params.yaml's "
                      f"{gate.name!r} (tagged gate_override on the version)", style="yellow", markup=False)
    return gates


def _lineage(s: Settings) -> dict:
    """What produced the challengers: commit, dvc.lock input hashes, feedback window, run ids."""
    import yaml

    from flywheel import tracking
    from flywheel.data import rawstore

    out = {"git_commit": tracking.git_commit(s.root), "airflow_run_id": s.airflow_run_id,
           "loop_run_id": s.parent_run_id}
    lock = s.root / "dvc.lock"
    if lock.exists():
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        for st in ("prepare", "train_reward", "train_policy"):
            deps = stages.get(st, {}).get("deps", [])
            out[f"dvc_{st}_inputs"] = json.dumps({d["path"]: d.get("md5") for d in deps})
    window = rawstore.read_columns(s.raw_store, ["ingested_at", "batch_id"])
    if window.num_rows:
        col = window.column("ingested_at").to_pylist()
        out["feedback_window"] = f"{min(col)}..{max(col)} ({window.num_rows} events, " \
                                 f"{len(set(window.column('batch_id').to_pylist()))} batches)"
    for kind, f in (("policy", "metrics/train_policy.json"), ("reward", "metrics/train_reward.json")):
        p = s.root / f
        if p.exists():
            out[f"{kind}_mlflow_run_id"] = json.loads(p.read_text()).get("mlflow_run_id", "")
    if lock.exists() and s.parent_run_id:
        import mlflow

        tracking.configure_from(s)
        with mlflow.start_run(run_id=s.parent_run_id):
            mlflow.log_artifact(str(lock))
    return out


_ALLOW_GATE_HELP = "also accept a version blessed by this gate of params.yaml (logged)"


@app.command()
def promote(version: str, model: str = typer.Option("policy", help="policy or reward"),
            allow_gate: Optional[str] = typer.Option(None, "--allow-gate", metavar="NAME",
                                                     help=_ALLOW_GATE_HELP)) -> None:
    """Make VERSION the champion (blessed by the gate in force and smoke-checked, or the base model)."""
    from flywheel.registry import RegistryError
    from flywheel.release import promote as do_promote

    if model not in ("policy", "reward"):
        fail("--model must be policy or reward")
    s = settings()
    gate = _gate(s).name
    if allow_gate:
        console.print(f"warning: --allow-gate {allow_gate}: a version blessed by it may be promoted", markup=False)
    try:
        notes = do_promote(_registry(s), model, version, gate, allow_gate)
    except RegistryError as exc:
        fail(str(exc))
    for note in notes:
        console.print(note, markup=False)
    console.print(f"flywheel-{model} v{version} is champion")


@app.command()
def rollback(model: str = typer.Option("policy", help="policy or reward"),
             to: Optional[str] = typer.Option(None, help="version (default: previous-champion)"),
             allow_gate: Optional[str] = typer.Option(None, "--allow-gate", metavar="NAME",
                                                      help=_ALLOW_GATE_HELP)) -> None:
    """Point champion back at the previous champion (or a named version): only a version blessed by the gate
    in force and smoke-checked, or the base model. The former champion is tagged rolled_back."""
    from flywheel.registry import MODELS, RegistryError
    from flywheel.release import rollback as do_rollback

    if model not in MODELS:
        fail("--model must be policy or reward")
    s = settings()
    gate = _gate(s).name
    if allow_gate:
        console.print(f"warning: --allow-gate {allow_gate}: a version blessed by it may be rolled back to",
                      markup=False)
    try:
        new, old, notes = do_rollback(_registry(s), model, to, gate, allow_gate)
    except RegistryError as exc:
        fail(str(exc))
    for note in notes:
        console.print(note, markup=False)
    console.print(f"{MODELS[model]}: champion v{old.version} -> v{new.version}")


@app.command()
def status(as_json: bool = typer.Option(False, "--json")) -> None:
    """Versions, aliases, key figures and verdicts of the registered models."""
    from flywheel.registry import MODELS

    s = settings()
    registry = _registry(s)
    rows = []
    for kind, name in MODELS.items():
        for v in registry.versions(name):
            rows.append({"model": name, "version": v.version, "aliases": v.aliases,
                         "blessed": v.tags.get("blessed", ""), "smoke_check": v.tags.get("smoke_check", ""),
                         "origin": v.tags.get("origin", "fine-tuned"), "reasons": json.loads(v.tags.get("gate_reasons", "[]")),
                         "gate": v.tags.get("gate", ""), "judge": v.tags.get("judge", ""),
                         "refused": v.tags.get("refused", ""), "rolled_back": v.tags.get("rolled_back", "")})
    if as_json:
        typer.echo(json.dumps(rows))
        return
    table = Table(title=f"registry ({s.registry_uri})", show_lines=True)
    for col in ("model", "version", "aliases", "blessed", "smoke check", "gate", "gate reasons / refused"):
        table.add_column(col)
    for r in rows:
        notes = r["reasons"] + ([f"refused: {r['refused']}"] if r["refused"] else []) + (
            [f"rolled back from: {r['rolled_back']}"] if r["rolled_back"] else [])
        table.add_row(r["model"], r["version"], ", ".join(r["aliases"]), r["blessed"], r["smoke_check"], r["gate"],
                      escape("\n".join(notes)[:400]))
    Console().print(table)


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
    _print(result, as_json, "eval-reward")


# ---- the online service -----------------------------------------------------------------------------------
tokens_app = typer.Typer(no_args_is_help=True, help="API tokens of the online service.")
app.add_typer(tokens_app, name="tokens")


@app.command()
def serve(
    host: Optional[str] = typer.Option(None, help="default: params serve.host"),
    port: Optional[int] = typer.Option(None, help="default: params serve.port"),
    model_dir: Optional[Path] = typer.Option(None, help="policy folder served while the registry has no champion"),
    registry: bool = typer.Option(True, help="follow the registry's champion alias (hot reload)"),
) -> None:
    """Serve the champion policy and capture feedback (OpenAPI spec at /docs and /openapi.json)."""
    from service.server import config_from_settings, run

    s = settings()
    try:
        config = config_from_settings(s, model_dir, registry)
    except ValueError as exc:
        fail(str(exc))
    run(config, host, port)


@app.command("export")
def export_feedback(
    as_json: bool = typer.Option(False, "--json"),
    track: bool = typer.Option(True, help="`dvc add` the raw store after a written batch"),
) -> None:
    """Move feedback captured by the service into the raw store as one batch."""
    from flywheel import workspace
    from service.export import export
    from service.store import FeedbackStore

    s = settings()
    _no_track_with_remote(s, track)
    with _changing_raw_store(s, "export"):
        store = FeedbackStore(s.feedback_store)
        try:
            result = export(store, s.raw_store)
        finally:
            store.close()
        if result.exported and track:
            workspace.track(s.root, s.raw_store)
    _print({"batches": result.batches, "exported": result.exported, "duplicates": result.duplicates,
            "files": result.files}, as_json, "export")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def repro(ctx: typer.Context, warm_runner: bool = typer.Option(True, "--warm/--cold",
                                                               help="run stages in a warm runner (flywheel/warm.py)")) -> None:
    """`dvc repro` with the stages' commands run by a warm runner (torch, MLflow and GX imported once, not once
    a stage; a plain `dvc repro` does the same); `--cold` runs each stage in its own process. Any other argument
    goes to dvc repro as is, e.g. `flywheel repro train_policy --force`."""
    import subprocess

    from flywheel import warm, workspace

    s = settings()
    if warm_runner:
        warm.repro_exec(ctx.args)         # execs dvc repro with the workspace's warm runner
    env = {k: v for k, v in os.environ.items() if k != warm.SOCKET_ENV}
    if not warm_runner:
        env["FLYWHEEL_WARM"] = "0"         # --cold: every stage in its own process, no runner started
    raise typer.Exit(subprocess.run([workspace._bin("dvc"), "repro", *ctx.args], cwd=s.root, env=env).returncode)


@app.command()
def restore(run_id: Optional[str] = typer.Option(None, "--run-id",
                                                 help="an Airflow run id (a model version's airflow_run_id tag); "
                                                      "default: the latest published state"),
            task: Optional[str] = typer.Option(None, help="whose state: a task of that run (default: its last)"),
            force: bool = typer.Option(False, "--force", help="overwrite changes never published from this workspace"
                                       )) -> None:
    """Put this workspace in the state an Airflow run (or, without --run-id, the latest task or command) left on
    the DVC remote (dvc.lock, the raw-store pointer) and pull its data: the exact inputs and outputs behind a
    model version, on a fresh clone. Refuses to overwrite unpublished local changes unless --force."""
    from flywheel import workspace
    from flywheel import orchestration as orch
    from flywheel import remote

    s = settings()
    if not s.dvc_remote:
        fail("dvc_remote is not set (FLYWHEEL_DVC_REMOTE or params.yaml settings.dvc_remote): runs left their "
             "state on no remote")
    env = dict(os.environ)
    try:
        with workspace.locked(s.root, "flywheel restore"):
            state = remote.fetch_state(s.dvc_remote, env, run_id, task) if run_id else remote.fetch_state(
                s.dvc_remote, env)
            if state is None:
                fail(f"no workspace state of run {run_id!r}{f' task {task!r}' if task else ''} on {s.dvc_remote}"
                     if run_id else f"no state published on {s.dvc_remote} yet")
            remote.sync_in(s.root, s.dvc_remote, env, state, log=console.print, extra=[s.reports / orch.WATERMARK],
                           force=force)
    except (remote.RemoteError, workspace.WorkspaceError) as exc:
        fail(str(exc), 1)
    console.print(f"restored {f'run {run_id}' if run_id else 'the latest state'}: {', '.join(sorted(state))}")


@app.command()
def publish() -> None:
    """Push this workspace's data and publish its state (dvc.lock, the raw-store pointer, the watermark) as the
    DVC remote's latest, merged with what the remote holds: what ingest, export and erase do by themselves;
    for changes made by hand (`dvc add`, `dvc repro`) that a sync would otherwise refuse to overwrite."""
    from flywheel import workspace
    from flywheel import orchestration as orch
    from flywheel import remote

    s = settings()
    if not s.dvc_remote:
        fail("dvc_remote is not set (FLYWHEEL_DVC_REMOTE or params.yaml settings.dvc_remote): nothing to publish to")
    env = dict(os.environ)
    run_id = s.airflow_run_id or time.strftime("cli__%Y-%m-%dT%H:%M:%SZ", time.gmtime()) + f"-{os.getpid()}"
    try:
        with workspace.locked(s.root, "flywheel publish"):
            remote.configure(s.root, s.dvc_remote, env)
            state = remote.sync_out(s.root, s.dvc_remote, env, run_id, "publish", None, [s.reports / orch.WATERMARK],
                                    log=console.print)
    except (remote.RemoteError, workspace.WorkspaceError) as exc:
        fail(str(exc), 1)
    console.print(f"published {', '.join(sorted(state))} to {s.dvc_remote} (run {run_id})")


@tokens_app.command("create")
def tokens_create(scope: list[str] = typer.Option(..., "--scope", help="chat, feedback or admin; repeat it for "
                                                                      "several (--scope chat --scope feedback)"),
                  name: str = typer.Option("", help="who or what the token is for")) -> None:
    """Create an API token allowed one or more scopes and print it once (only its SHA-256 is stored)."""
    from service.auth import create_token, normalise_scopes
    from service.store import FeedbackStore

    try:
        scopes = normalise_scopes(scope)
    except ValueError as exc:
        fail(str(exc))
    s = settings()
    store = FeedbackStore(s.feedback_store)
    try:
        token, token_id = create_token(store, scopes, name)
    finally:
        store.close()
    console.print(f"token {token_id} ({scopes}) created; it is shown only now:")
    typer.echo(token)


@tokens_app.command("list")
def tokens_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """The API tokens: public id, scopes, name, creation time (the tokens themselves are not stored)."""
    with _feedback_store() as store:
        rows = store.list_tokens()
    if as_json:
        typer.echo(json.dumps(rows))
        return
    table = Table("id", "scopes", "name", "created")
    for r in rows:
        table.add_row(r["token_id"], r["scope"], escape(r["name"]), r["created_at"])
    Console().print(table)


@tokens_app.command("revoke")
def tokens_revoke(token_id: str = typer.Argument(..., help="the public id shown by `tokens create` / `tokens list`")) -> None:
    """Revoke a token: a running service refuses it within a few seconds (serve re-reads tokens every 5 s)."""
    with _feedback_store() as store:
        found = store.revoke_token(token_id)
    if not found:
        fail(f"no token with id {token_id!r}; see `flywheel tokens list`")
    console.print(f"token {token_id} revoked")


@app.command()
def check(timeout: float = typer.Option(2.0, min=0.1, help="seconds to wait for each service")) -> None:
    """Check that every service the settings name (Airflow DB, Celery broker, MLflow, feedback store, DVC remote)
    answers: one line per setting; exit 1 if any does not."""
    from flywheel.production import probe

    s = settings()
    results = probe(s, timeout=timeout)
    for p in results:
        status = "skipped" if p.skipped else "ok" if p.ok else "error"
        typer.echo(f"{status:<8}{p.message}")
    if not all(p.ok for p in results):
        raise typer.Exit(1)


def main() -> None:
    try:
        app()
    except SettingsError as exc:
        console.print(f"error: {exc}", style="red", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
