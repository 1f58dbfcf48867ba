"""Run one DAG with ``dag.test()`` against the metadata database of $AIRFLOW_HOME and print one JSON line:
the run's state, each task's state and duration, the XComs and the asset events it produced. Run as a subprocess by the
tests and benchmarks (``devkit.airflow_home.dag_test``: each workspace gets its own Airflow home).
Usage: ``python devkit/dagrun.py DAG_ID [CONF_JSON]``."""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    dag_id = sys.argv[1]
    conf = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    if os.environ.get("FLYWHEEL_DAGRUN_PRELOAD") == "1":  # as a preloading worker would (flywheel/airflow_worker.py)
        from flywheel.warm_runner import preload_worker

        print(f"preloaded the stages' libraries in {preload_worker():.1f} s", file=sys.stderr, flush=True)
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.asset import AssetEvent
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    bag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
    assert not bag.import_errors, bag.import_errors
    run = bag.dags[dag_id].test(run_conf=conf)
    with create_session() as session:
        tis = {ti.task_id: str(ti.state) for ti in run.get_task_instances(session=session)}
        durations = {ti.task_id: ti.duration for ti in run.get_task_instances(session=session)}
        xcoms = {
            f"{x.task_id}.{x.key}": x.value
            for x in session.scalars(
                select(XComModel).where(XComModel.dag_id == dag_id, XComModel.run_id == run.run_id)
            )
        }
        events = [
            e.extra
            for e in session.scalars(
                select(AssetEvent).where(AssetEvent.source_dag_id == dag_id, AssetEvent.source_run_id == run.run_id)
            )
        ]
        seconds = (run.end_date - run.start_date).total_seconds() if run.end_date and run.start_date else None
    print(
        "DAGRUN "
        + json.dumps(
            {
                "state": str(run.state),
                "run_id": run.run_id,
                "tasks": tis,
                "xcom": xcoms,
                "asset_events": events,
                "seconds": seconds,
                "durations": durations,
            },
            default=str,
        )
    )


if __name__ == "__main__":
    main()
