"""The warm runner's process (see flywheel/warm.py, the side of its callers): it preloads the heavy third-party
libraries, listens on a Unix socket in the private folder and forks a child per ``flywheel stage ...`` request
from a caller of its own environment; the child becomes the caller and calls the entry point it was handed.

    python -P -m flywheel.warm_runner SOCKET --entry flywheel.cli:main [--idle-timeout 600] [--no-preload]
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from flywheel.warm import _REFUSED, DEFAULT_ENTRY, _pid_of, env_key, private_dir_check

# What MLflow's client needs here (its SQL store modules are otherwise imported lazily, ~1 s): a step's PRELOAD
# names the group as "mlflow".
PRELOAD_MLFLOW = (
    "mlflow",
    "mlflow.tracking",
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.model_registry.sqlalchemy_store",
    "mlflow.store.db.utils",
    "alembic.command",
    "alembic.runtime.migration",
    "sqlalchemy",
)
# What loading a model folder imports (transformers' auto classes): a step's PRELOAD names the group as "models",
# then the model classes of the shipped models it loads.
PRELOAD_MODELS = (
    "transformers",
    "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto",
)
# The groups a step's PRELOAD may name: a name, not an import of this module, so that a step file depends (for
# dvc.yaml's deps) on no code it does not run.
PRELOAD_GROUPS = {"mlflow": PRELOAD_MLFLOW, "models": PRELOAD_MODELS}
PRELOAD_CLI = ("typer", "rich.console", "yaml", "pydantic")  # every `flywheel stage` command
# Imported before the first request is taken: what every stage command needs (the CLI and the MLflow registry
# read of resolve_champion, the first stage of every run).
PRELOAD = PRELOAD_MLFLOW + PRELOAD_CLI
# Imported one by one while the runner waits for requests, in the order the stages need them (a command that
# arrives first imports what it lacks itself, as a cold process would).
PRELOAD_LATER = (
    "great_expectations",
    "pandas",
    "pyarrow.parquet",
    "datasketch",
    "torch",
    "transformers",
    "transformers.models.llama.modeling_llama",
    "transformers.models.bert.modeling_bert",
    "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto",
    "matplotlib.pyplot",
)
_MAX_REQUEST = 1 << 20
POLL_SECONDS = 0.2  # the serving loop's longest sleep: a child's exit wakes it at once (``_exit_watch``)

# ---- a worker that preloads ------------------------------------------------------------------------------------
# An Airflow worker forks each task (Airflow 3's supervisor: os.fork), so what the worker imported before, every
# task has without paying for it; a task's runner forked from its task (``fork_serve``) then starts warm. The
# variables a library may read when it is imported rather than when it is called: a task's runner is forked only
# when the stage's environment has the values the worker imported under, else it starts a fresh interpreter.
IMPORT_TIME_PREFIXES = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TORCH", "PYTORCH_", "OMP_", "MKL_", "KMP_", "CUDA_")
IMPORT_TIME_PREFIXES += ("GX_", "GE_", "TOKENIZERS_", "SQLALCHEMY_", "LD_")  # not MLflow's: read when used
IMPORT_TIME_NAMES = frozenset({"PYTHONPATH", "PYTHONHOME", "PYTHONHASHSEED", "PYTHONNOUSERSITE", "MPLBACKEND"})
_preloaded_under: dict[str, str] | None = None  # the import-time variables of ``preload_worker``'s imports
_fresh_path: list[str] = []  # sys.path of ``python -P`` here: the console script's, which a forked runner takes
_library_handlers: dict[str, list] = {}  # the logging handlers the preloaded libraries attached to their loggers


def _import_time_env(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME_PREFIXES) or k in IMPORT_TIME_NAMES}


def preload_worker(modules: tuple[str, ...] | None = None) -> float:
    """Import every stage's third-party libraries (``PRELOAD``, ``PRELOAD_LATER``, or ``modules``; never the
    project's modules, so a code change is seen by the next task) in this process, an Airflow worker before it
    forks its tasks (flywheel/airflow_worker.py); the seconds it took."""
    global _preloaded_under, _fresh_path
    import subprocess

    started = time.perf_counter()
    probe = [sys.executable, "-P", "-c", "import json, sys; print(json.dumps(sys.path))"]
    _fresh_path = json.loads(subprocess.run(probe, capture_output=True, text=True, check=True).stdout)
    os.environ.setdefault("MPLBACKEND", "Agg")  # as ``serve`` sets it before matplotlib is imported
    for name in PRELOAD_CLI + PRELOAD + PRELOAD_LATER if modules is None else modules:
        _import(name)
    _preloaded_under = _import_time_env(os.environ)
    import logging

    loggers = logging.root.manager.loggerDict.items()
    _library_handlers.update({k: list(v.handlers) for k, v in loggers if isinstance(v, logging.Logger)})
    return time.perf_counter() - started


PROJECT_PACKAGES = ("flywheel", "pipelines", "service")
_KEEP = {"flywheel", "flywheel.warm", "flywheel.warm_runner"}  # the runner's own code, running


def _forget_project_modules() -> None:
    """In a runner forked from a task: the project's modules the task imported are imported afresh by the stage
    (as in a runner that preloads only libraries), with no state an earlier task of the same process left in
    them (``airflow dags test`` runs every task in one process)."""
    for name in [m for m in sys.modules if m.split(".")[0] in PROJECT_PACKAGES and m not in _KEEP]:
        del sys.modules[name]


def _forget_connections() -> None:
    """In a runner forked from a task: a SQLAlchemy pool (MLflow keeps an engine per store URI) never hands out a
    connection opened by another process (the task's; SQLAlchemy's recipe for a fork: a ``checkout`` listener
    that drops it without closing it), so a stage opens its own."""
    if "sqlalchemy" not in sys.modules:
        return
    from sqlalchemy import event, exc
    from sqlalchemy.pool import Pool

    def on_connect(_dbapi_connection, record) -> None:
        record.info["flywheel_pid"] = os.getpid()

    def on_checkout(_dbapi_connection, record, proxy) -> None:
        if record.info.get("flywheel_pid") != os.getpid():
            record.dbapi_connection = proxy.dbapi_connection = None
            raise exc.DisconnectionError("a connection of another process (the task this runner was forked from)")

    event.listen(Pool, "connect", on_connect)
    event.listen(Pool, "checkout", on_checkout)


def _blank_descriptors(null: int, keep: tuple[int, ...]) -> None:
    """In a runner forked from a task: every descriptor it inherited (the task's connections to Airflow, its log,
    its database connections) now points at /dev/null. Not closed: a Python object of the task that still owns
    one closes its number when freed, which must not be a socket or file the runner opened since."""
    try:
        inherited = [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError:  # no /proc: every number up to the soft limit
        import resource

        inherited = range(3, min(resource.getrlimit(resource.RLIMIT_NOFILE)[0], 1 << 16))
    for fd in inherited:
        if fd > 2 and fd != null and fd not in keep:
            with contextlib.suppress(OSError):
                os.fstat(fd)
                os.dup2(null, fd)


def _fresh_process_state() -> None:
    """In a runner forked from a task: the standard streams, logging and warnings of a new interpreter, not the
    task's (Airflow sends the task's records to its supervisor over a descriptor that points at /dev/null here)."""
    import logging
    import warnings

    sys.stdin = sys.__stdin__ = open(0, closefd=False)  # noqa: SIM115 - the process's own, for its lifetime
    sys.stdout = sys.__stdout__ = open(1, "w", closefd=False)  # noqa: SIM115
    sys.stderr = sys.__stderr__ = open(2, "w", closefd=False)  # noqa: SIM115
    logging.captureWarnings(False)
    warnings.showwarning = warnings._showwarning_orig  # type: ignore[attr-defined]
    logging.root.handlers.clear()
    logging.root.setLevel(logging.WARNING)
    for name, logger in logging.root.manager.loggerDict.items():
        if isinstance(logger, logging.Logger):
            logger.handlers[:] = _library_handlers.get(name, [])
    if "structlog" in sys.modules:
        sys.modules["structlog"].reset_defaults()


def preloaded_for(env: Mapping[str, str]) -> bool:
    """Whether this process holds ``preload_worker``'s imports, made under ``env``'s import-time variables."""
    return _preloaded_under is not None and not preload_differences(env)


def preload_differences(env: Mapping[str, str]) -> list[str]:
    """The import-time variables whose values in ``env`` differ from those ``preload_worker`` imported under
    (none where nothing was preloaded)."""
    if _preloaded_under is None:
        return []
    now = _import_time_env({"MPLBACKEND": "Agg", **env})
    return sorted(k for k in set(now) | set(_preloaded_under) if now.get(k) != _preloaded_under.get(k))


def fork_serve(path: str, entry: str, env: Mapping[str, str], cwd: Path, modules: tuple[str, ...], log: Path) -> int:
    """Fork this process (a task whose worker preloaded) into a task's runner: ``serve`` on ``path`` with ``env``
    in ``cwd``, its children in this process group, importing the CLI's libraries and ``modules`` (the stage's
    step) ahead; stdout and stderr to ``log``. Returns the runner's pid (the caller stops it). The runner holds
    none of the task's descriptors (its connections to Airflow, its database connections): they point at
    /dev/null, and SQLAlchemy's engines forget their pooled connections."""
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        null = os.open(os.devnull, os.O_RDWR)
        _blank_descriptors(null, keep=(out,))
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        for fd in {null, out} - {0, 1, 2}:
            os.close(fd)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)  # the task's, if it had one, is /dev/null now
        _fresh_process_state()
        _forget_connections()
        sys.path[:] = _fresh_path  # not the task's (its working directory, Airflow's DAG folder)
        _forget_project_modules()
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        serve(path, entry, 24 * 3600.0, PRELOAD_CLI + modules, (), own_groups=False)
    except BaseException:  # noqa: BLE001 - reported in the runner's log; the stage then runs in its own process
        import traceback

        with contextlib.suppress(Exception):
            traceback.print_exc()
            sys.stderr.flush()
        code = 1
    finally:
        os._exit(code)


