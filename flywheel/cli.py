"""The ``flywheel`` command line: the edge where settings are read once and steps are called."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from flywheel.settings import Settings, SettingsError, load_settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
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


def _print(data: dict, as_json: bool, title: str) -> None:
    if as_json:
        typer.echo(json.dumps(data))
        return
    table = Table(title=title, show_header=False)
    for k, v in data.items():
        table.add_row(k, json.dumps(v) if isinstance(v, (dict, list)) else str(v))
    Console().print(table)


@app.command()
def init() -> None:
    """Make the workspace a git + DVC repository where it is not one yet."""
    from flywheel import workspace

    s = settings()
    done = workspace.init(s.root)
    console.print("initialised: " + (", ".join(done) if done else "nothing to do"))


@app.command()
def ingest(
    files: list[Path] = typer.Argument(..., help="JSONL or JSONL.gz files, read as one batch"),
    fmt: str = typer.Option("native", "--format", help="native (contract v1) or hh-rlhf"),
    as_json: bool = typer.Option(False, "--json", help="print the counts as one JSON object"),
    track: bool = typer.Option(True, help="`dvc add` the raw store after a committed batch"),
) -> None:
    """Check, redact, de-duplicate and store a batch of feedback events."""
    from flywheel import workspace
    from pipelines.ingest import IngestError, ingest as run_ingest

    s = settings()
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
    """Remove a user's events from the raw store and from the training sets built from them."""
    from flywheel import workspace
    from pipelines.erase import erase_user

    s = settings()
    try:
        result = erase_user(user_id, s.raw_store, s.prepared)
    except ValueError as exc:
        fail(str(exc))
    if result.raw_events:
        workspace.track(s.root, s.raw_store)
    _print({"user_id": user_id, "raw_events_removed": result.raw_events,
            "training_records_removed": result.training_records}, False, "erase")
    console.print("Older copies may remain in the DVC cache and remotes. To purge them: commit the new "
                  "data/raw.dvc, then run `dvc gc --workspace --cloud` (and the same on each remote).")


@quarantine_app.command("purge")
def quarantine_purge(older_than: Optional[int] = typer.Option(None, help="days (default: params)")) -> None:
    """Delete quarantined batches older than the retention period."""
    from pipelines.erase import purge_quarantine

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


def main() -> None:
    try:
        app()
    except SettingsError as exc:
        console.print(f"error: {exc}", style="red", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
