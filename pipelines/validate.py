"""The ``validate`` stage: a Great Expectations suite over the training window of the raw store.

Reads only the small columns it checks (no texts), writes the JSON result, Data Docs and the
data-quality metrics, and fails naming each failed expectation. It changes no input.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc

from flywheel import contract
from flywheel.data import rawstore
from flywheel.data.expectations import Check, SuiteOutcome, run_suite
from flywheel.params import ValidateParams
from flywheel.settings import Settings
from flywheel.stages import StageFailed

# What this step's functions import, imported ahead by a DAG task's warm runner while DVC starts
# (flywheel/orchestration.py stage_runner): a module missing here is imported by the stage itself.
PRELOAD = ("great_expectations", "great_expectations.checkpoint")

COLUMNS = [
    "event_id",
    "timestamp",
    "ingested_at",
    "batch_id",
    "conversation_id",
    "model_version",
    "response_chars",
    "feedback_type",
    "rating",
    "polarity",
    "pii_found",
    "n_turns",
]
FEEDBACK_TYPES = list(contract.FEEDBACK_TYPES)  # the contract's kinds of feedback, named once there
REQUIRED = ["event_id", "timestamp", "conversation_id", "model_version", "response_chars", "feedback_type"]


class ValidationFailed(RuntimeError):
    """The training window broke one or more expectations (each named in the message)."""


@dataclass
class ValidateResult:
    outcome: SuiteOutcome
    metrics: dict


def load_window(raw_store: Path, window_days: int, now: datetime | None = None) -> pd.DataFrame:
    """The checked columns of the events in the window (``window_days`` 0: all of them)."""
    table = rawstore.read_columns(raw_store, COLUMNS)
    if window_days:
        since = ((now or datetime.now(UTC)) - timedelta(days=window_days)).strftime("%Y-%m-%dT%H:%M:%SZ")
        table = table.filter(pc.greater_equal(table.column("ingested_at"), since))
    return table.to_pandas()


def window_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Add the derived columns the suite checks: polar labels and the newest batch's figures."""
    out = frame.copy(deep=False)  # copy-on-write: the caller's frame is never changed
    if pd.api.types.is_integer_dtype(out["response_chars"].dtype) and out["response_chars"].dtype != np.int64:
        # int32 in the store; as int64 Great Expectations checks its range vectorised, not value by value
        out["response_chars"] = out["response_chars"].astype(np.int64)
    for col in ("feedback_type", "model_version"):
        # few distinct values: as categories GX hashes and scans them in a fraction of the time
        out[col] = out[col].astype("category")
    pol = out["polarity"].astype(float)
    out["positive"] = np.where(pol == 0, np.nan, (pol > 0).astype(float))
    latest = out["batch_id"].max() if len(out) else None
    is_new = out["batch_id"] == latest
    out["new_response_chars"] = out["response_chars"].where(is_new)
    out["new_negative"] = (pol < 0).astype(float).where(is_new)
    out["is_new"] = is_new
    return out


