"""``flywheel`` data commands: ingest, export, erase, publish, restore, quarantine purge, contract schema."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import typer

from flywheel.cli._common import (
    changing_raw_store,
    console,
    fail,
    feedback_store,
    no_track_with_remote,
    print_record,
    settings,
)
from flywheel.contract import ContractError

app = typer.Typer()
quarantine_app = typer.Typer(no_args_is_help=True, help="Inspect and purge quarantined input.")
contract_app = typer.Typer(no_args_is_help=True, help="The feedback contract.")
app.add_typer(quarantine_app, name="quarantine")
app.add_typer(contract_app, name="contract")


@app.command()
def ingest(
    files: list[Path] = typer.Argument(None, help="JSONL or JSONL.gz files, read as one batch"),
    fmt: str = typer.Option(
        "native",
        "--format",
        help="native (contract v1), hh-rlhf, openai-log or langfuse (README: feedback from where it is logged)",
    ),
    source: str | None = typer.Option(
        None, "--from", help="mlflow: the human assessments on an experiment's traces (with --experiment)"
    ),
    experiment: str | None = typer.Option(
        None, help="--from mlflow: the experiment whose traces to read (default: params ingest.traces.experiment)"
    ),
    tracking_uri: str | None = typer.Option(
        None, help="--from mlflow: its tracking URI (default: ingest.traces.tracking_uri, else the workspace's)"
    ),
    since: str | None = typer.Option(
        None, help="--from mlflow: only assessments made after this RFC 3339 time (default: after the last ingest)"
    ),
    as_json: bool = typer.Option(False, "--json", help="print the counts as one JSON object"),
    track: bool = typer.Option(True, help="`dvc add` the raw store after a committed batch"),
) -> None:
    """Check, redact, de-duplicate and store a batch of feedback events."""
    from flywheel import workspace
    from flywheel.data.ingest import IngestError
    from flywheel.data.ingest import ingest as run_ingest

    s = settings()
    if bool(files) == bool(source):
        fail("give the files to ingest, or --from mlflow --experiment NAME (not both)")
    no_track_with_remote(s, track)
    pulled: dict = {}
    with changing_raw_store(s, "ingest"), tempfile.TemporaryDirectory() as tmp:
        if fmt == "langfuse" and not source:
            files, fmt, pulled = _from_langfuse(files, Path(tmp))
        if source:
            src = s.params.ingest.traces
            uri = tracking_uri or src.tracking_uri or s.tracking_uri
            files, fmt, pulled = _from_mlflow(s, source, experiment or src.experiment, uri, since, Path(tmp))
        if pulled and not files:  # nothing new since the watermark (or no human score): not an error
            counts = dict.fromkeys(("read", "accepted", "duplicates", "quarantined"), 0)
            counts.update({k: v for k, v in pulled.items() if k not in ("key", "latest_ms")})
            print_record(counts, as_json, "ingest")
            return
        try:
            result = run_ingest(files, fmt, s.raw_store, s.quarantine, s.params.ingest, s.params.contract)
        except IngestError as exc:
            fail(str(exc))
        if result.accepted and track:
            workspace.track(s.root, s.raw_store)
        if pulled.get("key") and result.ok:  # the watermark moves only past a batch that was stored
            _watermarks(s, {pulled["key"]: pulled["latest_ms"]})
    summary = {k: getattr(result, k) for k in ("read", "accepted", "duplicates", "quarantined")}
    summary.update({k: v for k, v in pulled.items() if k not in ("key", "latest_ms")})
    summary.update(batch_id=result.batch_id, pii_redacted=result.pii)
    if result.quarantine_dir:
        summary["quarantine"] = result.quarantine_dir
    if result.failed_checks:
        summary["failed_checks"] = result.failed_checks
    print_record(summary, as_json, "ingest")
    if result.failed_checks:
        fail(
            "batch quarantined whole, failed checks:\n  "
            + "\n  ".join(result.failed_checks)
            + f"\nData Docs: {result.quarantine_dir}/data_docs/index.html",
            code=1,
        )


def _watermarks(s, update: dict | None = None) -> dict:
    """``--from`` sources' watermarks (the newest assessment time ingested, ms), beside the raw store."""
    path = s.raw_store.parent / "ingest-watermarks.json"
    marks = json.loads(path.read_text()) if path.is_file() else {}
    if update:
        marks.update(update)
        path.write_text(json.dumps(marks, indent=2, sort_keys=True))
    return marks


