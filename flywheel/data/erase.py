"""Erasure of one user's data (right to be forgotten) and retention of the quarantine.

Where user text lives and how ``erase_user`` reaches it (README, Security model, lists them all): the raw store
(rows rewritten), the quarantine (quarantined batches' rows; rejected lines that name the id, however it was
written), the training sets (records built from the user's events), the evaluation output written before
evaluation samples were drawn only from the shipped suites (those samples dropped) and the answer cache
(emptied: answers to held-out prompts may echo them), and the reviews of their events. Ids are compared as Unicode text in NFC form, as given
and as their pseudonym, so an id stored in another normal form, pseudonymised or JSON-escaped
(``j\\u00f3zef``, ``bob\\u0040corp``) is found too.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import time
import unicodedata
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from flywheel.data import rawstore, review

_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
LEGACY_SAMPLES = "## Sample answers\n"  # the report section that quoted held-out prompts (before suites-only)


@dataclass
class EraseResult:
    raw_events: int
    training_records: int
    files_rewritten: list[str]
    quarantined: int = 0
    evaluation_samples: int = 0  # held-out samples dropped from metrics/evaluate.json and report.md
    answer_cache_files: int = 0
    variants: list[str] = field(default_factory=list)  # the id as found, when stored in another Unicode form
    outputs_rewritten: list[str] = field(default_factory=list)  # DVC stage outputs changed (to record in dvc.lock)
    reviews: int = 0  # reviews of their events dropped, or naming them as the reviewer (flywheel/data/review.py)


@functools.lru_cache(maxsize=16)
def forms(user_id: str) -> frozenset[str]:
    """Every form ``user_id`` may be stored in, in NFC: itself and its pseudonym (an id holding personal data,
    an e-mail address, is stored pseudonymised: ``flywheel.redact.pseudonymise_id``)."""
    from flywheel.redact import pseudonymise_id

    nfc = {user_id, unicodedata.normalize("NFC", user_id)}
    return frozenset(unicodedata.normalize("NFC", x) for x in nfc | {pseudonymise_id(x) for x in nfc} if x)


def _same(value, user_id: str) -> bool:
    return isinstance(value, str) and unicodedata.normalize("NFC", value) in forms(user_id)


def _names(value, user_id: str) -> bool:
    """Whether a decoded JSON value holds ``user_id`` as a string anywhere (keys and values, nested)."""
    if isinstance(value, dict):
        return any(_same(k, user_id) or _names(v, user_id) for k, v in value.items())
    if isinstance(value, list):
        return any(_names(v, user_id) for v in value)
    return _same(value, user_id)


def _text_names(text: str, user_id: str) -> bool:
    """Whether a line of text names ``user_id``: as a decoded JSON value when it parses; else as any complete
    JSON string literal in it (decoded, so every escaping is found) or its literal or escaped quoted forms."""
    try:
        return _names(json.loads(text), user_id)
    except (ValueError, TypeError):
        pass
    for literal in _JSON_STRING.findall(text):
        try:
            if _same(json.loads(literal), user_id):
                return True
        except ValueError:
            continue
    nfc = unicodedata.normalize("NFC", text)
    quoted = {json.dumps(u, ensure_ascii=escaped) for u in forms(user_id) | {user_id} for escaped in (True, False)}
    return any(q in nfc or q in text for q in quoted)


def _rejected_line_names(line: str, user_id: str) -> bool:
    """A quarantine record ``{"line", "reason", "text"}``: its ``text`` (the input line) or ``reason`` names the
    id; a record that does not parse is searched as text, through one more level of JSON escaping."""
    try:
        record = json.loads(line)
    except ValueError:
        inner = {
            json.dumps(json.dumps(u, ensure_ascii=escaped))[1:-1]
            for u in forms(user_id) | {user_id}
            for escaped in (True, False)
        }
        return _text_names(line, user_id) or any(q in line for q in inner)
    if not isinstance(record, dict):
        return _names(record, user_id)
    return any(_text_names(record[k], user_id) for k in ("text", "reason") if isinstance(record.get(k), str)) or _names(
        {k: v for k, v in record.items() if k not in ("text", "reason")}, user_id
    )


def _stored_variants(ids: list, user_id: str) -> set[str]:
    """The stored ids that are ``user_id`` in one of its ``forms`` (the id itself always included)."""
    return {user_id} | {v for v in set(ids) if _same(v, user_id)}


def _rewrite_text(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(".tmp-" + path.name)
    tmp.write_text("".join(lines), encoding="utf-8")
    os.replace(tmp, path)


def erase_quarantine(user_id: str, quarantine: Path) -> int:
    """Remove ``user_id`` from the quarantine: rows of quarantined batches, and rejected lines that name the
    id, however it was encoded (see ``_text_names``; another user's line that quotes the same id goes too: the
    quarantine is diagnostic data, erring towards erasure is safe)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    removed = 0
    for batch in sorted(quarantine.iterdir()) if quarantine.exists() else []:
        parquet, lines = batch / "batch.parquet", batch / "rejected-lines.jsonl"
        if parquet.exists():
            table = pq.read_table(parquet)
            ids = _stored_variants(table.column("user_id").to_pylist(), user_id)
            gone = pc.is_in(table.column("user_id"), value_set=pa.array(sorted(ids), pa.string()))
            kept = table.filter(pc.invert(pc.fill_null(gone, False)))
            if kept.num_rows < table.num_rows:
                removed += table.num_rows - kept.num_rows
                tmp = parquet.with_name(".tmp-" + parquet.name)
                pq.write_table(kept, tmp, compression="zstd")
                os.replace(tmp, parquet)
        if lines.exists():
            text = lines.read_text(encoding="utf-8", errors="surrogateescape").splitlines(keepends=True)
            kept_lines = [ln for ln in text if not _rejected_line_names(ln, user_id)]
            if len(kept_lines) < len(text):
                removed += len(text) - len(kept_lines)
                tmp = lines.with_name(".tmp-" + lines.name)
                tmp.write_text("".join(kept_lines), encoding="utf-8", errors="surrogateescape")
                os.replace(tmp, lines)
    return removed


