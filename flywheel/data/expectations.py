"""A thin wrapper over Great Expectations 1.x: run one suite on a dataframe, get named failures and Data Docs.

Used by the ingest batch checks and by the ``validate`` stage. Great Expectations is imported lazily
(it takes seconds to import) and runs in an ephemeral context: nothing is left behind but the
result JSON and the Data Docs site written where asked.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd


@dataclass
class Check:
    """One expectation: GX class name, its column and keyword arguments."""

    kind: str
    column: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    meta: str = ""  # what the check guards, shown in failures


@dataclass
class SuiteOutcome:
    success: bool
    failures: list[str]
    results: list[dict]
    docs_index: str | None = None

    def to_json(self) -> dict:
        return {
            "success": self.success,
            "failures": self.failures,
            "results": self.results,
            "data_docs": self.docs_index,
        }


def _describe(kind: str, column: str | None, kwargs: dict, observed: Any, meta: str) -> str:
    bounds = ", ".join(f"{k}={v}" for k, v in kwargs.items() if k not in ("column", "result_format"))
    where = f"{kind}({column})" if column else kind
    label = f" [{meta}]" if meta else ""
    return f"{where}{label}: observed {observed!r}, expected {bounds}"


def _numeric_dtype_fast_path() -> None:
    """Before a column mean, GX asks whether the column holds ``decimal.Decimal`` objects by testing every
    value in Python (~0.4 s per million rows). An array of a numeric dtype cannot hold one: answer from the
    dtype and keep GX's own check for object arrays. Same result, without the loop."""
    import great_expectations.util as gx_util

    original = gx_util.does_ndarray_contain_decimal_dtype
    if getattr(original, "flywheel_fast_path", False):
        return

    def contains_decimal(data):
        dtype = getattr(data, "dtype", None)
        if dtype is not None and dtype.kind in "biufcmM":
            return False
        return original(data)

    contains_decimal.flywheel_fast_path = True
    gx_util.does_ndarray_contain_decimal_dtype = contains_decimal


def run_suite(frame: pd.DataFrame, name: str, checks: list[Check], docs_dir: Path | None = None) -> SuiteOutcome:
    """Validate ``frame`` against ``checks``; failures name each expectation and its observed value."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.data_context.types.base import ProgressBarsConfig

    _numeric_dtype_fast_path()

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    actions = []
    if docs_dir is not None:
        docs_dir.mkdir(parents=True, exist_ok=True)
        context.add_data_docs_site(
            site_name="flywheel",
            site_config={
                "class_name": "SiteBuilder",
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            },
        )
        actions.append(UpdateDataDocsAction(name="data_docs", site_names=["flywheel"]))
    batch_def = (
        context.data_sources.add_pandas("flywheel")
        .add_dataframe_asset(name)
        .add_batch_definition_whole_dataframe("whole")
    )
    expectations = []
    for c in checks:
        cls = getattr(gx.expectations, c.kind)
        args = dict(c.kwargs)
        if c.column is not None:
            args["column"] = c.column
        expectations.append(cls(**args, meta={"guards": c.meta} if c.meta else None))
    suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
    vd = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch_def, suite=suite))
    checkpoint = context.checkpoints.add(gx.Checkpoint(name=name, validation_definitions=[vd], actions=actions))
    from great_expectations.core.run_identifier import RunIdentifier

    # a run name the Data Docs show (GX's default is "__none__"); it is a folder name in the site
    run_name = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.environ.get("FLYWHEEL_AIRFLOW_RUN_ID") or "flywheel-validate")
    run = checkpoint.run(batch_parameters={"dataframe": frame}, run_id=RunIdentifier(run_name=run_name))
    failures, results = [], []
    for suite_result in run.run_results.values():
        for r in suite_result.results:
            cfg = r.expectation_config
            column = cfg.kwargs.get("column")
            kwargs = {k: v for k, v in cfg.kwargs.items() if k not in ("column", "batch_id")}
            observed = (r.result or {}).get("observed_value")
            if observed is None and r.result:
                observed = {k: r.result[k] for k in ("unexpected_count", "unexpected_percent") if k in r.result}
            meta = (cfg.meta or {}).get("guards", "")
            results.append(
                {
                    "expectation": cfg.type,
                    "column": column,
                    "kwargs": kwargs,
                    "success": bool(r.success),
                    "observed": _plain(observed),
                }
            )
            if not r.success:
                failures.append(_describe(cfg.type, column, kwargs, _plain(observed), meta))
    index = None
    if docs_dir is not None:
        from flywheel.data.offline_docs import make_offline

        make_offline(docs_dir)  # GX's pages load their scripts from CDNs: blank on a machine without internet
        found = sorted(docs_dir.glob("**/index.html"))
        index = str(found[0]) if found else None
    return SuiteOutcome(success=not failures, failures=failures, results=results, docs_index=index)


def _plain(value: Any) -> Any:
    """JSON-safe copy of an observed value (numpy scalars and the like)."""
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
