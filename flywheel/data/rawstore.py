"""The raw feedback store: append-only Parquet files, one per accepted batch, partitioned by ingestion date.

A batch is written to a temporary file, flushed to disk, then renamed into its partition: a reader
(or a crash) sees the store before the batch or with all of it, never half. The folder is tracked
with ``dvc add`` (not as a stage output, which DVC would delete before rerunning the stage).
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("schema_version", pa.int8()),
        ("timestamp", pa.string()),
        ("ingested_at", pa.string()),
        ("batch_id", pa.string()),
        ("conversation_id", pa.string()),
        ("model_version", pa.string()),
        ("user_id", pa.string()),
        ("prompt", pa.string()),  # JSON list of {role, content}
        ("n_turns", pa.int16()),
        ("response", pa.string()),
        ("response_chars", pa.int32()),
        ("feedback_type", pa.string()),
        ("thumbs", pa.string()),
        ("rating", pa.int8()),
        ("rejected", pa.string()),
        ("correction", pa.string()),
        ("polarity", pa.int8()),  # 1 positive, -1 negative, 0 neither
        ("pii_found", pa.int16()),
    ]
)
TMP_PREFIX = ".tmp-"


def batch_files(root: Path) -> list[Path]:
    """Every committed batch file, oldest partition first."""
    if not root.exists():
        return []
    return sorted(p for p in root.glob("date=*/*.parquet") if not p.name.startswith(TMP_PREFIX))


def read_columns(root: Path, columns: list[str]) -> pa.Table:
    """The given columns of the whole store (an empty table when the store is empty)."""
    files = batch_files(root)
    if not files:
        return SCHEMA.empty_table().select(columns)
    return pa.concat_tables(pq.read_table(f, columns=columns, schema=SCHEMA) for f in files)


def existing_ids(root: Path) -> set[str]:
    return set(read_columns(root, ["event_id"]).column("event_id").to_pylist())


def new_batch_writer(root: Path, batch_id: str) -> tuple[Path, pq.ParquetWriter]:
    """A writer on a temporary file inside the store; commit it with ``commit_batch``."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{TMP_PREFIX}{batch_id}.parquet"
    return tmp, pq.ParquetWriter(tmp, SCHEMA, compression="zstd")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_batch(root: Path, tmp: Path, date: str, batch_id: str) -> Path:
    """Durably move a finished temporary batch file into its date partition."""
    part = root / f"date={date}"
    part.mkdir(parents=True, exist_ok=True)
    final = part / f"batch-{batch_id}.parquet"
    _fsync(tmp)
    os.replace(tmp, final)
    _fsync(part)
    return final


def clean_temporary(root: Path) -> list[Path]:
    """Remove leftovers of batches that were never committed (a crash mid-ingest)."""
    left = list(root.glob(f"{TMP_PREFIX}*")) if root.exists() else []
    for p in left:
        p.unlink()
    return left


def rewrite_without(root: Path, column: str, value: str) -> int:
    """Drop every row whose ``column`` equals ``value``, file by file, atomically; returns rows removed."""
    removed = 0
    for f in batch_files(root):
        table = pq.read_table(f, schema=SCHEMA)
        keep = pa.compute.not_equal(table.column(column), pa.scalar(value))
        keep = pa.compute.fill_null(keep, True)
        kept = table.filter(keep)
        gone = table.num_rows - kept.num_rows
        if not gone:
            continue
        removed += gone
        if kept.num_rows == 0:
            f.unlink()
            continue
        tmp = f.with_name(TMP_PREFIX + f.name)
        pq.write_table(kept, tmp, compression="zstd")
        _fsync(tmp)
        os.replace(tmp, f)
    return removed
