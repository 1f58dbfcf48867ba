"""pipelines.erase: a user's data leaves the raw store and the training sets; quarantine retention."""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flywheel.settings import PrepareParams
from pipelines import prepare, rawstore
from pipelines.erase import erase_user, purge_quarantine


@pytest.fixture
def store(demo_store, tmp_path):
    """A private copy of the demo store, with the training sets prepared from it."""
    raw = tmp_path / "raw"
    shutil.copytree(demo_store.raw, raw)
    prepared = tmp_path / "prepared"
    prepare.main(raw, PrepareParams(), prepared, tmp_path / "prepare.json")
    return raw, prepared


def rows(raw) -> list[dict]:
    return pa.concat_tables(pq.read_table(f) for f in rawstore.batch_files(raw)).to_pylist()


def records(prepared) -> list[dict]:
    return [json.loads(line) for p in sorted(prepared.glob("*.jsonl")) for line in p.read_text().splitlines()]


def test_erase_user_removes_their_rows_and_records_and_keeps_the_rest(store):
    raw, prepared = store
    before_rows, before_records = rows(raw), records(prepared)
    theirs = [r for r in before_rows if r["user_id"] == "user-03"]
    their_records = [r for r in before_records if "user-03" in r["user_ids"]]
    assert theirs and their_records

    result = erase_user("user-03", raw, prepared)

    assert result.raw_events == len(theirs)
    assert result.training_records == len(their_records)
    after_rows, after_records = rows(raw), records(prepared)
    assert all(r["user_id"] != "user-03" for r in after_rows)
    assert sorted(r["event_id"] for r in after_rows) == sorted(r["event_id"] for r in before_rows
                                                               if r["user_id"] != "user-03")
    assert sum(r["user_id"] is None for r in after_rows) == sum(r["user_id"] is None for r in before_rows) > 0
    assert all("user-03" not in r["user_ids"] for r in after_records)
    assert after_records == [r for r in before_records if "user-03" not in r["user_ids"]]
    assert result.files_rewritten and all(p.endswith(".jsonl") for p in result.files_rewritten)
    # rewritten in place, schema kept, nothing temporary left behind
    for f in rawstore.batch_files(raw):
        assert pq.read_schema(f).equals(rawstore.SCHEMA, check_metadata=False)
    assert not [p for p in raw.rglob("*") if p.name.startswith(rawstore.TMP_PREFIX)]
    assert not [p for p in prepared.iterdir() if p.name.startswith(".tmp-")]
    # the user's id is nowhere in the store any more
    for f in rawstore.batch_files(raw):
        assert "user-03" not in pq.read_table(f).column("user_id").to_pylist()


def test_erase_is_idempotent(store):
    raw, prepared = store
    erase_user("user-05", raw, prepared)
    snapshot = {p: p.read_bytes() for p in list(raw.rglob("*.parquet")) + list(prepared.glob("*.jsonl"))}
    again = erase_user("user-05", raw, prepared)
    assert (again.raw_events, again.training_records, again.files_rewritten) == (0, 0, [])
    assert {p: p.read_bytes() for p in snapshot} == snapshot


def test_unknown_user_changes_nothing(store):
    raw, prepared = store
    mtimes = {p: p.stat().st_mtime_ns for p in list(raw.rglob("*.parquet")) + list(prepared.glob("*.jsonl"))}
    result = erase_user("nobody", raw, prepared)
    assert (result.raw_events, result.training_records) == (0, 0)
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_batch_of_only_that_user_is_removed(tmp_path):
    raw = tmp_path / "raw"
    part = raw / "date=2026-11-27"
    part.mkdir(parents=True)
    base = {name: None for name in rawstore.SCHEMA.names}

    def write(name, users):
        table = pa.Table.from_pylist([{**base, "event_id": f"{name}-{i}", "user_id": u} for i, u in enumerate(users)],
                                     schema=rawstore.SCHEMA)
        pq.write_table(table, part / f"batch-{name}.parquet")

    write("a", ["gone", "gone"])
    write("b", ["gone", "stay", None])
    result = erase_user("gone", raw, tmp_path / "no-prepared-yet")
    assert result.raw_events == 3 and result.training_records == 0
    assert [f.name for f in rawstore.batch_files(raw)] == ["batch-b.parquet"]
    assert pq.read_table(part / "batch-b.parquet").column("user_id").to_pylist() == ["stay", None]