def erase_evaluation_samples(metrics_file: Path, report_dir: Path) -> int:
    """Drop the held-out samples that evaluation output written before samples came only from the shipped
    suites still quotes (``policy.samples`` entries without a ``suite``, and that report section): they are
    some user's test-split prompts. Returns how many were dropped (0: nothing to do)."""
    dropped = 0
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        samples = (metrics.get("policy") or {}).get("samples") or []
        kept = [x for x in samples if isinstance(x, dict) and x.get("suite")]
        if len(kept) < len(samples):
            dropped = len(samples) - len(kept)
            metrics["policy"]["samples"] = kept
            _rewrite_text(metrics_file, [json.dumps(metrics, indent=2)])
    report = report_dir / "report.md"
    if report.is_file():
        text = report.read_text()
        head, marker, tail = text.partition(LEGACY_SAMPLES)
        if marker and "**Prompt:**" in tail:
            dropped = dropped or tail.count("**Prompt:**")
            _rewrite_text(
                report,
                [head, "## Sample answers\n\n(removed by `flywheel erase`: they quoted held-out user prompts)\n"],
            )
    return dropped


def clear_answer_cache(folder: Path) -> int:
    """Empty the evaluation's answer cache (answers to held-out prompts may echo them) and, beside it, its score
    cache (trunk outputs are derived from held-out text: flywheel/models/scores.py); returns files removed.
    The next evaluation generates and scores again."""
    from flywheel.models import scores

    files = sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
    for f in files:
        f.unlink()
    return len(files) + scores.clear(folder.parent / scores.SCORE_CACHE)


