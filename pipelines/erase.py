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


def erase_user(user_id: str, raw_store: Path, prepared: Path) -> EraseResult:
    """Remove ``user_id``'s events from the raw store and every record built from them in the training sets."""
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
    return EraseResult(raw, records, touched)


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
