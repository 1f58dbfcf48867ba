"""flywheel.data.ingest: counts, de-duplication, quarantine, formats, batch checks, crash safety and redaction."""

from __future__ import annotations

import gzip
import json
import random
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shipped import shipped

from flywheel.data import batch_checks, rawstore
from flywheel.data import ingest as ingest_mod
from flywheel.data.ingest import IngestError, ingest
from flywheel.params import ContractParams, IngestParams

NOW = datetime(2026, 11, 27, 9, 30, tzinfo=UTC)


class Workspace:
    """A raw store and quarantine under ``root``; input files are written outside it, under ``inputs``."""

    def __init__(self, tmp_path: Path):
        self.root = tmp_path / "ws"
        self.raw = self.root / "data" / "raw"
        self.quarantine = self.root / "data" / "quarantine"
        self.inputs = tmp_path / "in"
        self.inputs.mkdir(parents=True)
        self._n = 0

    def run(
        self,
        files,
        fmt="native",
        params: IngestParams | None = None,
        contract: ContractParams | None = None,
        workers=1,
        now=NOW,
    ):
        return ingest(
            [Path(f) for f in files],
            fmt,
            self.raw,
            self.quarantine,
            params or shipped("ingest"),
            contract or shipped("contract"),
            workers=workers,
            now=now,
        )

    def file(self, items, name=None, gz=False) -> Path:
        self._n += 1
        path = self.inputs / (name or f"batch-{self._n}.jsonl" + (".gz" if gz else ""))
        data = b"".join(
            (json.dumps(i).encode() if isinstance(i, dict) else i.encode() if isinstance(i, str) else i) + b"\n"
            for i in items
        )
        path.write_bytes(gzip.compress(data) if gz else data)
        return path

    def stored(self) -> list[dict]:
        files = rawstore.batch_files(self.raw)
        return pa.concat_tables(pq.read_table(f) for f in files).to_pylist() if files else []

    def snapshot(self) -> dict[str, bytes]:
        """Every file of the raw store, temporary ones included, with its bytes."""
        if not self.raw.exists():
            return {}
        return {str(p.relative_to(self.raw)): p.read_bytes() for p in sorted(self.raw.rglob("*")) if p.is_file()}

    def temporaries(self) -> list[Path]:
        return [p for p in self.root.rglob("*") if p.name.startswith(rawstore.TMP_PREFIX)]


@pytest.fixture
def ws(tmp_path) -> Workspace:
    return Workspace(tmp_path)


def balanced(make_event, n, **overrides) -> list[dict]:
    """n valid events, thumbs alternating up / down, each with its own answer."""
    return [
        make_event(feedback={"type": "thumbs", "value": "up" if i % 2 == 0 else "down"}, **overrides) for i in range(n)
    ]


def bad_line(make_event, k: int) -> str:
    kinds = [
        lambda: "{this is not json",
        lambda: json.dumps(make_event(feedback={"type": "rating", "value": 9})),
        lambda: json.dumps(["an", "array"]),
        lambda: json.dumps({**make_event(), "extra": 1}),
        lambda: json.dumps(make_event(timestamp="2026-13-01T00:00:00Z")),
    ]
    return kinds[k % len(kinds)]()