def erase_user(
    user_id: str,
    raw_store: Path,
    prepared: Path,
    quarantine: Path | None = None,
    evaluation: tuple[Path, Path] | None = None,
    answer_cache: Path | None = None,
) -> EraseResult:
    """Remove ``user_id``'s events from the raw store, the quarantine and every record built from them in
    the training sets; with ``evaluation`` (metrics/evaluate.json, the report folder) drop the held-out samples
    older evaluation output quotes, with ``answer_cache`` empty that cache. (The service's feedback store:
    ``service.store.FeedbackStore.erase_user``; MLflow copies: ``evaluation_runs_with_samples``.)"""
    if not user_id:
        raise ValueError("user id is empty")
    table = rawstore.read_columns(raw_store, ["user_id", "event_id"])
    stored = table.column("user_id").to_pylist()
    variants = _stored_variants([v for v in stored if v is not None], user_id)
    theirs = {e for u, e in zip(stored, table.column("event_id").to_pylist(), strict=True) if u in variants}
    raw = sum(rawstore.rewrite_without(raw_store, "user_id", v) for v in sorted(variants))
    reviews = review.erase(raw_store, theirs, forms(user_id))
    records, touched = 0, []
    for path in sorted(prepared.glob("*.jsonl")) if prepared.exists() else []:
        with open(path, encoding="utf-8") as fh:
            lines = fh.readlines()
        kept = [ln for ln in lines if not any(_same(u, user_id) for u in json.loads(ln).get("user_ids", []))]
        if len(kept) == len(lines):
            continue
        records += len(lines) - len(kept)
        _rewrite_text(path, kept)
        touched.append(str(path))
    result = EraseResult(
        raw,
        records,
        touched,
        erase_quarantine(user_id, quarantine) if quarantine else 0,
        variants=sorted(variants - {user_id}),
        reviews=reviews,
    )
    if touched:
        result.outputs_rewritten.append(str(prepared))
    if evaluation is not None:
        result.evaluation_samples = erase_evaluation_samples(*evaluation)
        if result.evaluation_samples:
            result.outputs_rewritten += [str(evaluation[1]), str(evaluation[0])]
    if answer_cache is not None:
        result.answer_cache_files = clear_answer_cache(answer_cache)
    return result


def evaluation_runs_with_samples(settings) -> list[tuple[str, str]]:
    """MLflow ``evaluate`` runs logged before samples came only from the shipped suites (no ``flywheel.samples``
    tag): their ``report.md`` artifact may quote held-out user prompts. Returns (run id, artifact URI)."""
    from mlflow import MlflowClient

    from flywheel import tracking

    tracking.configure_from(settings)
    client = MlflowClient()
    exp = client.get_experiment_by_name(tracking.EXPERIMENT)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], "tags.`flywheel.stage` = 'evaluate'", max_results=10000)
    return [(r.info.run_id, r.info.artifact_uri) for r in runs if r.data.tags.get("flywheel.samples") != "suites"]


def purge_evaluation_artifacts(runs: list[tuple[str, str]]) -> list[str]:
    """Delete ``report.md`` from each run's artifacts (where the artifact store allows it); returns the run ids
    whose copy could not be deleted (erase prints how to purge those)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    left = []
    for run_id, uri in runs:
        try:
            repo = get_artifact_repository(uri)
            if any(f.path == "report.md" for f in repo.list_artifacts()):
                repo.delete_artifacts("report.md")
        except Exception:  # an artifact store that cannot delete (or is unreachable): the user purges
            left.append(run_id)
    return left


def erase_mlflow_copies(settings) -> tuple[int, str]:
    """Delete report.md from the MLflow evaluate runs logged before samples came only from the shipped suites;
    returns how many were deleted and, for those that could not be (or an unreachable server), how to purge
    them by hand ("" when nothing is left)."""
    how = (
        "MLflow may keep evaluation reports logged before samples came only from the shipped suites (runs "
        "tagged flywheel.stage=evaluate without flywheel.samples=suites): delete those runs "
        "(`mlflow runs delete --run-id RUN_ID`), then `mlflow gc --backend-store-uri {uri}{ids}`."
    )
    uri = settings.tracking_uri
    if uri.startswith(("http://", "https://")):
        how = how.replace("{uri}", "<the server's --backend-store-uri>") + " (with MLFLOW_TRACKING_URI set)"
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).exists():
        return 0, ""  # no tracking store yet: nothing was ever logged
    try:
        runs = evaluation_runs_with_samples(settings)
        left = purge_evaluation_artifacts(runs)
    except Exception as exc:  # the tracking server is unreachable: the user purges later, told how
        return 0, f"(MLflow not reachable: {exc.__class__.__name__}) " + how.format(uri=uri, ids="")
    return len(runs) - len(left), (how.format(uri=uri, ids=" --run-ids " + ",".join(left)) if left else "")


def _batch_time(name: str) -> float | None:
    try:
        return datetime.strptime(name[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def purge_quarantine(quarantine: Path, retention_days: int, now: float | None = None) -> list[str]:
    """Delete quarantined batches older than the retention period; returns the batch ids removed."""
    now = time.time() if now is None else now
    removed = []
    for d in sorted(quarantine.iterdir()) if quarantine.exists() else []:
        if not d.is_dir():
            continue
        when = _batch_time(d.name) or d.stat().st_mtime
        if now - when > retention_days * 86400:
            shutil.rmtree(d)
            removed.append(d.name)
    return removed
