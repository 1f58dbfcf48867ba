"""feedback_ingest: export new feedback-store events into the DVC-tracked raw store and announce them
as an asset event (the counts in its extra), which schedules continuous_improvement. Wiring only."""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Asset, dag, get_current_context, task


def _config():
    # the schedule, retries and pool come from params.yaml (two local YAML files; nothing heavy imported)
    from flywheel.orchestration import dag_config

    return dag_config(__file__)


CFG = _config()
ORCH = CFG.params
FEEDBACK = Asset(CFG.feedback_asset)

DOC = f"""
### Feedback ingest

Every `{ORCH.schedule}`: `flywheel export --json` moves the events the online service stored in the feedback
store since the last export into the raw store (checked, redacted, de-duplicated, `dvc add`-ed), in pool
`{ORCH.pool}` since it runs DVC. When it stored any, the task emits an event on asset `{CFG.feedback_asset}`
whose extra holds the export's counts; `continuous_improvement` is scheduled on it. No new events: the task is
skipped with the reason in its log, and no event is emitted. An install without the `flywheel` executable or its
`export` command is broken: the task fails at once (no retries), never skipped.

Then `ingest_traces` runs `flywheel ingest --from mlflow --json`: the human assessments your own app logged on
the traces of MLflow experiment `{CFG.trace_experiment or "(none: params.yaml ingest.traces.experiment)"}` since the
last pull become a raw-store batch, announced on the same asset. With no experiment set it is skipped.
"""


@dag(
    dag_id="feedback_ingest",
    schedule=ORCH.schedule,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["flywheel", "data"],
    doc_md=DOC,
    default_args={
        "retries": ORCH.retries,
        "retry_delay": timedelta(minutes=ORCH.retry_delay_minutes),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=ORCH.max_retry_delay_minutes),
    },
)
def feedback_ingest():
    @task(
        pool=ORCH.pool,
        outlets=[FEEDBACK],
        execution_timeout=timedelta(minutes=ORCH.stage_timeout_minutes),
        multiple_outputs=False,
    )
    def export_feedback() -> dict:
        """New feedback-store events into the raw store; the counts go on the asset event."""
        from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

        from flywheel import orchestration as orch

        ctx = get_current_context()
        env = orch.command_env(CFG.root, ctx["run_id"])
        try:  # with a DVC remote (production): pull the latest state first, push the new batch
            counts, _ = orch.synced(
                CFG.root, env, ctx["run_id"], "export_feedback", None, lambda: orch.run_export(CFG.root, env)
            )
        except orch.ExportUnavailable as exc:  # a broken install: retrying cannot help
            raise AirflowFailException(str(exc)) from exc
        new = orch.exported_events(counts)
        if not new:
            raise AirflowSkipException(f"no new feedback events to export ({counts}); no asset event")
        ctx["outlet_events"][FEEDBACK].extra = {"new_events": new, **counts}
        print(f"exported {new} new events: {counts}")
        return counts

    @task(
        pool=ORCH.pool,
        outlets=[FEEDBACK],
        execution_timeout=timedelta(minutes=ORCH.stage_timeout_minutes),
        trigger_rule="none_failed",  # after the export, whether it exported anything or not
    )
    def ingest_traces() -> dict:
        """Human assessments on the configured MLflow experiment's traces into the raw store."""
        from airflow.sdk.exceptions import AirflowSkipException

        from flywheel import orchestration as orch

        if not CFG.trace_experiment:
            raise AirflowSkipException("no trace store configured (params.yaml ingest.traces.experiment is empty)")
        ctx = get_current_context()
        env = orch.command_env(CFG.root, ctx["run_id"])
        counts, _ = orch.synced(
            CFG.root, env, ctx["run_id"], "ingest_traces", None, lambda: orch.run_trace_ingest(CFG.root, env)
        )
        new = orch.exported_events(counts)
        if not new:
            raise AirflowSkipException(f"no new assessments on {CFG.trace_experiment!r} ({counts}); no asset event")
        ctx["outlet_events"][FEEDBACK].extra = {"new_events": new, **counts}
        print(f"ingested {new} new events from MLflow experiment {CFG.trace_experiment!r}: {counts}")
        return counts

    export_feedback() >> ingest_traces()


feedback_ingest()
