"""continuous_improvement: one task per dvc.yaml stage, in order, then the release. Wiring only: the
decisions and the subprocess edge live in flywheel/orchestration.py."""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import (
    Asset,
    AssetOrTimeSchedule,
    CronTriggerTimetable,
    Param,
    TaskGroup,
    TriggerRule,
    chain,
    dag,
    get_current_context,
    task,
)


def _config():
    # schedule, retries and pool come from params.yaml; this module reads two local YAML files and
    # imports neither torch, mlflow nor great_expectations
    from flywheel.orchestration import dag_config

    return dag_config(__file__)


CFG = _config()
ORCH = CFG.params

DOC = f"""
### Continuous improvement

Runs on each `{CFG.feedback_asset}` asset event (from `feedback_ingest`) and on `{ORCH.fallback_schedule}`.

1. **check_feedback** retrains only when at least `min_new_events` ({ORCH.min_new_events}) events arrived
   since the last training, or their negative-feedback rate rose by more than `max_negative_rate_rise`
   ({ORCH.max_negative_rate_rise}); otherwise the run ends here and the reason is in this task's log and in
   its XCom `decision`.
2. One task per stage of `dvc.yaml` ({", ".join(CFG.stages)}), each `dvc repro --single-item <stage>` in
   the workspace, all in pool `{ORCH.pool}` (one slot): an up-to-date stage is skipped by DVC and `dvc.lock`
   records what each run used. A failed stage fails its task with the stage's stderr tail (the failed
   expectation or error).
3. **release** runs `flywheel release` (register, smoke-check, promote only the blessed), recording this
   run's id on the model version. With `approval_required: true` in params.yaml, a human approves or rejects
   first (Browse > Required Actions); the decision and who made it are tagged on the model version.

Reports: `reports/validate/data_docs/`, `reports/evaluate/report.md`, the verdict in `reports/blessing.json`
and in the **bless** task's log; the release table in the **release** task's log and XCom.

Manual trigger params: `force` skips the feedback threshold only (never the gate nor the smoke check),
`dry_run` decides and stops, `skip_release` trains and evaluates without releasing, `profile` sets
FLYWHEEL_PROFILE for the stages (none: params.yaml's). No param changes the gate: a profile sets sizes and
speeds only, and `flywheel release` accepts only a blessing from the gate params.yaml names (`bless.gate`).
"""


def _say(*lines: str) -> None:
    """Decision lines (RETRAIN/STOP, VERDICT, RELEASE) through the task's own logger, so they land in order
    before Airflow's "Done." line (a print goes through another channel and may come after it)."""
    import structlog

    log = structlog.get_logger("flywheel")
    for line in lines:
        log.info(line)


def _env(profile: str | None = None):
    from flywheel.orchestration import command_env

    ctx = get_current_context()
    decision = ctx["ti"].xcom_pull(task_ids="check_feedback", key="decision") or {}
    return command_env(
        CFG.root, ctx["run_id"], profile or ctx["params"].get("profile") or "", decision.get("loop_run_id", "")
    )


SYNCED = ["check_feedback", *CFG.stages, "record_training"]  # the tasks that change the workspace state


def _upstream_state(ti, task_id: str) -> dict | None:
    """The workspace state (dvc.lock & co.) the closest upstream task left in XCom (production topology)."""
    before = SYNCED[: SYNCED.index(task_id)] if task_id in SYNCED else SYNCED
    for tid in reversed(before):
        state = ti.xcom_pull(task_ids=tid, key="workspace_state")
        if state:
            return state
    return None


def _synced(task_id: str, work, push: list[str] | None = None, publish: bool = True, env=None):
    """``work()`` between a pull from and a push to the DVC remote when settings name one (workers on other
    machines see the same data); the new workspace state goes to XCom for the next task."""
    from flywheel import orchestration as orch

    ctx = get_current_context()
    result, state = orch.synced(
        CFG.root,
        env or _env(),
        ctx["run_id"],
        task_id,
        _upstream_state(ctx["ti"], task_id),
        work,
        push=push,
        publish=publish,
    )
    if state:
        ctx["ti"].xcom_push(key=orch.STATE_KEY, value=state)
    return result