def _from_langfuse(files: list[Path], tmp: Path):
    """A Langfuse export (traces and scores) as one ``langfuse-score`` line per human score, to ingest."""
    from flywheel.data.ingest import IngestError
    from flywheel.data.sources import langfuse_records

    lines, counts = [], {"traces": 0, "scores": 0, "skipped_not_human": 0}
    for f in files:
        try:
            got, c = langfuse_records(Path(f).read_bytes())
        except (OSError, UnicodeDecodeError) as exc:
            fail(str(IngestError(f"cannot read {f}: {exc}")))
        except ContractError as exc:
            fail(f"{f}: {exc.reason}")
        lines += got
        counts = {k: counts[k] + c[k] for k in counts}
    path = tmp / "langfuse-scores.jsonl"
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return ([path] if lines else []), "langfuse-score", counts


def _from_mlflow(s, source: str, experiment: str | None, uri: str, since: str | None, tmp: Path):
    """The human assessments on the experiment's traces newer than the watermark (or ``since``), as an
    ``mlflow-trace`` file to ingest; returns (files, format, what was pulled)."""
    import hashlib
    from datetime import datetime

    from flywheel.data.sources import mlflow_assessment_lines

    if source != "mlflow":
        fail(f"--from {source}: the one source read is mlflow (files: --format openai-log, native, hh-rlhf)")
    if not experiment:
        fail("--from mlflow needs --experiment NAME (or params.yaml ingest.traces.experiment)")
    key = f"mlflow:{hashlib.sha256(uri.encode()).hexdigest()[:16]}:{experiment}"
    after = _watermarks(s).get(key, 0)
    if since:
        try:
            after = int(datetime.fromisoformat(since.replace("Z", "+00:00")).timestamp() * 1000)
        except ValueError:
            fail(f"--since {since!r}: not an RFC 3339 time (e.g. 2026-11-27T10:00:00Z)")
    try:
        lines, counts = mlflow_assessment_lines(uri, experiment, after)
    except ValueError as exc:
        fail(str(exc))
    path = tmp / "mlflow-assessments.jsonl"
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return ([path] if lines else []), "mlflow-trace", {"key": key, **counts}


@app.command("export")
def export_feedback(
    as_json: bool = typer.Option(False, "--json"),
    track: bool = typer.Option(True, help="`dvc add` the raw store after a written batch"),
) -> None:
    """Move feedback captured by the service into the raw store as one batch."""
    from flywheel import workspace
    from service.export import export

    s = settings()
    no_track_with_remote(s, track)
    with changing_raw_store(s, "export"):
        with feedback_store(s.feedback_store) as store:
            result = export(store, s.raw_store)
        if result.exported and track:
            workspace.track(s.root, s.raw_store)
    print_record(
        {
            "batches": result.batches,
            "exported": result.exported,
            "duplicates": result.duplicates,
            "files": result.files,
        },
        as_json,
        "export",
    )


@app.command()
def erase(user_id: str = typer.Option(..., "--user-id", help="the pseudonymous user id to forget")) -> None:
    """Remove a user's data from every place Flywheel keeps user text: the feedback store, the raw store, the
    quarantine, the training sets, older evaluation samples and the answer cache (README, Security model)."""
    from flywheel import workspace
    from flywheel.data import erase as erasure

    s = settings()
    with changing_raw_store(s, "erase") as push:
        try:
            result = erasure.erase_user(
                user_id,
                s.raw_store,
                s.prepared,
                s.quarantine,
                evaluation=(s.root / "metrics" / "evaluate.json", s.reports / "evaluate"),
                answer_cache=s.models / "answer-cache",
            )
        except ValueError as exc:
            fail(str(exc))
        store_rows = 0
        if not (s.feedback_store.startswith("sqlite:///") and not Path(s.feedback_store[len("sqlite:///") :]).exists()):
            with feedback_store(s.feedback_store) as store:
                store_rows = sum(store.erase_user(u) for u in [user_id, *result.variants])
        if result.raw_events:
            workspace.track(s.root, s.raw_store)
        # record the rewritten stage outputs in dvc.lock, so what a sync hands other workspaces is the erased data
        committed, uncommitted = workspace.commit_outputs(s.root, result.outputs_rewritten)
        push += committed
    mlflow_deleted, mlflow_how = erasure.erase_mlflow_copies(s)
    traces = _erase_traces(s, user_id)
    print_record(
        {
            "user_id": user_id,
            "feedback_store_events_removed": store_rows,
            "raw_events_removed": result.raw_events,
            "reviews_removed": result.reviews,
            "quarantined_removed": result.quarantined,
            "training_records_removed": result.training_records,
            "evaluation_samples_removed": result.evaluation_samples,
            "answer_cache_files_removed": result.answer_cache_files,
            "mlflow_reports_removed": mlflow_deleted,
            "mlflow_traces_removed": traces.traces,
            "mlflow_assessments_removed": traces.assessments,
        },
        False,
        "erase",
    )
    if uncommitted:
        console.print(f"Not recorded in dvc.lock (the next `dvc repro` rebuilds them): {', '.join(uncommitted)}.")
    console.print(
        "Older copies may remain in the DVC cache and remotes. To purge them: commit the new "
        "data/raw.dvc and dvc.lock, then run `dvc gc --workspace --cloud` (and the same on each remote); "
        "models trained before this erase learned from the data: the next training excludes it."
    )
    if mlflow_how:
        console.print(mlflow_how)
    console.print(
        "The quarantine and the answer cache are local to each workspace: run this erase on every "
        "machine that runs `flywheel ingest` or `evaluate` too."
    )


