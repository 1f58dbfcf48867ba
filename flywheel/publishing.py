"""Commands run by hand and the DVC remote: the workspace lock and the remote sync around every command that
changes the raw store (ingest, export, erase), and the explicit ``publish`` and ``restore``.

A DAG task syncs in before it runs and publishes after (flywheel/orchestration.py); a command run by hand does
the same here, so the next task's sync neither deletes what it added nor brings back what it erased."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator

from flywheel import orchestration as orch
from flywheel import remote, workspace
from flywheel.settings import Settings, SettingsError

Log = Callable[[str], object]


def run_id(s: Settings) -> str:
    """The run a hand-run command publishes as: the Airflow run driving it, else ``cli__<UTC time>-<pid>``."""
    return s.airflow_run_id or time.strftime("cli__%Y-%m-%dT%H:%M:%SZ", time.gmtime()) + f"-{os.getpid()}"


@contextlib.contextmanager
def changing_raw_store(s: Settings, command: str, log: Log = print) -> Iterator[list[str]]:
    """Around a command that changes the raw store: the workspace lock (one for all of them and the DAG tasks,
    so none interleaves) and, with a DVC remote, the remote's latest state pulled first (never over unpublished
    local changes) and this command's result pushed and published after. Yields the list of extra paths to push
    (the raw store's pointer always is). Raises WorkspaceError / RemoteError, or SettingsError when
    ``dvc_remote`` is set on a workspace that is no DVC repository."""
    push: list[str] = []
    with workspace.locked(s.root, f"flywheel {command}"):
        if not s.dvc_remote:
            yield push
            return
        if not workspace.is_dvc_repo(s.root):
            raise SettingsError(f"dvc_remote is set but {s.root} is not a DVC repository: run `flywheel init` first")
        env, extra, rid = dict(os.environ), [s.reports / orch.WATERMARK], run_id(s)
        remote.sync_in(s.root, s.dvc_remote, env, None, log=log, extra=extra, task=f"{rid}/{command}")
        yield push
        pointer = s.raw_store.with_name(s.raw_store.name + ".dvc")
        targets = [str(p.relative_to(s.root)) for p in (pointer,) if p.is_file()] + push
        remote.sync_out(s.root, s.dvc_remote, env, rid, command, targets, extra, log=log)
        log(f"published to {s.dvc_remote} as the latest state (run {rid}, task {command})")


def _need_remote(s: Settings, why: str) -> str:
    if not s.dvc_remote:
        raise SettingsError(f"dvc_remote is not set (FLYWHEEL_DVC_REMOTE or params.yaml settings.dvc_remote): {why}")
    return s.dvc_remote


def publish(s: Settings, log: Log = print) -> tuple[dict[str, str], str]:
    """Push this workspace's data and publish its state (dvc.lock, the raw-store pointer, the watermark) as the
    remote's latest, merged with what the remote holds. Returns (the state published, the run id)."""
    url, env, rid = _need_remote(s, "nothing to publish to"), dict(os.environ), run_id(s)
    with workspace.locked(s.root, "flywheel publish"):
        remote.configure(s.root, url, env)
        state = remote.sync_out(s.root, url, env, rid, "publish", None, [s.reports / orch.WATERMARK], log=log)
    return state, rid


def restore(s: Settings, run: str | None, task: str | None, force: bool, log: Log = print) -> dict[str, str] | None:
    """Put this workspace in the state a run (or, without ``run``, the latest task or command) left on the remote
    and pull its data; None, changing nothing, when the remote holds no such state."""
    url, env = _need_remote(s, "runs left their state on no remote"), dict(os.environ)
    with workspace.locked(s.root, "flywheel restore"):
        state = remote.fetch_state(url, env, run, task) if run else remote.fetch_state(url, env)
        if state is None:
            return None
        remote.sync_in(s.root, url, env, state, log=log, extra=[s.reports / orch.WATERMARK], force=force)
    return state
