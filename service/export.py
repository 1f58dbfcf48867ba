"""``flywheel export``: feedback captured by the service into the raw store, as one batch.

Rows are claimed by stamping them with the batch id in one transaction (so a row committed after the claim
waits for the next export, and none is taken twice), written through the raw store's own batch writer
(temporary file, fsync, rename), then the batch is marked committed. A crash between claim and commit leaves
a ``claimed`` batch that the next export finishes first: the file is named by the batch id, so it is
written once.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa

from flywheel.data import rawstore
from service.store import FeedbackStore


@dataclass
class ExportResult:
    batches: list[str] = field(default_factory=list)
    exported: int = 0  # rows written to the raw store
    duplicates: int = 0  # claimed rows whose event id the raw store already had (e.g. from a file ingest)
    files: list[str] = field(default_factory=list)


def _committed_file(raw_store: Path, batch_id: str) -> Path | None:
    found = sorted(raw_store.glob(f"date=*/batch-{batch_id}.parquet")) if raw_store.exists() else []
    return found[0] if found else None


def _write_batch(store: FeedbackStore, raw_store: Path, batch: dict, seen: set[str], result: ExportResult) -> None:
    batch_id = batch["batch_id"]
    done = _committed_file(raw_store, batch_id)
    if done is not None:  # committed before a crash, not yet marked
        store.finish_batch(batch_id, batch["events"], str(done))
        result.batches.append(batch_id)
        return
    tmp, writer = rawstore.new_batch_writer(raw_store, batch_id)
    written = 0
    try:
        for rows in store.claimed_rows(batch_id):
            keep = [r for r in rows if r["event_id"] not in seen]
            result.duplicates += len(rows) - len(keep)
            if not keep:
                continue
            seen.update(r["event_id"] for r in keep)
            for r in keep:
                r["ingested_at"], r["batch_id"] = batch["ingested_at"], batch_id
            writer.write_table(pa.Table.from_pylist(keep, schema=rawstore.SCHEMA))
            written += len(keep)
        writer.close()
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    final = None
    if written:
        final = rawstore.commit_batch(raw_store, tmp, batch["date"], batch_id)
        result.files.append(str(final))
    else:
        tmp.unlink(missing_ok=True)
    store.finish_batch(batch_id, written, str(final) if final else None)
    result.batches.append(batch_id)
    result.exported += written


def export(store: FeedbackStore, raw_store: Path, now: datetime | None = None) -> ExportResult:
    """Write every event not yet exported into ``raw_store`` as one new batch; returns the counts."""
    now = now or datetime.now(UTC)
    result = ExportResult()
    seen = rawstore.existing_ids(raw_store)
    for pending in store.pending_batches():
        _write_batch(store, raw_store, pending, seen, result)
    batch_id = now.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]
    batch = {"batch_id": batch_id, "ingested_at": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "date": now.strftime("%Y-%m-%d")}
    batch["events"] = store.claim(batch_id, batch["ingested_at"], batch["date"])
    if batch["events"]:
        _write_batch(store, raw_store, batch, seen, result)
    return result