# --- counts --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "good, bad, dup_within, dup_stored",
    [
        (5, 0, 0, 0),
        (5, 3, 0, 0),
        (5, 0, 2, 0),
        (5, 0, 0, 3),
        (5, 4, 2, 3),
        (0, 0, 0, 3),  # nothing new: all duplicates of stored events
        (0, 2, 0, 3),
        (1, 5, 1, 1),
        (30, 5, 6, 4),  # big enough for the rate checks to run
    ],
)
def test_counts_invariant(ws, make_event, good, bad, dup_within, dup_stored):
    stored = balanced(make_event, 4)
    if dup_stored:
        first = ws.run([ws.file(stored)])
        assert first.accepted == 4
    fresh = balanced(make_event, good)
    lines = [json.dumps(e) for e in fresh]
    lines += [bad_line(make_event, k) for k in range(bad)]
    # a repeated id counts as a duplicate even when the rest of the event differs
    lines += [json.dumps({**fresh[k % good], "response": f"changed {k}"}) for k in range(dup_within)]
    lines += [json.dumps(e) for e in stored[:dup_stored]]
    random.Random(good * 100 + bad).shuffle(lines)
    lines.insert(len(lines) // 2, "")  # blank lines are skipped, not counted
    before = len(ws.stored())

    result = ws.run([ws.file(lines)])

    assert result.read == result.accepted + result.duplicates + result.quarantined
    assert (result.read, result.accepted, result.duplicates, result.quarantined) == (
        good + bad + dup_within + dup_stored,
        good,
        dup_within + dup_stored,
        bad,
    )
    assert result.ok
    assert len(ws.stored()) == before + good
    assert (result.batch_file is not None) == (good > 0)
    assert (result.quarantine_dir is not None) == (bad > 0)


def test_repeated_event_id_is_a_duplicate_within_and_across_batches(ws, make_event):
    a, b, c = make_event(), make_event(), make_event()
    first = ws.run([ws.file([a, b, {**a, "response": "a second, different answer"}])])
    assert (first.accepted, first.duplicates) == (2, 1)
    second = ws.run([ws.file([b, c])])
    assert (second.accepted, second.duplicates) == (1, 1)
    third = ws.run([ws.file([a, b, c])])
    assert (third.read, third.accepted, third.duplicates) == (3, 0, 3)
    assert third.batch_file is None

    rows = ws.stored()
    ids = [r["event_id"] for r in rows]
    assert sorted(ids) == sorted([a["event_id"], b["event_id"], c["event_id"]])
    assert next(r for r in rows if r["event_id"] == a["event_id"])["response"] == a["response"]  # the first kept
    assert len(rawstore.batch_files(ws.raw)) == 2


def test_batch_file_lands_in_its_date_partition(ws, make_event):
    result = ws.run([ws.file([make_event()])], now=datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC))
    path = Path(result.batch_file)
    assert path.parent == ws.raw / "date=2026-03-04"
    assert path.name == f"batch-{result.batch_id}.parquet"
    assert result.batch_id.startswith("20260304T050607Z-")
    row = pq.read_table(path).to_pylist()[0]
    assert row["batch_id"] == result.batch_id and row["ingested_at"] == "2026-03-04T05:06:07Z"
    assert pq.read_schema(path).equals(rawstore.SCHEMA, check_metadata=False)


# --- quarantined lines ---------------------------------------------------------------------------------------------


def test_bad_lines_go_to_quarantine_with_line_number_and_reason(ws, make_event):
    good1, good2 = make_event(), make_event()
    lines = [
        json.dumps(good1),  # 1
        '{"event_id": "broken',  # 2
        "",  # 3 (blank, skipped)
        json.dumps(make_event(feedback={"type": "rating", "value": 6})),  # 4
        json.dumps(good2),  # 5
        b'{"event_id": "\xff\xfe"}',  # 6
        "42",  # 7
        json.dumps(make_event(response="   ")),  # 8
    ]
    result = ws.run([ws.file(lines)])
    assert (result.read, result.accepted, result.quarantined) == (7, 2, 5)
    qfile = ws.quarantine / result.batch_id / "rejected-lines.jsonl"
    assert result.quarantine_dir == str(ws.quarantine / result.batch_id)
    rejected = [json.loads(line) for line in qfile.read_text(encoding="utf-8").splitlines()]
    assert [r["line"] for r in rejected] == [2, 4, 6, 7, 8]
    reasons = {r["line"]: r["reason"] for r in rejected}
    assert "invalid JSON" in reasons[2]
    assert "feedback.rating.value" in reasons[4]
    assert "UTF-8" in reasons[6]
    assert "JSON object" in reasons[7]
    assert "response: text is empty" in reasons[8]
    assert all(r["text"] for r in rejected)
    assert rejected[0]["text"] == '{"event_id": "broken'
    assert {r["event_id"] for r in ws.stored()} == {good1["event_id"], good2["event_id"]}


def test_line_over_max_line_bytes_is_quarantined(ws, make_event):
    small, big = make_event(), make_event(response="b" * 600)
    result = ws.run([ws.file([small, big])], contract=shipped("contract", max_line_bytes=500))
    assert (result.accepted, result.quarantined) == (1, 1)
    rejected = json.loads((ws.quarantine / result.batch_id / "rejected-lines.jsonl").read_text())
    assert rejected["line"] == 2 and "bytes, over the limit of 500" in rejected["reason"]


def test_contract_limits_come_from_params(ws, make_event):
    short = [{"role": "user", "content": "q"}]
    events = [
        make_event(prompt=short, response="r" * 30),
        make_event(prompt=short, response="r" * 31),
        make_event(prompt=short * 3, response="r"),
    ]
    result = ws.run([ws.file(events)], contract=shipped("contract", max_text_chars=30, max_turns=2))
    assert (result.accepted, result.quarantined) == (1, 2)


# --- formats -------------------------------------------------------------------------------------------------------


def hh(chosen_turns: list[tuple[str, str]], rejected_turns: list[tuple[str, str]]) -> dict:
    def text(turns):
        return "".join(f"\n\n{who}: {what}" for who, what in turns)

    return {"chosen": text(chosen_turns), "rejected": text(rejected_turns)}


