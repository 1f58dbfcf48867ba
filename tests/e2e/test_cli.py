"""`flywheel ingest` as a user runs it: JSON counts, one-line errors, exit codes."""

from __future__ import annotations

import gzip
import json
import shutil

import pytest

pytestmark = pytest.mark.e2e


@pytest.fixture
def ws(tmp_path, repo_root):
    """A workspace: the shipped params.yaml and nothing else (not a DVC repository, so nothing is tracked)."""
    root = tmp_path / "ws"
    root.mkdir()
    shutil.copy(repo_root / "params.yaml", root / "params.yaml")
    return root


def _events(make_event, n, **overrides):
    return "".join(
        json.dumps(make_event(feedback={"type": "thumbs", "value": "up" if i % 2 else "down"}, **overrides)) + "\n"
        for i in range(n)
    )


def test_ingest_prints_json_counts(ws, sh, make_event, repo_root):
    (ws / "batch.jsonl").write_text(_events(make_event, 3) + "not json\n" + _events(make_event, 1))
    proc = sh(["flywheel", "ingest", "batch.jsonl", str(repo_root / "data/demo/native-batch.jsonl"), "--json"], ws)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    counts = json.loads(lines[0])
    assert {k: counts[k] for k in ("read", "accepted", "duplicates", "quarantined")} == {
        "read": 49,
        "accepted": 48,
        "duplicates": 0,
        "quarantined": 1,
    }
    assert counts["pii_redacted"] == {"card": 1, "email": 1, "iban": 1, "ip": 1}
    assert counts["quarantine"].startswith(str(ws / "data" / "quarantine"))
    assert "failed_checks" not in counts
    assert len(list((ws / "data" / "raw").glob("date=*/batch-*.parquet"))) == 1

    again = sh(["flywheel", "ingest", "batch.jsonl", "--json"], ws)
    assert again.returncode == 0
    assert json.loads(again.stdout)["duplicates"] == 4


def _bad_input(ws, case):
    if case == "missing file":
        return ["nope.jsonl"]
    if case == "directory":
        (ws / "adir").mkdir()
        return ["adir"]
    if case == "corrupt gzip":
        data = gzip.compress("".join(f'{{"n": {i * 7919 % 10007}}}\n' for i in range(2000)).encode())
        (ws / "bad.jsonl.gz").write_bytes(data[: len(data) // 2])  # cut short mid-stream
        return ["bad.jsonl.gz"]
    if case == "empty file":
        (ws / "empty.jsonl").write_bytes(b"")
        return ["empty.jsonl"]
    if case == "unknown format":
        (ws / "x.jsonl").write_text("{}\n")
        return ["--format", "parquet", "x.jsonl"]
    if case == "file in the wrong format":
        (ws / "data.csv").write_text("id,rating\n1,5\n2,3\n")
        return ["data.csv"]
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case, words",
    [
        ("missing file", ["cannot read", "nope.jsonl"]),
        ("directory", ["cannot read", "adir"]),
        ("corrupt gzip", ["cannot read", "bad.jsonl.gz"]),
        ("empty file", ["empty input"]),
        ("unknown format", ["unknown format 'parquet'"]),
        ("file in the wrong format", ["no line of the input is a valid native event", "invalid JSON"]),
    ],
)
def test_ingest_refuses_bad_input_with_one_line(ws, sh, case, words):
    proc = sh(["flywheel", "ingest", *_bad_input(ws, case)], ws)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    for word in words:
        assert word in lines[0]
    assert "Traceback" not in proc.stderr
    assert not list(ws.glob("data/raw/date=*/*.parquet"))


def test_quarantined_batch_exits_1_naming_the_check(ws, sh, make_event):
    (ws / "same.jsonl").write_text(_events(make_event, 30, response="One answer for everyone."))
    proc = sh(["flywheel", "ingest", "same.jsonl", "--json"], ws)
    assert proc.returncode == 1
    counts = json.loads(proc.stdout)
    assert counts["accepted"] == 0 and counts["quarantined"] == 30
    assert any("share of duplicate answers" in f for f in counts["failed_checks"])
    assert "batch quarantined whole" in proc.stderr
    assert (
        "expect_column_proportion_of_unique_values_to_be_between(answer_hash) [share of duplicate answers]"
        in proc.stderr
    )
    assert "data_docs/index.html" in proc.stderr
    assert not list(ws.glob("data/raw/date=*/*.parquet"))