def test_erase_reaches_the_quarantine(tmp_path):
    q = tmp_path / "quarantine" / "20261127T000000Z-aaaa1111"
    q.mkdir(parents=True)
    base = {name: None for name in rawstore.SCHEMA.names}
    pq.write_table(pa.Table.from_pylist([{**base, "event_id": f"q-{i}", "user_id": u}
                                         for i, u in enumerate(["gone", "stay", None, "gone"])],
                                        schema=rawstore.SCHEMA), q / "batch.parquet")
    lines = [{"line": 1, "reason": "bad timestamp", "text": '{"event_id": "x", "user_id": "gone", "timestamp": 1}'},
             {"line": 2, "reason": "bad timestamp", "text": '{"event_id": "y", "user_id": "stay"}'},
             {"line": 3, "reason": "not JSON", "text": '{"user_id": "gone", '}]
    (q / "rejected-lines.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))

    result = erase_user("gone", tmp_path / "raw", tmp_path / "prepared", tmp_path / "quarantine")

    assert result.quarantined == 4
    assert pq.read_table(q / "batch.parquet").column("user_id").to_pylist() == ["stay", None]
    kept = [json.loads(x) for x in (q / "rejected-lines.jsonl").read_text().splitlines()]
    assert [x["line"] for x in kept] == [2]
    assert erase_user("gone", tmp_path / "raw", tmp_path / "prepared", tmp_path / "quarantine").quarantined == 0


def test_empty_user_id_is_refused(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        erase_user("", tmp_path / "raw", tmp_path / "prepared")


def _ts(s: str) -> float:
    return datetime.strptime(s, "%Y-%m-%d").replace(tzinfo=timezone.utc).timestamp()


def test_purge_quarantine_removes_only_batches_older_than_retention(tmp_path):
    q = tmp_path / "quarantine"
    # "edge" is exactly 30 days old: not older than the retention
    names = {"old": "20261001T120000Z-aaaa1111", "edge": "20261028T000000Z-bbbb2222",
             "recent": "20261120T080000Z-cccc3333", "today": "20261127T000000Z-dddd4444"}
    for name in names.values():
        (q / name).mkdir(parents=True)
        (q / name / "rejected-lines.jsonl").write_text("{}\n")
    odd_old, odd_new = q / "manual-copy", q / "another"
    odd_old.mkdir()
    odd_new.mkdir()
    os.utime(odd_old, (_ts("2026-09-01"), _ts("2026-09-01")))
    os.utime(odd_new, (_ts("2026-11-26"), _ts("2026-11-26")))
    (q / "notes.txt").write_text("a file, not a batch")

    removed = purge_quarantine(q, 30, now=_ts("2026-11-27"))

    assert sorted(removed) == sorted([names["old"], "manual-copy"])
    left = sorted(p.name for p in q.iterdir())
    assert left == sorted([names["edge"], names["recent"], names["today"], "another", "notes.txt"])


def test_purge_with_zero_retention_and_missing_folder(tmp_path):
    q = tmp_path / "quarantine"
    assert purge_quarantine(q, 30) == []
    (q / "20261127T000000Z-aaaa").mkdir(parents=True)
    assert purge_quarantine(q, 30, now=_ts("2026-11-27") + 3600) == []
    assert purge_quarantine(q, 0, now=_ts("2026-11-27") + 3600) == ["20261127T000000Z-aaaa"]
    assert list(q.iterdir()) == []