def _erase_traces(s, user_id: str):
    """The user's traces and the assessments they left on others' traces, in the service's MLflow experiment
    (serve.tracing) and the one ingest reads (ingest.traces): erased there too, so no later ingest brings them
    back. A tracking store that cannot be reached fails the erase (run it again)."""
    from flywheel.data.erase import forms
    from flywheel.tracing_store import TraceErasure, erase_user

    total, src = TraceErasure(), s.params.ingest.traces
    places = {(s.tracking_uri, s.params.serve.tracing.experiment)}
    if src.experiment:
        places.add((src.tracking_uri or s.tracking_uri, src.experiment))
    for uri, experiment in sorted(places):
        if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).exists():
            continue  # no tracking store yet: nothing was ever traced
        try:
            done = erase_user(uri, experiment, forms(user_id))
        except Exception as exc:
            fail(
                f"the other stores are erased, but the MLflow traces in {experiment!r} could not be "
                f"({type(exc).__name__}: {exc}); run the erase again when the tracking store is reachable"
            )
        total.traces, total.assessments = total.traces + done.traces, total.assessments + done.assessments
    return total


@app.command()
def publish() -> None:
    """Push this workspace's data and publish its state (dvc.lock, the raw-store pointer, the watermark) as the
    DVC remote's latest, merged with what the remote holds: what ingest, export and erase do by themselves;
    for changes made by hand (`dvc add`, `dvc repro`) that a sync would otherwise refuse to overwrite."""
    from flywheel import publishing, remote, workspace
    from flywheel.settings import SettingsError

    s = settings()
    try:
        state, run_id = publishing.publish(s, log=console.print)
    except SettingsError as exc:
        fail(str(exc))
    except (remote.RemoteError, workspace.WorkspaceError) as exc:
        fail(str(exc), 1)
    console.print(f"published {', '.join(sorted(state))} to {s.dvc_remote} (run {run_id})")


@app.command()
def restore(
    run_id: str | None = typer.Option(
        None,
        "--run-id",
        help="an Airflow run id (a model version's airflow_run_id tag); default: the latest published state",
    ),
    task: str | None = typer.Option(None, help="whose state: a task of that run (default: its last)"),
    force: bool = typer.Option(False, "--force", help="overwrite changes never published from this workspace"),
) -> None:
    """Put this workspace in the state an Airflow run (or, without --run-id, the latest task or command) left on
    the DVC remote (dvc.lock, the raw-store pointer) and pull its data: the exact inputs and outputs behind a
    model version, on a fresh clone. Refuses to overwrite unpublished local changes unless --force."""
    from flywheel import publishing, remote, workspace
    from flywheel.settings import SettingsError

    s = settings()
    try:
        state = publishing.restore(s, run_id, task, force, log=console.print)
    except SettingsError as exc:
        fail(str(exc))
    except (remote.RemoteError, workspace.WorkspaceError) as exc:
        fail(str(exc), 1)
    if state is None:
        fail(
            f"no workspace state of run {run_id!r}{f' task {task!r}' if task else ''} on {s.dvc_remote}"
            if run_id
            else f"no state published on {s.dvc_remote} yet"
        )
    console.print(f"restored {f'run {run_id}' if run_id else 'the latest state'}: {', '.join(sorted(state))}")


@quarantine_app.command("purge")
def quarantine_purge(older_than: int | None = typer.Option(None, help="days (default: params)")) -> None:
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
