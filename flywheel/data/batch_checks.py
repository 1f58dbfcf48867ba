"""Batch-level checks run by ingest before a batch is committed (Great Expectations over per-event figures).

The suite runs on a small frame of per-event numbers (lengths, flags, hashes), not on the texts, so
it stays fast and light at a million events.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc

from flywheel.data import rawstore
from flywheel.data.expectations import Check, run_suite
from flywheel.params import IngestChecks


@dataclass
class BatchVerdict:
    failures: list[str]
    report: dict


def previous_negative_rate(raw_store: Path) -> float | None:
    """Share of negative feedback among the events already stored (None for an empty store)."""
    pol = rawstore.read_columns(raw_store, ["polarity"]).column("polarity")
    if len(pol) == 0:
        return None
    return pc.mean(pc.cast(pc.equal(pol, -1), "int8")).as_py()


def batch_frame(stats: dict[str, Sequence], empty_lines: int, read: int) -> pd.DataFrame:
    """One row per line read: flags for empty answers, per-event figures for accepted lines.

    ``stats`` holds one sequence (list or numpy array) per figure, one value per accepted event.
    """
    n = len(stats["response_chars"])
    extra = read - n
    polarity = np.asarray(stats["polarity"], dtype=float)
    positive = np.where(polarity == 0, np.nan, (polarity > 0).astype(float))
    empty = np.zeros(read)
    empty[n : n + empty_lines] = 1.0

    def pad(values, fill=np.nan):
        return np.concatenate([np.asarray(values, dtype=float), np.full(extra, fill)])

    return pd.DataFrame(
        {
            "empty_answer": empty,
            "response_chars": pad(stats["response_chars"]),
            "answer_hash": pd.arrays.IntegerArray(  # nullable Int64: missing for the lines not accepted
                np.concatenate([np.asarray(stats["answer_hash"], dtype=np.int64), np.zeros(extra, np.int64)]),
                np.concatenate([np.zeros(n, dtype=bool), np.ones(extra, dtype=bool)]),
            ),
            "positive": pad(positive),
            "negative": pad((polarity < 0).astype(float)),
            "has_pii": pad((np.asarray(stats["pii_found"]) > 0).astype(float)),
        }
    )


def batch_suite(frame: pd.DataFrame, previous_negative: float | None, checks: IngestChecks) -> list[Check]:
    """The expectations for one batch; rate checks only when the batch is big enough to judge."""
    suite = [
        Check(
            "ExpectColumnValuesToBeBetween",
            "response_chars",
            {"min_value": checks.min_response_chars, "max_value": checks.max_response_chars},
            "text length bounds",
        )
    ]
    accepted = int(frame["response_chars"].notna().sum())
    if accepted < checks.min_events_for_rate_checks:
        return suite
    suite += [
        Check(
            "ExpectColumnMeanToBeBetween",
            "empty_answer",
            {"max_value": checks.max_empty_answer_rate},
            "share of empty answers",
        ),
        Check(
            "ExpectColumnProportionOfUniqueValuesToBeBetween",
            "answer_hash",
            {"min_value": 1.0 - checks.max_duplicate_answer_rate},
            "share of duplicate answers",
        ),
        Check(
            "ExpectColumnMeanToBeBetween", "has_pii", {"max_value": checks.max_pii_rate}, "rate of personal data found"
        ),
    ]
    if frame["positive"].notna().sum() >= checks.min_events_for_rate_checks:
        suite.append(
            Check(
                "ExpectColumnMeanToBeBetween",
                "positive",
                {"min_value": checks.min_positive_rate, "max_value": checks.max_positive_rate},
                "label balance",
            )
        )
    if previous_negative is not None:
        suite.append(
            Check(
                "ExpectColumnMeanToBeBetween",
                "negative",
                {"max_value": min(1.0, previous_negative + checks.max_negative_rate_rise)},
                f"negative-feedback rate vs previous window ({previous_negative:.3f})",
            )
        )
    return suite


def check_batch(
    stats: dict[str, list],
    empty_lines: int,
    read: int,
    previous_negative: float | None,
    checks: IngestChecks,
    report_dir: Path,
) -> BatchVerdict:
    """Run the batch suite; on failure its JSON result and Data Docs are written under ``report_dir``."""
    frame = batch_frame(stats, empty_lines, read)
    suite = batch_suite(frame, previous_negative, checks)
    with tempfile.TemporaryDirectory() as tmp:
        outcome = run_suite(frame, "ingest_batch", suite, docs_dir=Path(tmp) / "data_docs")
        if outcome.failures:
            report_dir.mkdir(parents=True, exist_ok=True)
            shutil.copytree(Path(tmp) / "data_docs", report_dir / "data_docs", dirs_exist_ok=True)
            outcome.docs_index = str(report_dir / "data_docs" / "index.html")
            (report_dir / "checks.json").write_text(json.dumps(outcome.to_json(), indent=2))
    return BatchVerdict(outcome.failures, outcome.to_json())