def test_hh_rlhf_rows_become_preference_events(ws):
    single = hh(
        [("Human", "How do I boil an egg?"), ("Assistant", "Simmer it for eight minutes.")],
        [("Human", "How do I boil an egg?"), ("Assistant", "Microwave it.")],
    )
    dialogue = [("Human", "Hi"), ("Assistant", "Hello! How can I help?"), ("Human", "Name a blue fruit.")]
    multi = hh(dialogue + [("Assistant", "Blueberries.")], dialogue + [("Assistant", "Bananas.")])
    result = ws.run([ws.file([single, multi])], fmt="hh-rlhf")
    assert (result.read, result.accepted, result.quarantined) == (2, 2, 0)

    rows = {r["response"]: r for r in ws.stored()}
    egg = rows["Simmer it for eight minutes."]
    assert egg["feedback_type"] == "preference" and egg["rejected"] == "Microwave it."
    assert json.loads(egg["prompt"]) == [{"role": "user", "content": "How do I boil an egg?"}]
    assert egg["event_id"].startswith("hh-") and egg["model_version"] == "hh-rlhf"
    assert egg["timestamp"] == egg["ingested_at"] == "2026-11-27T09:30:00Z"
    fruit = rows["Blueberries."]
    assert fruit["rejected"] == "Bananas."
    assert json.loads(fruit["prompt"]) == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Name a blue fruit."},
    ]
    assert fruit["n_turns"] == 3 and fruit["polarity"] == 0

    again = ws.run([ws.file([multi, single])], fmt="hh-rlhf")  # same rows: same ids
    assert (again.accepted, again.duplicates) == (0, 2)


@pytest.mark.parametrize(
    "row, reason",
    [
        (
            hh([("Human", "Q one"), ("Assistant", "A")], [("Human", "Q two"), ("Assistant", "B")]),
            "do not share the dialogue",
        ),
        (
            hh(
                [("Human", "Q"), ("Assistant", "A"), ("Human", "more"), ("Assistant", "C")],
                [("Human", "Q"), ("Assistant", "B"), ("Human", "more"), ("Assistant", "D")],
            ),
            "do not share the dialogue",
        ),
        (
            {"chosen": "\n\nHuman: Q\n\nAssistant: ", "rejected": "\n\nHuman: Q\n\nAssistant: B"},
            "response: text is empty",
        ),
        (
            {"chosen": "\n\nHuman: Q\n\nAssistant: A", "rejected": "\n\nHuman: Q\n\nAssistant:  "},
            "feedback.preference.rejected: text is empty",
        ),
        (
            hh([("Human", "Q"), ("Assistant", "Same")], [("Human", "Q"), ("Assistant", "Same")]),
            "rejected equals response",
        ),
        (hh([("Human", "Q")], [("Human", "Q")]), "does not end with an assistant turn"),
        ({"chosen": "\n\nHuman: Q\n\nAssistant: A"}, "needs string fields"),
        ({"chosen": 1, "rejected": 2}, "needs string fields"),
        ("[1, 2]", "needs string fields"),
        ("{oops", "invalid JSON"),
    ],
)
def test_hh_rlhf_bad_rows_are_quarantined(ws, row, reason):
    good = hh(
        [("Human", "Fine question"), ("Assistant", "Fine answer")],
        [("Human", "Fine question"), ("Assistant", "Poor answer")],
    )
    result = ws.run([ws.file([good, row])], fmt="hh-rlhf")
    assert (result.accepted, result.quarantined) == (1, 1)
    rejected = json.loads((ws.quarantine / result.batch_id / "rejected-lines.jsonl").read_text())
    assert rejected["line"] == 2 and reason in rejected["reason"]


def test_demo_hh_batches_quarantine_their_broken_rows(demo_store):
    native, hh1, hh2 = demo_store.results
    assert (native.read, native.accepted, native.quarantined) == (44, 44, 0)
    assert (hh1.read, hh1.accepted, hh1.quarantined) == (745, 743, 2)
    assert (hh2.read, hh2.accepted, hh2.quarantined) == (746, 743, 3)
    reasons = [
        json.loads(line)["reason"]
        for r in (hh1, hh2)
        for line in (Path(r.quarantine_dir) / "rejected-lines.jsonl").read_text().splitlines()
    ]
    assert sum("text is empty" in r for r in reasons) == 2
    assert sum("do not share the dialogue" in r for r in reasons) == 3


def test_gzip_input(ws, demo_files, native_events):
    gz = ws.inputs / "native.jsonl.gz"
    gz.write_bytes(gzip.compress(demo_files["native"].read_bytes()))
    result = ws.run([gz])
    assert (result.read, result.accepted) == (44, 44)
    assert {r["event_id"] for r in ws.stored()} == {e["event_id"] for e in native_events}


