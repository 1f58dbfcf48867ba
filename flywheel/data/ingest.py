"""Ingest feedback files into the raw store: contract check, redaction, de-duplication, batch checks.

``ingest()`` is the core; ``flywheel ingest`` is its edge. Lines are parsed and redacted in worker
processes (chunk by chunk, so memory stays flat), written to a temporary Parquet file, checked as a
batch with Great Expectations, then committed whole or quarantined whole.
"""

from __future__ import annotations

import json
import os
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa

from flywheel.contract import ContractError
from flywheel.data import rawstore
from flywheel.data.events import (  # noqa: F401  (ingest's names, defined there)
    FORMATS,
    IngestError,
    event_row,
    hh_to_event,
    parse_line,
    read_lines,
    split_dialogue,
)
from flywheel.params import ContractParams, IngestParams
from flywheel.redact import redact


@dataclass
class IngestResult:
    batch_id: str
    read: int = 0
    accepted: int = 0
    duplicates: int = 0
    quarantined: int = 0
    pii: dict[str, int] = field(default_factory=dict)
    failed_checks: list[str] = field(default_factory=list)
    batch_file: str | None = None
    quarantine_dir: str | None = None

    @property
    def ok(self) -> bool:
        return not self.failed_checks

    def summary(self) -> dict:
        return asdict(self)


@dataclass
class _Chunk:
    table: pa.Table  # accepted events, rawstore.SCHEMA (built in the worker)
    bad: list[tuple[int, str, str]]  # line number, reason, redacted line
    empty_lines: int
    pii: Counter


def _process_chunk(
    lines: list[tuple[int, bytes]], fmt: str, limits: tuple[int, int, int], batch_id: str, ingested_at: str
) -> _Chunk:
    max_chars, max_turns, max_bytes = limits
    rows: dict[str, list] = {name: [] for name in rawstore.SCHEMA.names}
    bad, pii, empty = [], Counter(), 0
    for n, raw in lines:
        try:
            if len(raw) > max_bytes:
                raise ContractError(f"line is {len(raw)} bytes, over the limit of {max_bytes}")
            event = parse_line(raw, fmt, ingested_at, max_chars, max_turns)
        except ContractError as exc:
            if "text is empty" in exc.reason:
                empty += 1
            text = raw.decode("utf-8", "replace")
            bad.append((n, redact(exc.reason), redact(text)))
            continue
        found: Counter = Counter()
        for name, value in event_row(event, found).items():
            rows[name].append(value)
        rows["ingested_at"].append(ingested_at)
        rows["batch_id"].append(batch_id)
        pii.update(found)
    return _Chunk(pa.Table.from_pydict(rows, schema=rawstore.SCHEMA), bad, empty, pii)


def _chunks(files: Iterable[Path], size: int) -> Iterator[list[tuple[int, bytes]]]:
    chunk: list[tuple[int, bytes]] = []
    for path in files:
        for item in read_lines(path):
            chunk.append(item)
            if len(chunk) >= size:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def _map_chunks(chunks: Iterator, args: tuple, workers: int) -> Iterator[_Chunk]:
    first = next(chunks, None)
    if first is None:
        return
    second = next(chunks, None)
    if second is None or workers <= 1:
        yield _process_chunk(first, *args)
        if second is not None:
            yield _process_chunk(second, *args)
            for c in chunks:
                yield _process_chunk(c, *args)
        return
    with ProcessPoolExecutor(workers) as pool:
        pending = [pool.submit(_process_chunk, first, *args), pool.submit(_process_chunk, second, *args)]
        for c in chunks:
            pending.append(pool.submit(_process_chunk, c, *args))
            yield pending.pop(0).result()
            # keep at most `workers + 1` chunks in flight so memory stays bounded
            while len(pending) > workers:
                yield pending.pop(0).result()
        for f in pending:
            yield f.result()