def _child(request: dict, fds: list[int], entry: str, own_group: bool = True) -> int:
    """In the forked child: become the caller (streams, directory, environment, arguments), then call ``entry``
    (``module:function``); the exit status. ``own_group``: in a process group of its own (a local runner: when the
    caller goes, the runner stops the stage's children with the group); else in the runner's (a task's runner:
    the task's group, which Airflow signals)."""
    import importlib

    if own_group:
        os.setpgid(0, 0)
    for fd, target in zip(fds, (0, 1, 2)):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = list(request["argv"])
    main_module = sys.modules["__main__"]  # click names the program from __main__ (this runner)
    main_module.__spec__, main_module.__package__ = None, None
    code: object = 0
    try:
        module, _, function = entry.partition(":")
        getattr(importlib.import_module(module), function)()
    except SystemExit as exc:
        code = exc.code
    except BaseException:  # noqa: BLE001 - a stage's crash is reported like a crashed process
        import traceback

        traceback.print_exc()
        code = 1
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def _stop_child(pid: int, own_group: bool) -> None:
    """SIGTERM a child whose caller went away, and whatever it started: its group, or (a child in the runner's
    group) its process tree."""
    if own_group:
        try:
            os.killpg(pid, signal.SIGTERM)
            return
        except OSError:
            pass
    targets = [pid]
    with contextlib.suppress(Exception):
        import psutil

        targets += [p.pid for p in psutil.Process(pid).children(recursive=True)]
    for target in targets:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(target, signal.SIGTERM)