def test_several_files_are_one_batch(ws, demo_files):
    gz = ws.inputs / "native.jsonl.gz"
    gz.write_bytes(gzip.compress(demo_files["native"].read_bytes()))
    result = ws.run([demo_files["native"], gz])
    assert (result.read, result.accepted, result.duplicates) == (88, 44, 44)
    assert len(rawstore.batch_files(ws.raw)) == 1


def test_feedback_columns(ws, make_event):
    events = {
        "up": make_event(feedback={"type": "thumbs", "value": "up"}),
        "down": make_event(feedback={"type": "thumbs", "value": "down"}),
        "r5": make_event(feedback={"type": "rating", "value": 5}),
        "r3": make_event(feedback={"type": "rating", "value": 3}),
        "r1": make_event(feedback={"type": "rating", "value": 1}),
        "pref": make_event(feedback={"type": "preference", "rejected": "Worse."}),
        "fix": make_event(feedback={"type": "correction", "text": "Better."}),
    }
    ws.run([ws.file(events.values())])
    rows = {r["event_id"]: r for r in ws.stored()}

    def cols(key):
        r = rows[events[key]["event_id"]]
        return r["feedback_type"], r["thumbs"], r["rating"], r["rejected"], r["correction"], r["polarity"]

    assert cols("up") == ("thumbs", "up", None, None, None, 1)
    assert cols("down") == ("thumbs", "down", None, None, None, -1)
    assert cols("r5") == ("rating", None, 5, None, None, 1)
    assert cols("r3") == ("rating", None, 3, None, None, 0)
    assert cols("r1") == ("rating", None, 1, None, None, -1)
    assert cols("pref") == ("preference", None, None, "Worse.", None, 0)
    assert cols("fix") == ("correction", None, None, None, "Better.", -1)
    some = rows[events["up"]["event_id"]]
    assert json.loads(some["prompt"]) == events["up"]["prompt"]
    assert some["user_id"] == events["up"]["user_id"] and some["n_turns"] == 1
    assert some["response_chars"] == len(events["up"]["response"])


# --- whole-input errors --------------------------------------------------------------------------------------------


def _input(ws: Workspace, case: str, demo_files) -> tuple[list[Path], str]:
    if case == "empty file":
        return [ws.file([], name="empty.jsonl")], "native"
    if case == "blank lines only":
        return [ws.file(["", "   ", "\t"], name="blank.jsonl")], "native"
    if case == "empty gzip":
        return [ws.file([], name="empty.jsonl.gz", gz=True)], "native"
    if case == "missing file":
        return [ws.inputs / "nope.jsonl"], "native"
    if case == "a directory":
        return [ws.inputs], "native"
    if case == "corrupt gzip":
        bad = ws.inputs / "bad.jsonl.gz"
        bad.write_bytes(b"\x1f\x8b\x08\x00garbage-not-deflate" * 4)
        return [bad], "native"
    if case == "truncated gzip":
        data = gzip.compress(demo_files["native"].read_bytes())
        cut = ws.inputs / "cut.jsonl.gz"
        cut.write_bytes(data[: len(data) // 2])
        return [cut], "native"
    if case == "unknown format":
        return [demo_files["native"]], "csv"
    if case == "no files":
        return [], "native"
    if case == "hh-rlhf file read as native":
        return [demo_files["hh1"]], "native"
    if case == "native file read as hh-rlhf":
        return [demo_files["native"]], "hh-rlhf"
    if case == "csv file":
        return [ws.file(["id,rating", "1,5", "2,3"], name="data.csv")], "native"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty file", "empty input"),
        ("blank lines only", "empty input"),
        ("empty gzip", "empty input"),
        ("missing file", "no such file"),
        ("a directory", "cannot read"),
        ("corrupt gzip", "cannot read"),
        ("truncated gzip", "cannot read"),
        ("unknown format", "unknown format 'csv'"),
        ("no files", "no input files"),
        ("hh-rlhf file read as native", "no line of the input is a valid native event"),
        ("native file read as hh-rlhf", "no line of the input is a valid hh-rlhf event"),
        ("csv file", "no line of the input is a valid native event"),
    ],
)
def test_whole_input_errors(ws, make_event, demo_files, case, message):
    ws.run([ws.file([make_event()])])
    before = ws.snapshot()
    files, fmt = _input(ws, case, demo_files)
    with pytest.raises(IngestError) as err:
        ws.run(files, fmt=fmt)
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert ws.snapshot() == before
    assert ws.temporaries() == []


