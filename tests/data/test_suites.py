"""The data-quality suites: the ingest batch suite and the validate window suite pass on the shipped demo
data, and every expectation has a broken batch that trips it (and names it)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shipped import shipped

from flywheel.data import batch_checks, rawstore
from flywheel.data.ingest import ingest
from pipelines import validate

DAY1 = datetime(2026, 11, 20, 12, tzinfo=UTC)
DAY2 = datetime(2026, 11, 21, 12, tzinfo=UTC)

# --- the batch suite (run by ingest) -------------------------------------------------------------------------------


def test_batch_suite_passes_on_the_demo_batches(demo_store):
    assert [r.ok for r in demo_store.results] == [True, True, True]
    assert [r.accepted for r in demo_store.results] == [44, 743, 743]
    assert all(r.batch_file for r in demo_store.results)


def _thumbs(make_event, n, ups, **overrides):
    return [
        make_event(feedback={"type": "thumbs", "value": "up" if i < ups else "down"}, **overrides) for i in range(n)
    ]


def _run(tmp_path, lines, checks=None, now=DAY2):
    path = tmp_path / f"in-{now:%d}.jsonl"
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines))
    params = shipped("ingest") if checks is None else shipped("ingest").updated(checks=checks)
    return ingest([path], "native", tmp_path / "raw", tmp_path / "q", params, shipped("contract"), workers=1, now=now)


BROKEN_BATCHES = {
    # name: (expectation it trips, its label, builder(make_event) -> (lines, checks), previous batch or None)
    "empty answers": (
        "expect_column_mean_to_be_between(empty_answer)",
        "share of empty answers",
        lambda mk: (_thumbs(mk, 24, 12) + [json.dumps(mk(response=" " * i)) for i in range(4)], None),
        None,
    ),
    "duplicate answers": (
        "expect_column_proportion_of_unique_values_to_be_between(answer_hash)",
        "share of duplicate answers",
        lambda mk: (_thumbs(mk, 24, 12, response="Always this answer."), None),
        None,
    ),
    "label balance": (
        "expect_column_mean_to_be_between(positive)",
        "label balance",
        lambda mk: (_thumbs(mk, 24, 24), None),
        None,
    ),
    "negative rate rise": (
        "expect_column_mean_to_be_between(negative)",
        "negative-feedback rate vs previous window",
        lambda mk: (_thumbs(mk, 24, 8), None),
        lambda mk: _thumbs(mk, 24, 22),
    ),  # previous window: 2/24 negative, now 16/24
    "personal data rate": (
        "expect_column_mean_to_be_between(has_pii)",
        "rate of personal data found",
        lambda mk: (
            [
                mk(
                    feedback={"type": "thumbs", "value": "up" if i % 2 else "down"},
                    prompt=[{"role": "user", "content": f"I am at 10.0.0.{i}, help"}],
                )
                for i in range(24)
            ],
            shipped("ingest").checks.updated(max_pii_rate=0.2),
        ),
        None,
    ),
    "text length bounds": (
        "expect_column_values_to_be_between(response_chars)",
        "text length bounds",
        lambda mk: (
            _thumbs(mk, 5, 3) + [mk(response="x" * 300)],
            shipped("ingest").checks.updated(max_response_chars=200),
        ),
        None,
    ),
}


@pytest.mark.parametrize("name", BROKEN_BATCHES)
def test_each_batch_expectation_has_a_batch_that_trips_it(tmp_path, make_event, name):
    expectation, label, build, previous = BROKEN_BATCHES[name]
    if previous is not None:
        first = _run(tmp_path, previous(make_event), now=DAY1)
        assert first.ok, first.failed_checks
    lines, checks = build(make_event)
    before = rawstore.batch_files(tmp_path / "raw")

    result = _run(tmp_path, lines, checks)

    assert len(result.failed_checks) == 1, result.failed_checks  # this expectation and no other
    message = result.failed_checks[0]
    assert message.startswith(f"{expectation} [{label}") and "observed" in message
    assert result.accepted == 0 and rawstore.batch_files(tmp_path / "raw") == before
    report = json.loads((Path(result.quarantine_dir) / "checks.json").read_text())
    assert [r["success"] for r in report["results"]].count(False) == 1


def test_small_batch_skips_rate_checks(tmp_path, make_event):
    # 5 thumbs up with one answer would break balance and duplicates, but is too small to judge
    result = _run(tmp_path, _thumbs(make_event, 5, 5, response="Same."))
    assert result.ok and result.accepted == 5


def test_batch_suite_composition():
    checks = shipped("ingest").checks
    small = batch_checks.batch_frame(
        {"response_chars": [5] * 3, "answer_hash": [1, 2, 3], "polarity": [1, -1, 0], "pii_found": [0, 0, 1]}, 0, 3
    )
    assert [c.meta for c in batch_checks.batch_suite(small, None, checks)] == ["text length bounds"]
    n = 30
    big = batch_checks.batch_frame(
        {
            "response_chars": [5] * n,
            "answer_hash": list(range(n)),
            "polarity": [1, -1] * (n // 2),
            "pii_found": [0] * n,
        },
        2,
        n + 4,
    )
    assert len(big) == n + 4 and big["empty_answer"].sum() == 2 and big["response_chars"].isna().sum() == 4
    metas = [c.meta for c in batch_checks.batch_suite(big, None, checks)]
    assert metas == [
        "text length bounds",
        "share of empty answers",
        "share of duplicate answers",
        "rate of personal data found",
        "label balance",
    ]
    with_prev = batch_checks.batch_suite(big, 0.25, checks)
    assert with_prev[-1].meta.startswith("negative-feedback rate vs previous window")
    assert with_prev[-1].kwargs == {"max_value": pytest.approx(0.55)}


def test_previous_negative_rate(tmp_path, demo_store):
    assert batch_checks.previous_negative_rate(tmp_path / "empty") is None
    rate = batch_checks.previous_negative_rate(demo_store.raw)
    assert rate == pytest.approx(12 / (44 + 743 + 743))  # 8 thumbs down + 4 corrections in the native batch


# --- the window suite (the validate stage) ---------------------------------------------------------------------------


def test_window_suite_passes_on_the_demo_store(demo_store, tmp_path):
    out, metrics_file = tmp_path / "reports" / "validate", tmp_path / "metrics" / "data_quality.json"
    result = validate.main(demo_store.raw, shipped("validate"), out, metrics_file)
    assert result.outcome.success and result.outcome.failures == []
    kinds = {r["expectation"] for r in result.outcome.results}
    assert {
        "expect_table_row_count_to_be_between",
        "expect_column_values_to_be_unique",
        "expect_column_mean_to_be_between",
    } <= kinds
    assert len(result.outcome.results) == 14  # drift checks included: there is a previous window
    metrics = json.loads(metrics_file.read_text())
    assert metrics["rows"] == 1530 and metrics["batches"] == 3 and metrics["expectations_failed"] == 0
    assert metrics["by_feedback_type"] == {"thumbs": 24, "rating": 16, "preference": 1486, "correction": 4}
    assert 0 < metrics["pii_event_rate"] < 0.05
    assert json.loads((out / "result.json").read_text())["success"] is True
    assert list((out / "data_docs").glob("**/index.html"))
    _served_offline(out / "data_docs")


def _served_offline(site):
    """Every page of the Data Docs, served from a local HTTP server as a browser would load it: no external URL
    anywhere in a page, and each script, style, image and font a page (or its CSS) names is served from the site
    (GX loads its list and tables with scripts from CDNs: the index was blank without internet)."""
    import functools
    import http.server
    import re
    import threading
    import urllib.parse
    import urllib.request

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        pages = [p.relative_to(site).as_posix() for p in site.rglob("*.html")]
        assert pages and "index.html" in pages
        seen = set()
        for page in pages:
            url = urllib.parse.urljoin(base, page)
            html = urllib.request.urlopen(url).read().decode()
            assert not re.findall(r"https?://(?!127\.0\.0\.1)[^\s\"'<>)]+", html), page
            for ref in re.findall(r"<(?:script|link|img)[^>]*(?:src|href)=\"([^\"#]+)\"", html):
                asset = urllib.parse.urljoin(url, ref.split("?")[0])
                if asset in seen:
                    continue
                seen.add(asset)
                body = urllib.request.urlopen(asset).read()  # raises on a 404, naming the asset
                if asset.endswith(".css"):
                    for font in re.findall(rb"url\(([^)]+\.woff2)\)", body):
                        urllib.request.urlopen(urllib.parse.urljoin(asset, font.decode()))
        assert any(a.endswith("jquery-3.7.1.min.js") for a in seen) and any("bootstrap-table" in a for a in seen)
    finally:
        server.shutdown()


def _row(i: int, batch: str, **overrides) -> dict:
    row = {name: None for name in rawstore.SCHEMA.names}
    row.update(
        event_id=f"{batch}-{i}",
        schema_version=1,
        timestamp="2026-11-20T10:00:00Z",
        ingested_at=f"2026-11-{batch[6:8]}T12:00:00Z",
        batch_id=batch,
        conversation_id=f"c-{batch}-{i}",
        model_version="m1",
        user_id="u",
        prompt='[{"role": "user", "content": "q"}]',
        n_turns=1,
        response="a" * 40,
        response_chars=40,
        feedback_type="thumbs",
        thumbs="up" if i % 2 else "down",
        polarity=1 if i % 2 else -1,
        pii_found=0,
    )
    row.update(overrides)
    return row


def write_batch(raw: Path, rows: list[dict]) -> Path:
    """A batch file written straight into the store (bypassing ingest), with the store's schema."""
    batch = rows[0]["batch_id"]
    path = raw / f"date=2026-11-{batch[6:8]}" / f"batch-{batch}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=rawstore.SCHEMA), path)
    return path