def ingest(
    files: list[Path],
    fmt: str,
    raw_store: Path,
    quarantine: Path,
    params: IngestParams,
    contract: ContractParams,
    workers: int | None = None,
    now: datetime | None = None,
) -> IngestResult:
    """Ingest ``files`` as one batch; returns the counts (read = accepted + duplicates + quarantined)."""
    from flywheel.data import batch_checks

    if fmt not in FORMATS:
        raise IngestError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not files:
        raise IngestError("no input files")
    for f in files:
        if not Path(f).is_file():
            raise IngestError(f"cannot read {f}: no such file")
    now = now or datetime.now(UTC)
    batch_id = now.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]
    ingested_at = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    result = IngestResult(batch_id=batch_id)
    rawstore.clean_temporary(raw_store)
    seen = rawstore.existing_ids(raw_store)
    workers = workers or min(2, os.cpu_count() or 1)
    args = (fmt, (contract.max_text_chars, contract.max_turns, contract.max_line_bytes), batch_id, ingested_at)
    qdir = quarantine / batch_id
    tmp, writer = rawstore.new_batch_writer(raw_store, batch_id)
    bad_file, first_bad = None, None
    parts: dict[str, list[np.ndarray]] = {"response_chars": [], "answer_hash": [], "polarity": [], "pii_found": []}
    empty_lines, pii = 0, Counter()
    try:
        for chunk in _map_chunks(_chunks(files, params.chunk_events), args, workers):
            result.read += chunk.table.num_rows + len(chunk.bad)
            empty_lines += chunk.empty_lines
            pii.update(chunk.pii)
            if chunk.bad:
                if bad_file is None:
                    qdir.mkdir(parents=True, exist_ok=True)
                    bad_file = open(qdir / "rejected-lines.jsonl", "w", encoding="utf-8")
                    first_bad = chunk.bad[0]
                for n, reason, text in chunk.bad:
                    bad_file.write(json.dumps({"line": n, "reason": reason, "text": text}, ensure_ascii=False) + "\n")
                result.quarantined += len(chunk.bad)
            keep = []
            for i, eid in enumerate(chunk.table.column("event_id").to_pylist()):
                if eid in seen:
                    result.duplicates += 1
                else:
                    seen.add(eid)
                    keep.append(i)
            if not keep:
                continue
            table = chunk.table
            if len(keep) < table.num_rows:
                table = table.take(keep)
            writer.write_table(table)
            result.accepted += table.num_rows
            # per-event figures for the batch checks: small numeric arrays (copies: no chunk stays alive)
            for name in ("response_chars", "polarity", "pii_found"):
                parts[name].append(np.array(table.column(name).to_numpy(), copy=True))
            parts["answer_hash"].append(
                np.fromiter((hash(r) for r in table.column("response").to_pylist()), np.int64, table.num_rows)
            )
        writer.close()
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if bad_file is not None:
            bad_file.close()
    result.pii = dict(pii)
    if result.read == 0:
        tmp.unlink(missing_ok=True)
        raise IngestError("empty input: no lines to ingest")
    if result.accepted == 0:
        tmp.unlink(missing_ok=True)
        result.quarantine_dir = str(qdir) if bad_file else None
        if result.quarantined == result.read:
            raise IngestError(
                f"no line of the input is a valid {fmt} event ({result.read} rejected, first: line "
                f"{first_bad[0]}: {first_bad[1]}); see {qdir / 'rejected-lines.jsonl'}"
            )
        return result
    try:
        stats = {k: np.concatenate(v) for k, v in parts.items()}
        previous = batch_checks.previous_negative_rate(raw_store)
        verdict = batch_checks.check_batch(stats, empty_lines, result.read, previous, params.checks, qdir)
        if verdict.failures:
            qdir.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, qdir / "batch.parquet")
            result.failed_checks = verdict.failures
            result.quarantined += result.accepted
            result.accepted = 0
            result.quarantine_dir = str(qdir)
            return result
        final = rawstore.commit_batch(raw_store, tmp, now.strftime("%Y-%m-%d"), batch_id)
    except BaseException:
        # a failed check run or commit leaves the store as it was: no half batch, no temporary file
        tmp.unlink(missing_ok=True)
        raise
    result.batch_file = str(final)
    result.quarantine_dir = str(qdir) if bad_file else None
    return result
