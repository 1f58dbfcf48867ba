"""rollback: point a model's champion alias back at the previous champion, or at a named version.
Manual only. Wiring only: the command is `flywheel rollback`."""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, get_current_context, task

DOC = """
### Rollback

Runs `flywheel rollback --model MODEL [--to VERSION]`: `champion` moves to `previous-champion` (or to the
version given) and the former champion becomes `previous-champion` (tagged `rolled_back`: a release will not
promote it again). Only a version the gate blessed and whose smoke check passed, or the base model, can be
rolled back to. Trigger it by hand with the params.
No retries: a second attempt would roll back again.
"""


@dag(
    dag_id="rollback",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["flywheel", "release"],
    doc_md=DOC,
    default_args={"retries": 0},
    params={
        "model": Param("policy", type="string", enum=["policy", "reward"], description="which registered model"),
        "to": Param(
            None,
            type=["null", "string"],
            pattern=r"^[0-9]*$",
            description="target version number (none or empty: previous-champion)",
        ),
    },
)
def rollback():
    @task
    def rollback_champion() -> str:
        from flywheel import orchestration as orch

        ctx = get_current_context()
        root = orch.workspace_root(__file__)
        res = orch.run_command(
            orch.rollback_command(ctx["params"]["model"], ctx["params"]["to"] or None),
            root,
            orch.command_env(root, ctx["run_id"]),
            what="flywheel rollback",
        )
        return "\n".join(res.stderr_tail[-1:]) or "rolled back"

    rollback_champion()


rollback()