OLD, NEW = "20261120T120000Z-old00000", "20261121T120000Z-new00000"


def _one_batch(n=20, per_row=None):
    """One batch of n rows; per_row maps a row index to its overrides."""
    return [[_row(i, NEW, **(per_row or {}).get(i, {})) for i in range(n)]]


BROKEN_WINDOWS = {
    "row count": ("expect_table_row_count_to_be_between", "enough data", lambda: _one_batch(5)),
    "nulls": (
        "expect_column_values_to_not_be_null(model_version)",
        "nulls",
        lambda: _one_batch(per_row={3: {"model_version": None}}),
    ),
    "unique ids": (
        "expect_column_values_to_be_unique(event_id)",
        "unique ids",
        lambda: _one_batch(per_row={4: {"event_id": f"{NEW}-5"}}),
    ),
    "feedback type set": (
        "expect_column_values_to_be_in_set(feedback_type)",
        "schema",
        lambda: _one_batch(per_row={2: {"feedback_type": "emoji"}}),
    ),
    "rating range": (
        "expect_column_values_to_be_between(rating)",
        "rating range",
        lambda: _one_batch(per_row={0: {"feedback_type": "rating", "thumbs": None, "rating": 7}}),
    ),
    "label balance": (
        "expect_column_mean_to_be_between(positive)",
        "label balance",
        lambda: _one_batch(per_row={i: {"thumbs": "up", "polarity": 1} for i in range(20)}),
    ),
    "answer-length drift": (
        "expect_column_mean_to_be_between(new_response_chars)",
        "answer-length drift vs previous window",
        lambda: [
            [_row(i, OLD) for i in range(12)],
            [_row(i, NEW, response="b" * 400, response_chars=400) for i in range(12)],
        ],
    ),
    "negative drift": (
        "expect_column_mean_to_be_between(new_negative)",
        "negative-feedback drift vs previous window",
        lambda: [
            [_row(i, OLD, thumbs="up", polarity=1) if i > 1 else _row(i, OLD) for i in range(12)],
            [_row(i, NEW, thumbs="down", polarity=-1) if i > 1 else _row(i, NEW) for i in range(12)],
        ],
    ),
}


