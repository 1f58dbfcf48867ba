"""``flywheel review``: hand corrections and low ratings to human reviewers (Label Studio) and take the verdicts
back (flywheel/data/review.py)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from flywheel.cli._common import changing_raw_store, console, fail, print_record, settings

app = typer.Typer()
review_app = typer.Typer(
    no_args_is_help=True,
    help="Human review of corrections and low ratings through Label Studio (README: Reviewing feedback).",
)
app.add_typer(review_app, name="review")


@review_app.command("export")
def review_export(
    out: Path = typer.Option(..., "--out", help="the Label Studio tasks file to write (JSON)"),
    limit: int | None = typer.Option(None, min=1, help="at most this many tasks (default: params review.batch)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Write the corrections and low ratings nobody reviewed yet as Label Studio tasks, and the labeling
    interface to create the project with (OUT with .xml)."""
    from flywheel.data import review

    if out.suffix.lower() == ".xml":
        fail(f"--out {out}: the tasks are JSON (the labeling interface is written beside them as .xml)")
    s = settings()
    p = s.params.review
    events = review.candidates(s.raw_store, p.max_rating, limit or p.batch)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(review.tasks(events), ensure_ascii=False, indent=1), encoding="utf-8")
    config = out.with_suffix(".xml")
    config.write_text(review.LABEL_CONFIG, encoding="utf-8")
    kinds = {k: sum(e["feedback_type"] == k for e in events) for k in ("correction", "rating")}
    print_record(
        {"tasks": len(events), **kinds, "tasks_file": str(out), "label_config": str(config)}, as_json, "review"
    )
    if not as_json:
        console.print(
            f"In Label Studio: create a project with the labeling interface in {config}, import {out}; when "
            "done, export it as JSON and run `flywheel review import FILE`."
        )


@review_app.command("import")
def review_import(
    file: Path = typer.Argument(..., help="a Label Studio JSON export of the tasks `review export` wrote"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Store the reviewers' verdicts (approve or reject, an optional revised correction, who reviewed); the next
    `prepare` applies them. A task that cannot be taken is named with why; the others are stored."""
    from flywheel import workspace
    from flywheel.data import rawstore, review

    s = settings()
    try:
        raw = file.read_bytes()
    except OSError as exc:
        fail(f"cannot read {file}: {exc.strerror or exc}")
    with changing_raw_store(s, "review import"):
        table = rawstore.read_columns(s.raw_store, ["event_id", "feedback_type"])
        known = dict(zip(table.column("event_id").to_pylist(), table.column("feedback_type").to_pylist(), strict=True))
        try:
            result = review.parse_export(raw, known, s.params.contract.max_text_chars)
        except review.ReviewError as exc:
            fail(f"{file}: {exc}")
        stored = review.store(s.raw_store, result.reviews)
        if stored:
            workspace.track(s.root, s.raw_store)
    summary = {
        "reviewed": stored,
        "approved": sum(r["verdict"] == "approve" for r in result.reviews),
        "rejected": sum(r["verdict"] == "reject" for r in result.reviews),
        "revised": sum(r["revised"] is not None for r in result.reviews),
        "unreviewed": result.unreviewed,
        "refused": len(result.refused),
    }
    print_record({**summary, "refusals": result.refused} if as_json else summary, as_json, "review import")
    for why in result.refused:  # on stderr, beside the JSON or the table
        console.print(f"refused: {why}", markup=False, highlight=False, soft_wrap=True)
    if result.refused and not result.reviews:
        fail("no task of the file could be taken (reasons above)", 1)