def _import(name: str) -> None:
    """Import ``name`` and then what it lists in a ``PRELOAD`` tuple (a step's libraries that it imports only inside
    its functions); an import error is left to the stage that needs the module."""
    import importlib

    try:
        module = importlib.import_module(name)
        for more in getattr(module, "PRELOAD", ()):
            for one in PRELOAD_GROUPS.get(more, (more,)):
                importlib.import_module(one)
    except Exception:  # noqa: BLE001 - a library that fails to import fails in the stage that needs it
        pass


def _exit_watch(sel: selectors.BaseSelector, pid: int) -> int | None:
    """A pidfd of ``pid`` registered with ``sel`` (readable when the process exits), so the loop wakes the moment
    a child ends instead of at its next poll (up to 0.2 s later: a tenth of the no-op `dvc repro` budget). None
    where the system has no pidfds (the poll then finds the exit)."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None
    sel.register(fd, selectors.EVENT_READ, (pid,))
    return fd


def _close_watch(sel: selectors.BaseSelector, fd: int | None) -> None:
    if fd is None:
        return
    with contextlib.suppress(KeyError, ValueError):
        sel.unregister(fd)
    os.close(fd)


def serve(
    path: str,
    entry: str,
    idle_timeout: float = 600.0,
    preload: tuple[str, ...] = PRELOAD,
    preload_later: tuple[str, ...] = PRELOAD_LATER,
    own_groups: bool = True,
) -> None:
    """Listen on ``path``, preload, fork a child per request (that calls ``entry``, ``module:function``) until
    idle for ``idle_timeout`` seconds; between requests, import ``preload_later`` one module at a time. Requests
    from another environment than this runner's (``env_key``) are refused. The socket listens before the imports:
    a caller that comes meanwhile waits in the backlog, never starts cold beside them. ``own_groups``: each child
    in a process group of its own (a local runner); false: in the runner's group (a task's runner, see
    flywheel/orchestration.py ``stage_runner``)."""
    if ":" not in entry:
        raise SystemExit(f"--entry {entry!r}: expected module:function, e.g. {DEFAULT_ENTRY}")
    private_dir_check(Path(path).parent)
    key = env_key(os.environ)  # before anything below changes the environment
    os.environ.setdefault("MPLBACKEND", "Agg")
    stopping: list[bool] = []

    def _on_term(*_) -> None:
        # the socket and pid file go at once (a library import under way may swallow the SystemExit; the loop
        # then ends on ``stopping``); the finally below removes them too
        stopping.append(True)
        if _pid_of(path) == os.getpid():
            Path(path).unlink(missing_ok=True)
            Path(path + ".pid").unlink(missing_ok=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, _on_term)
    Path(path).unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o077)  # the callers' environments travel over it: owner only, from the start
    try:
        server.bind(path)
    finally:
        os.umask(old_umask)
    Path(path + ".pid").write_text(f"{os.getpid()}\n{Path.cwd()}\n")
    server.listen(16)
    for name in preload:
        _import(name)
    later = list(preload_later)
    server.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(server, selectors.EVENT_READ, None)
    running: dict[int, socket.socket] = {}
    exits: dict[int, int | None] = {}  # each child's pidfd: readable when it exits, so its caller hears at once
    last = time.monotonic()
    print(f"warm runner ready on {path} (pid {os.getpid()})", flush=True)
    try:
        while (running or time.monotonic() - last < idle_timeout) and not stopping:
            events = sel.select(timeout=0 if later else POLL_SECONDS)
            if not events and later:
                _import(later.pop(0))  # nothing waiting: the next heavy import (forks see it from now on)
            for sel_key, _ in events:
                if sel_key.data is None:
                    try:
                        conn, _ = server.accept()
                    except BlockingIOError:
                        continue
                    conn.setblocking(True)
                    conn.settimeout(5)
                    try:
                        msg, fds, _, _ = socket.recv_fds(conn, _MAX_REQUEST, 3)
                        size = int.from_bytes(msg[:8], "big") if len(msg) >= 8 else -1
                        while 0 <= size and len(msg) < size + 8:
                            more = conn.recv(_MAX_REQUEST)
                            if not more:
                                break
                            msg += more
                        request = json.loads(msg[8:])
                    except (OSError, ValueError):
                        conn.close()
                        continue
                    if len(fds) != 3 or request.get("key") != key:
                        for fd in fds:
                            os.close(fd)
                        if len(fds) == 3:
                            print(f"refused {' '.join(request.get('argv', [])[1:3])}: another environment", flush=True)
                            with contextlib.suppress(OSError):
                                conn.sendall(_REFUSED)
                        conn.close()
                        continue
                    pid = os.fork()
                    if pid == 0:
                        sel.close()
                        server.close()
                        for other in running.values():
                            other.close()
                        for fd in exits.values():
                            if fd is not None:
                                os.close(fd)
                        conn.close()
                        signal.signal(signal.SIGTERM, signal.SIG_DFL)
                        os._exit(_child(request, fds, entry, own_groups))
                    for fd in fds:
                        os.close(fd)
                    if own_groups:
                        with contextlib.suppress(OSError):
                            os.setpgid(pid, pid)  # as the child does: the group exists before any kill
                    print(f"{pid}: {' '.join(request['argv'][1:3])} started", flush=True)
                    running[pid] = conn
                    sel.register(conn, selectors.EVENT_READ, pid)
                    exits[pid] = _exit_watch(sel, pid)
                    last = time.monotonic()
                elif isinstance(sel_key.data, tuple):  # a child's pidfd: it exited (reaped below)
                    sel.unregister(sel_key.fileobj)
                else:  # the caller closed its end before the child finished: stop it
                    pid = sel_key.data
                    sel.unregister(sel_key.fileobj)
                    _stop_child(pid, own_groups)
            while running:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                _close_watch(sel, exits.pop(pid, None))
                conn = running.pop(pid, None)
                if conn is None:
                    continue
                try:
                    sel.unregister(conn)
                except (KeyError, ValueError):
                    pass
                print(f"{pid}: exit {os.waitstatus_to_exitcode(status)}", flush=True)
                try:
                    conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
                except OSError:
                    pass
                conn.close()
                last = time.monotonic()
    finally:
        server.close()
        if _pid_of(path) == os.getpid():
            Path(path).unlink(missing_ok=True)
            Path(path + ".pid").unlink(missing_ok=True)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="A warm runner of `flywheel stage` commands (see flywheel/warm.py).")
    ap.add_argument("socket")
    ap.add_argument("--entry", required=True, help="what each child calls, module:function (e.g. flywheel.cli:main)")
    ap.add_argument("--idle-timeout", type=float, default=600.0)
    ap.add_argument("--no-preload", action="store_true", help="import nothing ahead (tests)")
    ap.add_argument(
        "--in-group", action="store_true", help="children stay in the runner's process group (a task's runner)"
    )
    ap.add_argument(
        "--preload-module",
        action="append",
        default=[],
        help="import this module (and its PRELOAD list) ahead, instead of every stage's libraries between requests "
        "(a task's runner: pipelines.STAGE)",
    )
    args = ap.parse_args()
    # a task's runner: the CLI's libraries and the step's own (its PRELOAD names "mlflow" when it needs MLflow)
    preload = (PRELOAD_CLI + tuple(args.preload_module), ()) if args.preload_module else (PRELOAD, PRELOAD_LATER)
    preload = ((), ()) if args.no_preload else preload
    serve(args.socket, args.entry, args.idle_timeout, *preload, own_groups=not args.in_group)


if __name__ == "__main__":
    main()