def _stage(stage: str):
    @task(
        task_id=stage,
        pool=ORCH.pool,
        queue=ORCH.gpu_queue if stage in ORCH.gpu_stages else ORCH.default_queue,
        execution_timeout=timedelta(minutes=ORCH.stage_timeout_minutes),
        multiple_outputs=False,
        doc_md=f"`dvc repro --single-item {stage}` in the workspace (skipped by DVC when up to date).",
    )
    def run_stage() -> dict:
        from flywheel import orchestration as orch

        env = _env()
        result = orch.as_dict(
            _synced(
                stage,
                lambda: orch.run_stage(
                    CFG.root, stage, env, timeout=ORCH.stage_timeout_minutes * 60, warm=ORCH.warm_runner
                ),
                push=[stage],
                env=env,
            )
        )
        _say(*orch.stage_outcome(CFG.root, stage, env))  # e.g. bless's verdict, whether DVC ran or skipped it
        return result

    return run_stage()


# the graph view's groups (task ids stay the stage names); a stage not listed lands in "pipeline"
GROUPS = {
    "data": ["validate", "prepare"],
    "training": ["base_models", "resolve_champion", "train_reward", "train_policy"],
    "evaluation": ["evaluate", "bless"],
}


def _grouped_stages() -> list:
    """One task per dvc.yaml stage, in dvc.yaml's order, each inside its group of the graph view."""
    group_of = {stage: name for name, stages in GROUPS.items() for stage in stages}
    groups: dict[str, TaskGroup] = {}
    tasks = []
    for stage in CFG.stages:
        name = group_of.get(stage, "pipeline")
        if name not in groups:
            groups[name] = TaskGroup(group_id=name, prefix_group_id=False, tooltip=f"{name} stages (dvc.yaml)")
        with groups[name]:
            tasks.append(_stage(stage))
    return tasks