@pytest.mark.parametrize("name", BROKEN_WINDOWS)
def test_each_window_expectation_has_a_window_that_trips_it(tmp_path, name):
    expectation, label, build = BROKEN_WINDOWS[name]
    raw = tmp_path / "raw"
    for rows in build():
        write_batch(raw, rows)

    result = validate.validate(raw, shipped("validate"), docs_dir=None)

    failures = result.outcome.failures
    assert len(failures) == 1, failures  # this expectation and no other
    assert failures[0].startswith(expectation) and f"[{label}]" in failures[0]
    assert result.metrics["expectations_failed"] == 1


def test_validate_stage_raises_naming_the_failed_expectation(tmp_path):
    raw = tmp_path / "raw"
    write_batch(raw, _one_batch(per_row={4: {"event_id": f"{NEW}-5"}})[0])
    metrics_file = tmp_path / "metrics.json"
    with pytest.raises(validate.ValidationFailed) as err:
        validate.main(raw, shipped("validate"), tmp_path / "out", metrics_file)
    assert "expect_column_values_to_be_unique(event_id) [unique ids]" in str(err.value)
    # the evidence is written before the stage fails
    assert json.loads((tmp_path / "out" / "result.json").read_text())["success"] is False
    assert json.loads(metrics_file.read_text())["expectations_failed"] == 1
    assert list((tmp_path / "out" / "data_docs").glob("**/index.html"))


def test_window_suite_composition():
    params = shipped("validate")
    one = validate.window_frame(pd.DataFrame(_one_batch(20)[0]))
    metas = [c.meta for c in validate.window_suite(one, params)]
    assert "label balance" in metas and not any("drift" in m for m in metas)  # no previous window
    two = validate.window_frame(pd.DataFrame([_row(i, OLD) for i in range(12)] + [_row(i, NEW) for i in range(12)]))
    assert two["is_new"].sum() == 12
    drift = [c for c in validate.window_suite(two, params) if "drift" in c.meta]
    assert [c.column for c in drift] == ["new_response_chars", "new_negative"]
    assert drift[0].kwargs == {
        "min_value": pytest.approx(40 / 3, abs=0.005),
        "max_value": pytest.approx(120),
    }  # rounded to 2 decimals: read in the Data Docs
    assert drift[1].kwargs == {"max_value": pytest.approx(0.5 + 0.3)}


def test_window_days_limits_the_window(tmp_path):
    raw = tmp_path / "raw"
    write_batch(raw, [_row(i, OLD) for i in range(3)])
    write_batch(raw, [_row(i, NEW) for i in range(4)])
    now = datetime(2026, 11, 21, 18, tzinfo=UTC)
    assert len(validate.load_window(raw, 0, now)) == 7
    assert len(validate.load_window(raw, 1, now)) == 4


def test_numeric_fast_path_answers_like_great_expectations():
    import decimal

    import numpy as np

    from flywheel.data.expectations import _numeric_dtype_fast_path

    _numeric_dtype_fast_path()
    import great_expectations.util as gx_util

    check = gx_util.does_ndarray_contain_decimal_dtype
    assert check.flywheel_fast_path
    assert check(np.arange(5, dtype=float)) is False
    assert check(np.array([1.0, decimal.Decimal("2")], dtype=object)) is True
    assert check(np.array(["a", None], dtype=object)) is False
