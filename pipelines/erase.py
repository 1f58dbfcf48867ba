"""Erasure of one user's data (right to be forgotten) and retention of the quarantine."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pipelines import rawstore


@dataclass
class EraseResult:
    raw_events: int
    training_records: int
    files_rewritten: list[str]
    quarantined: int = 0


def erase_quarantine(user_id: str, quarantine: Path) -> int:
    """Remove ``user_id`` from the quarantine: rows of quarantined batches, and rejected lines that name the
    id as a JSON string (a rejected line may not parse, so its text is searched; another user's line that
    quotes the same id goes too: the quarantine is diagnostic data, erring towards erasure is safe)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    removed = 0
    needle = json.dumps(user_id)
    for batch in sorted(quarantine.iterdir()) if quarantine.exists() else []:
        parquet, lines = batch / "batch.parquet", batch / "rejected-lines.jsonl"
        if parquet.exists():
            table = pq.read_table(parquet)
            kept = table.filter(pc.fill_null(pc.not_equal(table.column("user_id"), user_id), True))
            if kept.num_rows < table.num_rows:
                removed += table.num_rows - kept.num_rows
                tmp = parquet.with_name(".tmp-" + parquet.name)
                pq.write_table(kept, tmp, compression="zstd")
                os.replace(tmp, parquet)
        if lines.exists():
            text = lines.read_text(encoding="utf-8").splitlines(keepends=True)
            kept_lines = [ln for ln in text if needle not in json.loads(ln).get("text", "")]
            if len(kept_lines) < len(text):
                removed += len(text) - len(kept_lines)
                tmp = lines.with_name(".tmp-" + lines.name)
                tmp.write_text("".join(kept_lines), encoding="utf-8")
                os.replace(tmp, lines)
    return removed


def erase_user(user_id: str, raw_store: Path, prepared: Path, quarantine: Path | None = None) -> EraseResult:
    """Remove ``user_id``'s events from the raw store, the quarantine and every record built from them in
    the training sets. (The service's feedback store: ``service.store.FeedbackStore.erase_user``.)"""
    if not user_id:
        raise ValueError("user id is empty")
    raw = rawstore.rewrite_without(raw_store, "user_id", user_id)
    records, touched = 0, []
    for path in sorted(prepared.glob("*.jsonl")) if prepared.exists() else []:
        with open(path, encoding="utf-8") as fh:
            lines = fh.readlines()
        kept = [ln for ln in lines if user_id not in json.loads(ln).get("user_ids", [])]
        if len(kept) == len(lines):
            continue
        records += len(lines) - len(kept)
        tmp = path.with_name(".tmp-" + path.name)
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)
        touched.append(str(path))
    return EraseResult(raw, records, touched, erase_quarantine(user_id, quarantine) if quarantine else 0)


def _batch_time(name: str) -> float | None:
    try:
        return datetime.strptime(name[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc).timestamp()
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
