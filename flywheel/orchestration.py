"""What the Airflow DAGs decide and run, kept free of Airflow: the retrain threshold, the training
watermark, the ``dvc repro`` command of a stage, and the subprocess edge (``dvc``, ``flywheel``) that
turns a failed command into an error carrying its stderr tail and keeps every command inside the task's
process tree (a timeout or kill of the task stops it and its children).

The DAG files in ``dags/`` only wire these together. Every stage runs through ``dvc repro`` in the
workspace, so Airflow and a user at the shell share one definition (dvc.yaml) and one record (dvc.lock).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flywheel.params import OrchestrationParams
from flywheel.settings import Settings, find_root, load_params

FEEDBACK_ASSET = "flywheel-feedback"
WATERMARK = Path("orchestration") / "last_training.json"  # under settings.reports
_NO_EXPORT = "No such command 'export'"

Log = Callable[[str], None]


def say(line: str) -> None:
    """Print and flush: a task's log shows each line when it happens, before Airflow's own "Done." lines
    (buffered prints landed after them, in the collapsed post-execute group)."""
    print(line, flush=True)


class CommandFailed(RuntimeError):
    """A ``dvc`` or ``flywheel`` command exited non-zero; the message ends with its stderr tail."""


class ExportUnavailable(CommandFailed):
    """No ``flywheel`` executable or no ``export`` command in it: a broken install, so the export task fails
    (a skip would look like "no new feedback" while the service's events pile up unexported)."""


@dataclass(frozen=True)
class DagConfig:
    """What a DAG file needs at parse time: the workspace, its orchestration params and stage order."""

    root: Path
    params: OrchestrationParams
    stages: list[str]
    profiles: list[str]
    feedback_asset: str = FEEDBACK_ASSET
    trace_experiment: str = ""  # params ingest.traces.experiment: feedback_ingest also pulls its assessments


def workspace_root(dag_file: str | Path) -> Path:
    """$FLYWHEEL_ROOT, else the parent of the folder holding the DAG file."""
    env = os.environ.get("FLYWHEEL_ROOT")
    return find_root() if env else Path(dag_file).resolve().parent.parent


def dag_config(dag_file: str | Path) -> DagConfig:
    """Parse-time configuration: reads params.yaml and dvc.yaml (local files only, no heavy imports)."""
    import yaml

    root = workspace_root(dag_file)
    params = load_params(root / "params.yaml", os.environ.get("FLYWHEEL_PROFILE"))
    stages = list((yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages", {}))
    raw = yaml.safe_load((root / "params.yaml").read_text()) or {}
    profiles = sorted(raw.get("profiles") or {})
    return DagConfig(root, params.orchestration, stages, profiles, trace_experiment=params.ingest.traces.experiment)


# ---- the retrain threshold -------------------------------------------------------------------------


@dataclass
class Decision:
    retrain: bool
    reason: str
    new_events: int
    new_negative_rate: float | None
    trained_negative_rate: float | None
    latest_batch: str | None


def decide(
    new_events: int,
    new_negative_rate: float | None,
    trained_negative_rate: float | None,
    params: OrchestrationParams,
    force: bool = False,
    latest_batch: str | None = None,
) -> Decision:
    """Retrain when enough new events arrived, or when their negative-feedback rate rose past the limit."""
    args = (new_events, new_negative_rate, trained_negative_rate, latest_batch)
    if new_events >= max(params.min_new_events, 1):
        return Decision(
            True, f"{new_events} new events since the last training >= min_new_events {params.min_new_events}", *args
        )
    rise = None
    if new_negative_rate is not None and trained_negative_rate is not None:
        rise = new_negative_rate - trained_negative_rate
    if rise is not None and new_events >= params.min_events_for_rate and rise > params.max_negative_rate_rise:
        return Decision(
            True,
            f"negative-feedback rate rose by {rise:.3f} ({trained_negative_rate:.3f} -> "
            f"{new_negative_rate:.3f}) > max_negative_rate_rise {params.max_negative_rate_rise}",
            *args,
        )
    below = f"{new_events} new events since the last training < min_new_events {params.min_new_events}" + (
        f", negative-feedback rate rise {rise:+.3f} <= {params.max_negative_rate_rise}"
        if rise is not None and new_events >= params.min_events_for_rate
        else ""
    )
    if force:
        return Decision(True, f"forced (the feedback threshold is skipped): {below}", *args)
    return Decision(False, f"not retraining: {below}", *args)


def _load_watermark(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def check_feedback(settings: Settings, params: OrchestrationParams, force: bool = False) -> Decision:
    """Count the raw-store events the last training did not see and decide whether to retrain."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from flywheel.data import rawstore

    table = rawstore.read_columns(settings.raw_store, ["batch_id", "polarity"])
    batches = table.column("batch_id")
    latest = pc.max(batches).as_py() if table.num_rows else None
    mark = _load_watermark(settings.reports / WATERMARK)
    seen = pa.array(mark["batch_ids"] if mark else [], type=pa.string())
    new = pc.invert(pc.is_in(batches, value_set=seen))
    new_negative = pc.filter(pc.equal(table.column("polarity"), -1), new)
    new_rate = pc.mean(pc.cast(new_negative, pa.float64())).as_py() if len(new_negative) else None
    return decide(len(new_negative), new_rate, mark.get("negative_rate") if mark else None, params, force, latest)


def record_training(settings: Settings, upto_batch: str | None, airflow_run_id: str = "") -> dict:
    """Write the watermark: the raw-store batches (up to ``upto_batch``) the training that just ran saw."""
    import pyarrow.compute as pc

    from flywheel.data import rawstore

    table = rawstore.read_columns(settings.raw_store, ["batch_id", "polarity"])
    if upto_batch is not None:
        table = table.filter(pc.less_equal(table.column("batch_id"), upto_batch))
    n = table.num_rows
    mark = {
        "batch_ids": sorted(set(table.column("batch_id").to_pylist())),
        "events": n,
        "negative_rate": pc.mean(pc.cast(pc.equal(table.column("polarity"), -1), "float64")).as_py() if n else None,
        "airflow_run_id": airflow_run_id,
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = settings.reports / WATERMARK
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(mark, indent=1))
    os.replace(tmp, path)
    return {k: v for k, v in mark.items() if k != "batch_ids"} | {"batches": len(mark["batch_ids"])}


# ---- commands ----------------------------------------------------------------------------------------


def console_script(name: str) -> str:
    """A console script of this environment (beside the running interpreter), else the name for PATH."""
    here = Path(sys.executable).with_name(name)
    return str(here) if here.exists() else name


def stage_command(stage: str) -> list[str]:
    """The one way a stage runs: ``dvc repro --single-item STAGE`` (skipped by DVC when up to date)."""
    return [console_script("dvc"), "repro", "--single-item", stage]


def release_command(approved_by: str | None = None, rejected_by: str | None = None) -> list[str]:
    cmd = [console_script("flywheel"), "release", "--json"]
    if approved_by:
        cmd += ["--approved-by", approved_by]
    if rejected_by:
        cmd += ["--rejected-by", rejected_by]
    return cmd


def rollback_command(model: str = "policy", to: str | None = None) -> list[str]:
    return [console_script("flywheel"), "rollback", "--model", model] + (["--to", str(to)] if to else [])


def command_env(root: Path, airflow_run_id: str = "", profile: str = "", loop_run_id: str = "") -> dict[str, str]:
    """The environment of a stage or CLI subprocess: this one, the venv first, the workspace and the run ids
    (never a local warm runner's socket: see ``run_stage``)."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(FLYWHEEL_ROOT=str(root), DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1")
    env.pop("FLYWHEEL_WARM_SOCKET", None)
    if airflow_run_id:
        env.update(FLYWHEEL_AIRFLOW_RUN_ID=airflow_run_id, AIRFLOW_CTX_DAG_RUN_ID=airflow_run_id)
    if profile:
        env["FLYWHEEL_PROFILE"] = profile
    if loop_run_id:
        env["FLYWHEEL_PARENT_RUN_ID"] = loop_run_id
    return env


@dataclass
class CommandResult:
    cmd: list[str]
    returncode: int
    seconds: float
    stdout: str
    stderr_tail: list[str] = field(default_factory=list)


def stop_tree(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM ``proc`` and every process under it, SIGKILL what is left after ``grace`` seconds, reap ``proc``.
    The tree is listed before anything is signalled (a dead parent's children are re-parented out of reach)."""
    import psutil

    def listed(pids: list[int]) -> list[psutil.Process]:
        found = []
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                found += psutil.Process(pid).children(recursive=True)
        return found

    def running(procs: list[psutil.Process]) -> list[psutil.Process]:
        alive = []
        for p in procs:  # a zombie has ended: only its exit status is left for its parent
            with contextlib.suppress(psutil.Error):
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
        return alive

    under = listed([proc.pid])
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is None:  # Popen's own call: it reaps ``proc`` and keeps its exit status
            with contextlib.suppress(OSError):
                proc.send_signal(sig)
        for p in under:
            with contextlib.suppress(psutil.Error):
                p.send_signal(sig)
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 5.0)
        while (proc.poll() is None or running(under)) and time.monotonic() < deadline:
            time.sleep(0.05)
        under = running(under)
        under += [p for p in listed([p.pid for p in under]) if p not in under]  # started meanwhile
        if proc.poll() is not None and not under:
            return


def run_command(
    cmd: list[str],
    root: Path,
    env: dict[str, str],
    log: Log = say,
    what: str = "",
    timeout: float | None = None,
    tail: int = 25,
    check: bool = True,
    grace: float = 10.0,
) -> CommandResult:
    """Run ``cmd`` in ``root``, echoing both streams line by line to ``log``; on a non-zero exit raise
    ``CommandFailed`` whose message ends with the last ``tail`` lines of stderr.

    The command stays in the caller's process tree and process group: Airflow (3.x signals the task's whole
    group), Celery and a cgroup's limits reach it and everything it starts. On ``timeout``, or when the wait is
    interrupted (Airflow's ``execution_timeout`` raises inside the task, SIGINT, ...), the whole tree under it is
    stopped (SIGTERM, SIGKILL after ``grace`` seconds) before this returns or raises."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=root, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=1
    )
    out: list[str] = []
    err: deque[str] = deque(maxlen=tail)

    def pump(stream, sink, prefix: str) -> None:
        for line in stream:
            line = line.rstrip("\n")
            sink.append(line)
            log(prefix + line)

    readers = [
        threading.Thread(target=pump, args=(proc.stdout, out, ""), daemon=True),
        threading.Thread(target=pump, args=(proc.stderr, err, "[stderr] "), daemon=True),
    ]
    for r in readers:
        r.start()
    killed = False
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_tree(proc, grace)
        rc, killed = proc.wait(), True
        err.append(f"killed after {timeout:.0f} s")
    except BaseException:
        stop_tree(proc, grace)
        raise
    for r in readers:
        r.join(timeout=30 if killed else None)  # a process that left the tree may hold the pipes
    result = CommandResult(cmd, rc, time.perf_counter() - t0, "\n".join(out), list(err))
    if check and rc != 0:
        label = what or " ".join(Path(cmd[0]).name.split() + cmd[1:])
        detail = "\n".join(err) or "\n".join(out[-tail:]) or "(no output)"
        raise CommandFailed(f"{label} failed (exit {rc}):\n{detail}")
    return result


@dataclass
class StageResult:
    stage: str
    ran: bool
    seconds: float


def run_stage(
    root: Path,
    stage: str,
    env: dict[str, str],
    log: Log = say,
    timeout: float | None = None,
    warm: bool = True,
    entry: str | None = None,
) -> StageResult:
    """Run one dvc.yaml stage in the workspace (DVC skips it when nothing it depends on changed), inside this
    process's tree: ``timeout`` or a kill of the task stops it and its children (see ``run_command``). Never in a
    local warm runner (flywheel/warm.py: one another process started, outside the task's tree, timeout and
    cgroup); with ``warm`` (params ``orchestration.warm_runner``), in this task's own runner (``stage_runner``),
    which imports the stage's libraries while DVC starts."""
    env = {**{k: v for k, v in env.items() if k != "FLYWHEEL_WARM_SOCKET"}, "FLYWHEEL_WARM": "0"}
    with stage_runner(root, env, stage, log, entry) if warm else contextlib.nullcontext() as sock:
        run_env = {**env, "FLYWHEEL_WARM_SOCKET": sock} if sock else env
        res = run_command(
            stage_command(stage), root, run_env, log, what=f"stage {stage!r} (dvc repro)", timeout=timeout
        )
    ran = f"Running stage '{stage}'" in res.stdout
    log(f"stage {stage}: {'ran' if ran else 'up to date, skipped by DVC'} in {res.seconds:.1f} s")
    return StageResult(stage, ran, round(res.seconds, 2))


class _Forked:
    """A forked child seen as ``stop_tree`` sees a ``Popen``: its pid, whether it ended (reaped), a signal."""

    def __init__(self, pid: int):
        self.pid, self.returncode = pid, None

    def poll(self) -> int | None:
        if self.returncode is None:
            with contextlib.suppress(ChildProcessError):
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)


@contextlib.contextmanager
def stage_runner(root: Path, env: dict[str, str], stage: str, log: Log = say, entry: str | None = None):
    """A warm runner (flywheel/warm_runner.py) for one task's stage, started as this process's child and in its
    process group, so the task's timeout, kill and cgroup reach the stage it forks (``--in-group``); it listens in
    a fresh 0700 folder of its own and gets ``env`` (the stage's environment). It imports MLflow and the stage's
    step (``pipelines.STAGE`` and its ``PRELOAD`` list: torch, transformers, GX, ...) while `dvc repro` starts; a
    stage in a task otherwise paid them after DVC's own start. Where this task's worker preloaded the libraries
    (flywheel/airflow_worker.py) under the stage's import-time environment, the runner is a fork of this task
    (``warm_runner.fork_serve``), warm at once. Yields
    its socket, or None where it cannot start (the stage then runs cold, as before); stopped on exit.
    ``entry``: what its child calls (default: the flywheel CLI)."""
    import shutil
    import tempfile

    from flywheel import warm, warm_runner

    folder = proc = None
    try:
        folder = Path(tempfile.mkdtemp(prefix="task-", dir=warm.private_dir(env)))  # mode 0700
        path = str(folder / "s.sock")
        if len(path.encode()) > warm._MAX_SOCKET_PATH:
            raise OSError(f"socket path too long: {path}")
        modules, entry = (f"pipelines.{stage}",), entry or warm.DEFAULT_ENTRY
        if warm_runner.preloaded_for(env):  # this task's worker imported the libraries: fork them, warm
            pid = warm_runner.fork_serve(path, entry, env, root, modules, folder / "runner.log")
            proc = _Forked(pid)
            log("the task's runner is forked from its worker's preloaded libraries")
        else:
            if differ := warm_runner.preload_differences(env):
                log(f"the worker preloaded its libraries under other values of {', '.join(differ)}: not shared")
            cmd = warm.runner_command(path, entry, 24 * 3600.0, in_group=True, modules=modules)
            with open(folder / "runner.log", "wb") as out:
                proc = subprocess.Popen(cmd, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=out)
        deadline = time.monotonic() + 30
        while not os.path.exists(path) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # it binds before it imports anything heavy: milliseconds
        if not os.path.exists(path):
            raise OSError("it did not start")
    except OSError as exc:
        log(f"no warm runner for this task ({exc}): the stage runs in its own process")
        path = None
    try:
        yield path
    finally:
        if proc is not None:
            stop_tree(proc, grace=5.0)  # with its child when the stage was stopped early (timeout, failure)
            with contextlib.suppress(OSError):
                if "refused" in (folder / "runner.log").read_text(errors="replace"):
                    log("the task's warm runner refused the stage (another environment): it ran in its own process")
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def _last_json(stdout: str):
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith(("{", "[")):
            return json.loads(line)
    raise ValueError("no JSON line in the command's output")


def stage_outcome(root: Path, stage: str, env: dict[str, str]) -> list[str]:
    """What a stage's task log should end with, whether the stage ran or DVC skipped it: the gate's verdict for
    ``bless`` (read from its output, so a skipped bless still says what it decided), nothing for the others."""
    if stage != "bless":
        return []
    from flywheel import verdicts
    from flywheel.settings import load_settings

    path = load_settings(root, env=env).reports / "blessing.json"
    if not path.is_file():
        return [f"bless: no verdict at {path}"]
    blessing = json.loads(path.read_text())
    lines = [f"VERDICT ({blessing.get('gate', '?')} gate, judge: {blessing.get('judge', 'none')}):"]
    lines += [f"  {kind}: {verdicts.of_blessing(blessing.get(kind) or {})}" for kind in ("policy", "reward")]
    return lines + [f"  every rule: {path.with_suffix('.md')}"]


def release_summary(rows: list[dict], stages_ran: list[str]) -> list[str]:
    """The release task's closing lines: one verdict per model (``flywheel release``'s table) and, when no stage
    ran in this run, that nothing was retrained (the release re-checked the challengers already there)."""
    lines = []
    if not stages_ran:
        lines.append(
            "NOTHING RETRAINED: every stage was up to date (DVC skipped it); the release re-checked the "
            "challengers of an earlier run"
        )
    lines.append("RELEASE:")
    lines += [f"  {r['model']:<7} v{r['version'] or '-':<4} {r.get('verdict', '')}" for r in rows]
    return lines


def run_release(
    root: Path,
    env: dict[str, str],
    log: Log = say,
    approved_by: str | None = None,
    rejected_by: str | None = None,
    timeout: float | None = None,
) -> list[dict]:
    """``flywheel release --json``: register, smoke-check and promote the blessed; one row per model."""
    res = run_command(
        release_command(approved_by, rejected_by), root, env, log, what="flywheel release", timeout=timeout
    )
    return _last_json(res.stdout)


def run_export(root: Path, env: dict[str, str], log: Log = say, timeout: float | None = None) -> dict:
    """``flywheel export --json``: new feedback-store events into the raw store; returns its counts.
    Raises ``ExportUnavailable`` (a ``CommandFailed``) when this install has no such executable or command."""
    cmd = [console_script("flywheel"), "export", "--json"]
    try:
        res = run_command(cmd, root, env, log, what="flywheel export", timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise ExportUnavailable(
            f"no `flywheel` executable ({cmd[0]!r} is neither beside {sys.executable} nor on "
            f"PATH): the install is broken; nothing exported"
        ) from exc
    if res.returncode != 0 and any(_NO_EXPORT in line for line in res.stderr_tail):
        raise ExportUnavailable(
            "`flywheel export` is not available in this install: it is broken or too old; nothing exported"
        )
    if res.returncode != 0:
        raise CommandFailed(f"flywheel export failed (exit {res.returncode}):\n" + "\n".join(res.stderr_tail))
    counts = _last_json(res.stdout)
    if not isinstance(counts, dict):
        raise ValueError(f"flywheel export --json printed {counts!r}, expected an object of counts")
    return counts


def run_trace_ingest(root: Path, env: dict[str, str], log: Log = say, timeout: float | None = None) -> dict:
    """``flywheel ingest --from mlflow --json``: the human assessments made since the last pull on the traces of
    params ``ingest.traces.experiment``, as a raw-store batch; returns its counts."""
    cmd = [console_script("flywheel"), "ingest", "--from", "mlflow", "--json"]
    res = run_command(cmd, root, env, log, what="flywheel ingest --from mlflow", timeout=timeout, check=False)
    if res.returncode != 0:  # a batch quarantined whole fails too: someone must look (its watermark stays)
        tail = "\n".join(res.stderr_tail)
        raise CommandFailed(f"flywheel ingest --from mlflow failed (exit {res.returncode}):\n{tail}")
    counts = _last_json(res.stdout)
    if not isinstance(counts, dict):
        raise ValueError(f"flywheel ingest --json printed {counts!r}, expected an object of counts")
    return counts


def exported_events(counts: dict) -> int:
    """How many new events an export stored (``exported``; ``accepted`` as ingest names it)."""
    return int(counts.get("exported", counts.get("accepted", 0)) or 0)


def as_dict(obj) -> dict:
    return asdict(obj)


# ---- the DVC remote between workers (production: settings ``dvc_remote``; see flywheel/remote.py) ------------
STATE_KEY = "workspace_state"
SYNC_LOCK_TIMEOUT = 1800.0  # a task waits this long for a command run by hand in its workspace


def synced(
    root: Path,
    env: dict[str, str],
    run_id: str,
    task_id: str,
    state: dict | None,
    work: Callable[[], object],
    push: list[str] | None = None,
    publish: bool = True,
    log: Log = say,
) -> tuple[object, dict | None]:
    """Run ``work`` between a pull and a push through the DVC remote when one is set (settings
    ``dvc_remote``): the workspace gets ``state`` (the previous task's; the latest published when None) and its
    data first; afterwards what the task produced (``push`` targets, all when None) is pushed and the new state
    (with the training watermark) returned and, when ``publish``, written to the remote. Without a remote:
    ``work()`` alone, state None (one shared workspace: nothing to sync).

    The whole of it holds the workspace lock (flywheel/workspace.py), so a command run by hand in this
    workspace waits for it (the commands the task itself starts run under its lock); a sync never overwrites
    unpublished local changes (``remote.UnpublishedChanges`` names them and the fix)."""
    from flywheel import remote, workspace
    from flywheel.settings import load_settings

    settings = load_settings(root, env=env)
    url = settings.dvc_remote
    if not url:
        return work(), None
    watermark = [settings.reports / WATERMARK]
    with workspace.locked(root, f"task {task_id} of run {run_id}", timeout=SYNC_LOCK_TIMEOUT):
        remote.sync_in(root, url, env, state, log, extra=watermark, task=f"{run_id}/{task_id}")
        result = work()
        if not publish:
            remote.end_task(root)
            return result, remote.read_state(root, watermark)
        return result, remote.sync_out(root, url, env, run_id, task_id, push, watermark, log)
