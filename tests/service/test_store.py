"""The feedback store and export, on SQLite and on a throwaway PostgreSQL database: idempotent inserts, tokens,
claims that never skip a late commit nor export twice, recovery of an export that crashed."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pyarrow.parquet as pq
import pytest

from flywheel.data import rawstore
from service import export as export_mod
from service.auth import create_token, token_hash
from service.export import export
from service.store import FeedbackStore

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def _row(eid: str, **extra) -> dict:
    row = {
        "event_id": eid,
        "schema_version": 1,
        "timestamp": "2026-11-27T10:00:00Z",
        "conversation_id": "c1",
        "model_version": "flywheel-policy/1",
        "user_id": None,
        "prompt": '[{"role": "user", "content": "hi"}]',
        "n_turns": 1,
        "response": "hello",
        "response_chars": 5,
        "feedback_type": "thumbs",
        "thumbs": "up",
        "rating": None,
        "rejected": None,
        "correction": None,
        "polarity": 1,
        "pii_found": 0,
        **extra,
    }
    return {
        "event_id": eid,
        "received_at": "2026-11-28T10:00:00Z",
        "answer_id": None,
        "model_version": row["model_version"],
        "feedback_type": "thumbs",
        "user_id": None,
        "row": json.dumps(row),
    }


@pytest.fixture
def store(store_url):
    s = FeedbackStore(store_url)
    yield s
    s.close()


def _stored(raw) -> list[dict]:
    return [r for f in rawstore.batch_files(raw) for r in pq.read_table(f).to_pylist()]


def test_insert_is_idempotent_on_event_id(store):
    assert store.write([_row("a"), _row("b")]) == {"a", "b"}
    assert store.write([_row("b"), _row("c")]) == {"c"}
    assert store.event_ids() == ["a", "b", "c"]


def test_answers_and_tokens(store):
    store.write(
        [],
        [
            {
                "answer_id": "chatcmpl-1",
                "model_version": "flywheel-policy/2",
                "variant": "champion",
                "created_at": "2026-11-28T10:00:00Z",
            }
        ],
    )
    assert store.answer_versions(["chatcmpl-1", "nope"]) == {"chatcmpl-1": "flywheel-policy/2"}
    token, token_id = create_token(store, "feedback", "tests")
    assert token.startswith("fw_") and len(token) >= 40
    known = store.tokens()
    assert known == {token_hash(token): (token_id, "feedback")}
    assert token not in json.dumps(known)  # only the hash is kept
    with pytest.raises(ValueError, match="unknown scope"):
        create_token(store, "root")


def test_export_claims_each_row_once_and_a_late_commit_goes_in_the_next_batch(store, tmp_path):
    raw = tmp_path / "raw"
    store.write([_row(f"e{i}") for i in range(5)])
    first = export(store, raw, now=NOW)
    assert first.exported == 5 and len(first.batches) == 1
    # a row committed after the claim (a late commit) is left for the next export, never skipped
    store.write([_row("late")])
    second = export(store, raw, now=NOW)
    assert second.exported == 1
    third = export(store, raw, now=NOW)
    assert third.exported == 0 and third.batches == []
    rows = _stored(raw)
    assert sorted(r["event_id"] for r in rows) == sorted([f"e{i}" for i in range(5)] + ["late"])
    assert {r["batch_id"] for r in rows} == set(first.batches + second.batches)
    assert store.count(exported=False) == 0


def test_export_skips_events_the_raw_store_already_has(store, tmp_path):
    raw = tmp_path / "raw"
    store.write([_row("x1")])
    export(store, raw, now=NOW)
    # the same event id captured again under a new store (e.g. it was also ingested from a file)
    store.write([_row("x2")])
    with store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE feedback_events SET export_batch = NULL WHERE event_id = 'x1'")
    again = export(store, raw, now=NOW)
    assert again.exported == 1 and again.duplicates == 1
    assert sorted(r["event_id"] for r in _stored(raw)) == ["x1", "x2"]


def test_an_export_that_crashed_after_its_claim_is_finished_by_the_next(store, tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    store.write([_row(f"k{i}") for i in range(3)])

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export_mod.rawstore, "commit_batch", crash)
    with pytest.raises(OSError):
        export(store, raw, now=NOW)
    monkeypatch.undo()
    assert _stored(raw) == [] and len(store.pending_batches()) == 1
    store.write([_row("k3")])
    done = export(store, raw, now=NOW)
    assert done.exported == 4 and len(done.batches) == 2
    assert sorted(r["event_id"] for r in _stored(raw)) == ["k0", "k1", "k2", "k3"]
    assert store.pending_batches() == []
    assert list(raw.glob(f"{rawstore.TMP_PREFIX}*")) == []


def test_a_transaction_open_during_the_claim_is_exported_exactly_once(store, tmp_path):
    """PostgreSQL: the claim does not see the open insert, so the next export takes it. SQLite: the claim waits
    for the writer, then takes it. Either way it is exported once."""
    import threading
    import time

    from service.store import events

    raw = tmp_path / "raw"
    store.write([_row("early")])
    results = []
    with store.engine.connect() as conn:
        tx = conn.begin()
        conn.execute(events.insert(), [_row("open-tx")])
        worker = threading.Thread(target=lambda: results.append(export(store, raw, now=NOW)))
        worker.start()
        time.sleep(0.5)
        tx.commit()
    worker.join(30)
    results.append(export(store, raw, now=NOW))
    assert sum(r.exported for r in results) == 2
    assert sorted(r["event_id"] for r in _stored(raw)) == ["early", "open-tx"]


def test_erase_user_deletes_their_events_exported_or_not(store):
    rows = [_row("e1"), _row("e2"), _row("e3"), _row("e4")]
    for r, user in zip(rows, ["gone", "stay", "gone", None]):
        r["user_id"] = user
    store.write(rows[:2])
    store.claim("b1", "2026-11-28T12:00:00Z", "2026-11-28")  # e1 exported (claimed), e3 not yet
    store.write(rows[2:])
    assert store.erase_user("gone") == 2
    assert sorted(store.event_ids()) == ["e2", "e4"]
    assert store.erase_user("gone") == 0


def test_one_refused_request_never_fails_the_others_of_its_group_commit(store):
    """A NUL in an id (PostgreSQL refuses it; the contract now does too) or a NOT NULL violation once failed the
    whole group commit: every concurrent request got 503 and chats 500. Now only the refused request fails."""
    import asyncio

    from service.writer import GroupWriter

    groups = []
    write = store.write

    def recording_write(feedback, answer_rows=()):
        groups.append((len(feedback), len(answer_rows)))
        return write(feedback, answer_rows)

    store.write = recording_write
    bad = _row("bad\x00id") if store.dialect == "postgresql" else {**_row("bad"), "model_version": None}
    answer = {
        "answer_id": "chatcmpl-7",
        "model_version": "flywheel-policy/2",
        "variant": "champion",
        "created_at": "2026-11-28T10:00:00Z",
    }

    async def main():
        writer = GroupWriter(store, max_items=64)
        writer.start()
        try:
            calls = (
                [writer.write([_row(f"g{i}")]) for i in range(3)]
                + [writer.write([bad])]
                + [writer.write([], [answer]), writer.write([_row("g3"), _row("g4")])]
            )
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await writer.stop()

    results = asyncio.run(main())
    assert groups[0] == (6, 1)  # all six requests shared one commit first
    assert isinstance(results[3], Exception)  # the refused request fails ...
    assert results[:3] == [[True]] * 3 and results[4] == [] and results[5] == [True, True]  # ... alone
    assert sorted(store.event_ids()) == ["g0", "g1", "g2", "g3", "g4"]
    assert store.answer_versions(["chatcmpl-7"]) == {"chatcmpl-7": "flywheel-policy/2"}


def test_erase_user_finds_the_pseudonym_of_an_id_holding_personal_data(store, monkeypatch):
    from flywheel.redact import pseudonymise_id

    monkeypatch.setenv("FLYWHEEL_PSEUDONYM_KEY", "store-test-key-" + "y" * 32)
    rows = [_row("p1"), _row("p2"), _row("p3")]
    for r, user in zip(rows, [pseudonymise_id("ann@example.org"), "ann@example.org", "bob"]):
        r["user_id"] = user  # a row stored before pseudonyms, raw, too
    store.write(rows)
    assert store.erase_user("ann@example.org") == 2
    assert store.event_ids() == ["p3"]