# --- batch checks --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case, label",
    [
        ("duplicate answers", "share of duplicate answers"),
        ("personal data", "rate of personal data found"),
    ],
)
def test_batch_failing_a_check_is_quarantined_whole(ws, make_event, case, label):
    ws.run([ws.file(balanced(make_event, 6))])
    before = ws.snapshot()
    params = shipped("ingest")
    if case == "duplicate answers":
        events = balanced(make_event, 30, response="The very same answer every time.")
    else:
        events = balanced(make_event, 30, prompt=[{"role": "user", "content": "Mail me at jane.roe@example.org"}])
        params = shipped("ingest", checks={"max_pii_rate": 0.2})
    result = ws.run([ws.file(events + ["{bad line"])], params=params)

    assert not result.ok
    assert (result.read, result.accepted, result.duplicates, result.quarantined) == (31, 0, 0, 31)
    assert result.batch_file is None
    assert len(result.failed_checks) == 1 and label in result.failed_checks[0]
    qdir = ws.quarantine / result.batch_id
    assert result.quarantine_dir == str(qdir)
    assert pq.read_table(qdir / "batch.parquet").num_rows == 30
    assert (qdir / "rejected-lines.jsonl").read_text().count("\n") == 1
    assert (qdir / "data_docs" / "index.html").is_file()
    checks = json.loads((qdir / "checks.json").read_text())
    assert checks["success"] is False and checks["failures"] == result.failed_checks
    assert checks["data_docs"] == str(qdir / "data_docs" / "index.html")
    assert ws.snapshot() == before
    assert ws.temporaries() == []


def test_passing_batch_leaves_no_check_report(ws, make_event):
    result = ws.run([ws.file(balanced(make_event, 24))])
    assert result.ok and result.accepted == 24
    assert not ws.quarantine.exists() or not any(ws.quarantine.iterdir())


# --- crash safety --------------------------------------------------------------------------------------------------


class Boom(RuntimeError):
    pass


def _crash(monkeypatch, where: str):
    calls = {"n": 0}

    def second_call_raises(real, exc=Boom):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                raise exc("crash")
            return real(*args, **kwargs)

        return wrapper

    if where == "commit":
        real_fsync = rawstore._fsync

        def commit(root, tmp, date, batch_id):  # dies after flushing, before the rename
            real_fsync(tmp)
            raise Boom("disk gone")

        monkeypatch.setattr(rawstore, "commit_batch", commit)
    elif where == "writer":
        real_new = rawstore.new_batch_writer

        def new_writer(root, batch_id):
            tmp, writer = real_new(root, batch_id)
            writer.write_table = second_call_raises(writer.write_table)
            return tmp, writer

        monkeypatch.setattr(rawstore, "new_batch_writer", new_writer)
    elif where == "parser":
        monkeypatch.setattr(ingest_mod, "_process_chunk", second_call_raises(ingest_mod._process_chunk))
    elif where == "interrupt":
        monkeypatch.setattr(
            ingest_mod, "_process_chunk", second_call_raises(ingest_mod._process_chunk, KeyboardInterrupt)
        )
    elif where == "checks":

        def check(*args, **kwargs):
            raise Boom("checks crashed")

        monkeypatch.setattr(batch_checks, "check_batch", check)
    else:
        raise AssertionError(where)


@pytest.mark.parametrize("where", ["commit", "writer", "parser", "interrupt", "checks"])
def test_crash_mid_ingest_leaves_store_unchanged(ws, make_event, monkeypatch, where):
    ws.run([ws.file(balanced(make_event, 6))])
    before = ws.snapshot()
    ids_before = rawstore.existing_ids(ws.raw)
    new = balanced(make_event, 12)
    path = ws.file(new)
    params = shipped("ingest", chunk_events=5)

    with monkeypatch.context() as m:
        _crash(m, where)
        with pytest.raises((Boom, KeyboardInterrupt)):
            ws.run([path], params=params)

    assert ws.snapshot() == before
    assert ws.temporaries() == []
    assert rawstore.existing_ids(ws.raw) == ids_before
    # nothing of the failed attempt lingers: the same batch goes in whole on the next try
    again = ws.run([path], params=params)
    assert (again.accepted, again.duplicates) == (12, 0)


def test_leftover_temporary_file_is_cleaned_by_next_ingest(ws, make_event):
    ws.run([ws.file([make_event()])])
    leftover = ws.raw / f"{rawstore.TMP_PREFIX}20260101T000000Z-dead.parquet"
    leftover.write_bytes(b"half a batch")
    assert len(rawstore.batch_files(ws.raw)) == 1  # never read as a batch
    ws.run([ws.file([make_event()])])
    assert not leftover.exists()
    assert len(rawstore.batch_files(ws.raw)) == 2