@dag(
    dag_id="continuous_improvement",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable(ORCH.fallback_schedule, timezone="UTC"), assets=Asset(CFG.feedback_asset)
    ),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["flywheel", "training"],
    doc_md=DOC,
    default_args={
        "retries": ORCH.retries,
        "retry_delay": timedelta(minutes=ORCH.retry_delay_minutes),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=ORCH.max_retry_delay_minutes),
    },
    params={
        "force": Param(False, type="boolean", description="retrain even below the feedback threshold"),
        "dry_run": Param(False, type="boolean", description="decide, show what would run, run nothing"),
        "skip_release": Param(False, type="boolean", description="train and evaluate, do not release"),
        "profile": Param(
            None,
            type=["null", "string"],
            enum=[None, *CFG.profiles],
            values_display={
                None: "params.yaml's profile",
                **{p: f"{p} (sizes and speeds; never the gate)" for p in CFG.profiles},
            },
            description="FLYWHEEL_PROFILE for the stages (none: params.yaml's); never changes the gate",
        ),
    },
)
def continuous_improvement():
    @task.short_circuit(pool=ORCH.pool)
    def check_feedback() -> bool:
        """Decide whether this run retrains; the reason goes to the log and to XCom ``decision``."""
        from flywheel import orchestration as orch
        from flywheel import tracking
        from flywheel.settings import load_settings

        ctx = get_current_context()
        params = ctx["params"]
        env = orch.command_env(CFG.root, profile=params.get("profile") or "")

        def decide():
            settings = load_settings(CFG.root, env=env)
            decision = orch.check_feedback(settings, settings.params.orchestration, params["force"])
            if decision.retrain and params["dry_run"]:
                decision.retrain, decision.reason = False, f"dry run, would retrain: {decision.reason}"
                orch.run_command(
                    [orch.console_script("dvc"), "status"], CFG.root, orch.command_env(CFG.root), check=False
                )
            return settings, decision

        # pull the latest published state; push whatever this workspace holds that the remote lacks
        settings, decision = _synced("check_feedback", decide, env=env)
        out = orch.as_dict(decision)
        if decision.retrain:
            out["loop_run_id"] = tracking.start_loop_run(
                settings, f"airflow {ctx['run_id']}", {"airflow.run_id": ctx["run_id"]}
            )
        ctx["ti"].xcom_push(key="decision", value=out)
        _say(("RETRAIN: " if decision.retrain else "STOP: ") + decision.reason)
        return decision.retrain

    @task(multiple_outputs=False)
    def record_training() -> dict:
        """The watermark: which raw-store batches this training saw (the next threshold counts from it)."""
        from flywheel import orchestration as orch
        from flywheel.settings import load_settings

        ctx = get_current_context()
        decision = ctx["ti"].xcom_pull(task_ids="check_feedback", key="decision")
        env = _env()
        return _synced(
            "record_training",
            lambda: orch.record_training(load_settings(CFG.root, env=env), decision["latest_batch"], ctx["run_id"]),
            push=[],
            env=env,
        )

    @task.branch
    def approval_needed() -> str:
        from flywheel.settings import load_settings

        params = get_current_context()["params"]
        required = load_settings(CFG.root, env=_env()).params.orchestration.approval_required
        return "approve_release" if required and not params["skip_release"] else "release"

    @task(pool=ORCH.pool, trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS)
    def release() -> list[dict]:
        """``flywheel release``: register, smoke-check, promote the blessed; this run's id is tagged."""
        from airflow.sdk.exceptions import AirflowSkipException

        from flywheel import orchestration as orch

        ctx = get_current_context()
        if ctx["params"]["skip_release"]:
            raise AirflowSkipException("skip_release is set: trained and evaluated, not released")
        answer = ctx["ti"].xcom_pull(task_ids="approve_release")
        approved_by = _responder(answer) if answer else None
        env = _env()
        rows = _synced(
            "release",
            lambda: orch.run_release(CFG.root, env, approved_by=approved_by, timeout=ORCH.stage_timeout_minutes * 60),
            publish=False,
            env=env,
        )
        ran = [t for t in CFG.stages if (ctx["ti"].xcom_pull(task_ids=t) or {}).get("ran")]
        _say(*orch.release_summary(rows, ran))
        return rows

    @task(pool=ORCH.pool, trigger_rule=TriggerRule.NONE_FAILED)
    def record_rejection() -> list[dict] | None:
        """After a rejection: register and check the challengers, never promote, tag who rejected."""
        from airflow.sdk.exceptions import AirflowSkipException

        from flywheel import orchestration as orch

        answer = get_current_context()["ti"].xcom_pull(task_ids="approve_release")
        if not answer or answer.get("chosen_options") != ["Reject"]:
            raise AirflowSkipException("no rejection to record")
        env = _env()
        return _synced(
            "record_rejection",
            lambda: orch.run_release(
                CFG.root, env, rejected_by=_responder(answer), timeout=ORCH.stage_timeout_minutes * 60
            ),
            publish=False,
            env=env,
        )

    stages = _grouped_stages()
    with TaskGroup(group_id="approval_and_release", prefix_group_id=False, tooltip="approval, then the release"):
        approve = _approval()
        branch = approval_needed()
        released = release()
    chain(check_feedback(), *stages, record_training(), branch, approve, released, record_rejection())
    branch >> released


def _responder(answer: dict) -> str:
    user = answer.get("responded_by_user") or {}
    return f"{user.get('name') or user.get('id') or 'unknown'}"


def _approval():
    # imported here: the HITL operator comes from the standard provider, not airflow.sdk
    from airflow.providers.standard.operators.hitl import ApprovalOperator

    return ApprovalOperator(
        task_id="approve_release",
        subject="Release the challenger? (run {{ run_id }})",
        body=(
            "The gate's verdict is in `reports/blessing.json` and the **bless** task's log; the evaluation "
            "report is `reports/evaluate/report.md`. Approve to run `flywheel release` (it still promotes only "
            "a blessed challenger that passes its smoke check); reject to register it without promotion."
        ),
        defaults="Reject",
        response_timeout=timedelta(hours=ORCH.approval_timeout_hours),
        retries=0,
    )


continuous_improvement()