def window_suite(frame: pd.DataFrame, params: ValidateParams) -> list[Check]:
    mostly = 1.0 - params.max_null_rate
    suite = [Check("ExpectTableRowCountToBeBetween", None, {"min_value": params.min_rows}, "enough data")]
    suite += [Check("ExpectColumnValuesToNotBeNull", c, {"mostly": mostly}, "nulls") for c in REQUIRED]
    suite += [
        Check("ExpectColumnValuesToBeUnique", "event_id", {}, "unique ids"),
        Check("ExpectColumnValuesToBeInSet", "feedback_type", {"value_set": FEEDBACK_TYPES}, "schema"),
        Check(
            "ExpectColumnValuesToBeBetween",
            "response_chars",
            {"min_value": 1, "max_value": params.max_response_chars},
            "text length range",
        ),
        Check("ExpectColumnValuesToBeBetween", "rating", {"min_value": 1, "max_value": 5}, "rating range"),
    ]
    if frame["positive"].notna().sum() >= params.min_rows:
        suite.append(
            Check(
                "ExpectColumnMeanToBeBetween",
                "positive",
                {"min_value": params.min_positive_rate, "max_value": params.max_positive_rate},
                "label balance",
            )
        )
    is_old = ~frame["is_new"]
    if int(is_old.sum()) >= params.min_rows and frame["is_new"].sum() >= params.min_rows:
        # only the two columns needed, not a filtered copy of the whole frame
        mean = float(frame["response_chars"][is_old].mean())
        ratio = params.max_length_drift_ratio
        suite.append(
            Check(
                "ExpectColumnMeanToBeBetween",
                "new_response_chars",
                {"min_value": round(mean / ratio, 2), "max_value": round(mean * ratio, 2)},  # readable in the docs
                "answer-length drift vs previous window",
            )
        )
        neg = float((frame["polarity"][is_old] < 0).mean())
        suite.append(
            Check(
                "ExpectColumnMeanToBeBetween",
                "new_negative",
                {"max_value": round(min(1.0, neg + params.max_negative_rate_rise), 4)},
                "negative-feedback drift vs previous window",
            )
        )
    return suite


def checked_columns(frame: pd.DataFrame, suite: list[Check]) -> pd.DataFrame:
    """The columns the suite checks, in a frame of the same rows: Great Expectations filters the whole frame
    for each column check, so the columns no check reads only cost time."""
    return frame[list(dict.fromkeys(c.column for c in suite if c.column is not None))]


def quality_metrics(frame: pd.DataFrame) -> dict:
    n = len(frame)
    polar = frame["positive"].dropna()
    return {
        "rows": n,
        "batches": int(frame["batch_id"].nunique()),
        "conversations": int(frame["conversation_id"].nunique()),
        "by_feedback_type": {t: int((frame["feedback_type"] == t).sum()) for t in FEEDBACK_TYPES},
        "positive_rate": round(float(polar.mean()), 4) if len(polar) else None,
        "negative_rate": round(float((frame["polarity"] < 0).mean()), 4) if n else None,
        "pii_event_rate": round(float((frame["pii_found"] > 0).mean()), 4) if n else None,
        "mean_response_chars": round(float(frame["response_chars"].mean()), 1) if n else None,
        "multi_turn_rate": round(float((frame["n_turns"] > 1).mean()), 4) if n else None,
    }


def validate(raw_store: Path, params: ValidateParams, docs_dir: Path | None) -> ValidateResult:
    """Run the window suite; the caller decides what a failure does (the stage raises)."""
    frame = window_frame(load_window(raw_store, params.window_days))
    suite = window_suite(frame, params)
    outcome = run_suite(checked_columns(frame, suite), "training_window", suite, docs_dir)
    metrics = quality_metrics(frame)
    metrics["expectations_failed"] = len(outcome.failures)
    return ValidateResult(outcome, metrics)


def main(raw_store: Path, params: ValidateParams, out_dir: Path, metrics_file: Path) -> ValidateResult:
    """Stage edge: validate, write result, Data Docs and metrics; raise ``ValidationFailed`` naming failures."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result = validate(raw_store, params, out_dir / "data_docs")
    (out_dir / "result.json").write_text(json.dumps(result.outcome.to_json(), indent=2))
    metrics_file.parent.mkdir(parents=True, exist_ok=True)
    metrics_file.write_text(json.dumps(result.metrics, indent=2))
    if result.outcome.failures:
        raise ValidationFailed("validation failed:\n  " + "\n  ".join(result.outcome.failures))
    return result


def stage(settings: Settings, params: ValidateParams, *, out: Path, metrics: Path) -> str:
    """Validate the raw store's training window; a broken expectation fails the stage, naming each."""
    try:
        result = main(settings.raw_store, params, out, metrics)
    except ValidationFailed as exc:
        raise StageFailed(str(exc)) from exc
    return f"validate: {result.metrics['rows']} events, all expectations met"