# --- the process pool ----------------------------------------------------------------------------------------------


def test_process_pool_gives_the_same_result(tmp_path, monkeypatch, demo_files):
    created = []

    class SpyPool(ingest_mod.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            created.append(args)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(ingest_mod, "ProcessPoolExecutor", SpyPool)
    files = [demo_files["native"], demo_files["hh1"]]
    params = shipped("ingest", chunk_events=40)
    one, two = Workspace(tmp_path / "one"), Workspace(tmp_path / "two")
    r1 = one.run(files, fmt="native", params=params, workers=1)
    assert created == []
    r2 = two.run(files, fmt="native", params=params, workers=2)
    assert created == [(2,)]
    # the hh-rlhf lines break the native contract; the counts and what is stored must not depend on workers
    for r in (r1, r2):
        assert (r.read, r.accepted, r.quarantined) == (44 + 745, 44, 745)
    assert r1.pii == r2.pii

    def content(w):
        return sorted((r["event_id"], r["prompt"], r["response"], r["polarity"]) for r in w.stored())

    assert content(one) == content(two)
    lines = [json.loads(x)["line"] for x in (Path(r2.quarantine_dir) / "rejected-lines.jsonl").read_text().splitlines()]
    assert sorted(lines) == lines and len(lines) == 745  # written in input order


def test_process_pool_hh_rlhf(tmp_path, demo_files):
    w = Workspace(tmp_path)
    r = w.run([demo_files["hh1"]], fmt="hh-rlhf", params=shipped("ingest", chunk_events=100), workers=2)
    assert (r.read, r.accepted, r.quarantined) == (745, 743, 2)
    assert len({row["event_id"] for row in w.stored()}) == 743


# --- personal data never lands ---------------------------------------------------------------------------------------

PLANTED = [
    "jane.roe@example.org",
    "4111 1111 1111 1111",
    "DE89 3704 0044 0532 0130 00",
    "+1 415-555-0132",
    "192.168.10.24",
    "415-555-0132",
    "4111111111111111",
    "DE89370400440532013000",
    "2001:db8::7",
    "sam.doe@example.net",
    "(415) 555-0199",
]


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def test_planted_personal_data_never_lands_in_the_workspace(ws, make_event, demo_files):
    # 1. the native demo batch (email, card, IBAN and IP planted in prompts)
    native = ws.run([demo_files["native"]])
    assert native.accepted == 44 and native.pii == {"card": 1, "email": 1, "iban": 1, "ip": 1}
    # 2. planted in every text field, and in lines that are rejected
    extra = [
        make_event(response="Call the clinic on +1 415-555-0132 tomorrow."),
        make_event(
            prompt=[
                {"role": "system", "content": "Customer card 4111111111111111."},
                {"role": "user", "content": "Where is my refund?"},
                {"role": "assistant", "content": "Your IP 2001:db8::7 was logged."},
                {"role": "user", "content": "And (415) 555-0199 is my desk phone."},
            ]
        ),
        make_event(feedback={"type": "correction", "text": "Write to sam.doe@example.net instead."}),
        make_event(feedback={"type": "preference", "rejected": "Send it to DE89370400440532013000."}),
        '{"event_id": "bad", "response": "mail jane.roe@example.org or +1 415-555-0132',
        json.dumps(
            make_event(
                prompt=[{"role": "user", "content": "card 4111 1111 1111 1111"}],
                feedback={"type": "rating", "value": 9},
            )
        ),
        json.dumps(make_event(feedback={"type": "sam.doe@example.net"})),
        b'{"x": "\xff 192.168.10.24 DE89 3704 0044 0532 0130 00"}',
    ]
    mixed = ws.run([ws.file(extra)])
    assert (mixed.accepted, mixed.quarantined) == (4, 4)
    # 3. a batch quarantined whole, every event carrying personal data
    pii_batch = [
        make_event(
            feedback={"type": "thumbs", "value": "up" if i % 2 else "down"},
            prompt=[
                {
                    "role": "user",
                    "content": f"I am jane.roe@example.org, card 4111 1111 1111 1111,"
                    f" phone +1 415-555-0132, ip 192.168.10.24 ({i})",
                }
            ],
            response=f"Noted, refund to DE89 3704 0044 0532 0130 00 ({i}).",
        )
        for i in range(25)
    ]
    whole = ws.run([ws.file(pii_batch)], params=shipped("ingest", checks={"max_pii_rate": 0.1}))
    assert whole.failed_checks and (Path(whole.quarantine_dir) / "batch.parquet").is_file()

    files = [p for p in ws.root.rglob("*") if p.is_file()]
    assert any(p.suffix == ".html" for p in files) and any(p.name == "rejected-lines.jsonl" for p in files)
    placeholders = set()
    parquet_files = 0
    for path in files:
        data = path.read_bytes()
        for planted in PLANTED:
            assert planted.encode() not in data, (planted, path)
        texts: list[str] = []
        if path.suffix == ".parquet":
            parquet_files += 1
            table = pq.read_table(path)
            for col in table.column_names:
                if pa.types.is_string(table.schema.field(col).type):
                    texts += [v for v in table.column(col).to_pylist() if v is not None]
            texts += [s for p in table.column("prompt").to_pylist() for s in _strings(json.loads(p))]
        elif path.suffix == ".json":
            texts += list(_strings(json.loads(data)))
        elif path.suffix == ".jsonl":
            for line in data.decode("utf-8").splitlines():
                if line.strip():
                    texts += list(_strings(json.loads(line)))
        for text in texts:
            for planted in PLANTED:
                assert planted not in text, (planted, path, text)
            placeholders.update(k for k in ("[EMAIL]", "[PHONE]", "[CARD]", "[IBAN]", "[IP]") if k in text)
    assert parquet_files == 3  # two committed batches and the quarantined one
    assert placeholders == {"[EMAIL]", "[PHONE]", "[CARD]", "[IBAN]", "[IP]"}  # redacted, not dropped


def test_native_demo_pii_is_redacted_in_place(demo_store):
    rows = {
        r["event_id"]: r
        for r in pa.concat_tables(pq.read_table(f) for f in rawstore.batch_files(demo_store.raw)).to_pylist()
    }
    assert json.loads(rows["native-0012"]["prompt"])[0]["content"].startswith("I paid with card [CARD] and never")
    assert rows["native-0012"]["pii_found"] == 1
    assert "[EMAIL]" in rows["native-0030"]["prompt"] and "[IBAN]" in rows["native-0018"]["prompt"]
    assert "[IP]" in rows["native-0024"]["prompt"]
    assert rows["native-0022"]["pii_found"] == 0


def test_result_summary_is_plain_data(ws, make_event):
    result = ws.run([ws.file([make_event()])])
    summary = result.summary()
    assert json.loads(json.dumps(summary)) == summary
    assert summary["accepted"] == 1 and summary["failed_checks"] == []


def test_no_track_is_refused_when_a_dvc_remote_is_set(tmp_path, make_event, repo_root):
    """An untracked batch is never published, and the next sync from the remote would delete it."""
    import os
    import shutil
    import subprocess
    import sys

    root = tmp_path / "ws"
    root.mkdir()
    shutil.copy(repo_root / "params.yaml", root / "params.yaml")
    batch = tmp_path / "b.jsonl"
    batch.write_text("".join(json.dumps(e) + "\n" for e in balanced(make_event, 6)))
    env = {**os.environ, "FLYWHEEL_ROOT": str(root), "FLYWHEEL_DVC_REMOTE": str(tmp_path / "remote")}
    flywheel = str(Path(sys.executable).with_name("flywheel"))
    for args in (["ingest", str(batch), "--no-track"], ["export", "--no-track"]):
        proc = subprocess.run([flywheel, *args], cwd=root, env=env, text=True, capture_output=True)
        assert proc.returncode == 2 and "--no-track cannot be used with a DVC remote" in proc.stderr, proc.stderr
    assert not rawstore.batch_files(root / "data" / "raw")


# --- feedback logged elsewhere: OpenAI-style chat-completion logs (flywheel/data/sources.py) -------------------------
OPENAI_LOG = Path(__file__).parents[1] / "fixtures" / "openai-log.jsonl"


def test_openai_log_lines_become_events_and_each_unmappable_record_is_quarantined_with_its_reason(ws):
    res = ws.run([OPENAI_LOG], fmt="openai-log")
    assert (res.read, res.accepted, res.duplicates, res.quarantined) == (16, 8, 1, 7), res.summary()
    rows = pq.read_table(res.batch_file).to_pylist()
    by_id = {r["event_id"]: r for r in rows}
    assert set(by_id) == {
        "openai-chatcmpl-001-thumbs",
        "openai-chatcmpl-002-thumbs",
        "openai-chatcmpl-003-rating",
        "openai-chatcmpl-004-correction",
        "openai-chatcmpl-005-rejected",
        "openai-chatcmpl-006-thumbs",
        "openai-chatcmpl-007-thumbs",
        "openai-chatcmpl-008-rating",
    }
    one, two = by_id["openai-chatcmpl-001-thumbs"], by_id["openai-chatcmpl-002-thumbs"]
    assert (
        one["model_version"] == "acme-chat-7b-v3"
        and one["thumbs"] == "up"
        and one["timestamp"] == "2025-12-01T00:00:01Z"
    )
    assert one["conversation_id"] == "chatcmpl-001" and two["conversation_id"] == "conv-2" and two["thumbs"] == "down"
    assert json.loads(one["prompt"])[0] == {"role": "system", "content": "Be brief."}
    assert by_id["openai-chatcmpl-003-rating"]["rating"] == 4 and by_id["openai-chatcmpl-008-rating"]["rating"] == 2
    assert by_id["openai-chatcmpl-004-correction"]["feedback_type"] == "correction"
    assert by_id["openai-chatcmpl-005-rejected"]["rejected"] == "Answer 5: eggs cannot be boiled."
    assert by_id["openai-chatcmpl-006-thumbs"]["timestamp"] == "2026-11-30T10:00:00Z"
    seven = json.loads(by_id["openai-chatcmpl-007-thumbs"]["prompt"])
    assert seven == [
        {"role": "system", "content": "Answer in one line."},
        {"role": "user", "content": "Question 7:\neggs?"},
    ]
    reasons = {
        r["line"]: r["reason"]
        for f in Path(res.quarantine_dir).glob("*.jsonl")
        for r in map(json.loads, f.read_text().splitlines())
    }
    assert sorted(reasons) == [10, 11, 12, 13, 14, 15, 16], reasons
    assert reasons[10].startswith("invalid JSON")
    assert "needs objects 'request'" in reasons[11]
    assert "exactly one of thumbs, rating, correction, rejected per record (found thumbs, rating)" in reasons[12]
    assert reasons[13].startswith("feedback.rating") or "rating" in reasons[13]
    assert "request.messages[0].role: 'tool'" in reasons[14]
    assert "response.id" in reasons[15]
    assert "feedback.thumbs: 'sideways'" in reasons[16]


LANGFUSE = Path(__file__).parents[1] / "fixtures" / "langfuse-export.json"


def test_a_langfuse_export_becomes_one_event_per_human_score_and_a_score_without_its_trace_is_quarantined(ws):
    from flywheel.data.sources import langfuse_records

    lines, counts = langfuse_records(LANGFUSE.read_bytes())
    assert counts == {"traces": 3, "scores": 9, "skipped_not_human": 1}  # sc-5 is an LLM judge's (EVAL)
    path = ws.inputs / "scores.jsonl"
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    res = ws.run([path], fmt="langfuse-score")
    assert (res.read, res.accepted, res.duplicates, res.quarantined) == (8, 5, 0, 3), res.summary()
    by_id = {r["event_id"]: r for r in pq.read_table(res.batch_file).to_pylist()}
    assert sorted(by_id) == [f"langfuse-sc-{i}" for i in ("1", "2", "3", "4", "embedded")]
    one = by_id["langfuse-sc-1"]
    assert one["thumbs"] == "up" and one["conversation_id"] == "sess-1" and one["model_version"] == "bot-2026.11"
    assert json.loads(one["prompt"]) == [{"role": "user", "content": "How do I reset my password?"}]
    assert one["response"] == "Open Settings, then Security, then Reset."
    assert by_id["langfuse-sc-2"]["rating"] == 4 and by_id["langfuse-sc-3"]["thumbs"] == "down"
    assert by_id["langfuse-sc-4"]["correction"].startswith("I have cancelled order")
    assert by_id["langfuse-sc-embedded"]["thumbs"] == "down" and by_id["langfuse-sc-embedded"]["model_version"] == "v7"
    reasons = sorted(
        json.loads(x)["reason"] for f in Path(res.quarantine_dir).glob("*.jsonl") for x in f.read_text().splitlines()
    )
    assert any("score sc-6: its trace 'tr-404' is not in the export" in r for r in reasons), reasons
    assert any("value 0.7 is not a thumbs" in r for r in reasons), reasons
    assert any("'tool'" in r for r in reasons), reasons


def test_a_langfuse_export_of_odd_records_is_quarantined_line_by_line_or_refused_whole():
    from flywheel.contract import ContractError
    from flywheel.data.sources import langfuse_records, langfuse_to_event

    lines, counts = langfuse_records(b'[1, "x", {"id": "s1", "traceId": "nowhere", "value": true}]')
    assert counts == {"traces": 0, "scores": 1, "skipped_not_human": 0} and len(lines) == 3
    reasons = []
    for line in lines:
        with pytest.raises(ContractError) as err:
            langfuse_to_event(line)
        reasons.append(err.value.reason)
    assert reasons == ["not an object", "not an object", "score s1: its trace 'nowhere' is not in the export"]
    with pytest.raises(ContractError, match="a Langfuse export is"):
        langfuse_records(b'"just a string"')
