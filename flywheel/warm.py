"""A warm stage runner for a user's local `dvc repro`: one process imports the heavy libraries once and forks a
child per ``flywheel stage ...`` command.

Each stage of dvc.yaml is its own process (`dvc repro` runs `flywheel stage X`), so each would pay the import of
torch, transformers, MLflow and Great Expectations (seconds apiece; trimming the project's own imports does not
help: MLflow alone is ~2 s for `resolve_champion`, torch ~1.2 s for the training stages). Here the ``flywheel``
console script hands a ``flywheel stage ...`` command to a runner, starting it (detached) when none answers: the
runner forks, the child takes over the caller's stdin/stdout/stderr (passed over a Unix socket), its working
directory, environment and arguments, calls the entry point it was handed (``--entry module:function``, imported
in the child, never by the runner) and exits with its status, which the caller exits with.

Local only. Airflow and Celery tasks never use it (flywheel/orchestration.py sets ``FLYWHEEL_WARM=0``): there a
stage must run inside the task's process tree, where the task's timeout, kill and cgroup reach it; a task starts
a runner of its own instead (``orchestration.stage_runner``: its child, in its group, for one stage; forked from
the task where its worker preloaded the libraries, flywheel/airflow_worker.py). Turned off by
``orchestration.warm_runner: false`` or ``FLYWHEEL_WARM=0``; a runner that cannot start is not waited on past a
minute (the command then runs in its own process, as without it).

A runner serves one workspace and one environment: its socket is named by a hash of the workspace, the caller's
environment variables (but those that change per command, ``VOLATILE``), the interpreter and the state of its
site-packages, so a different environment (or a `pip install`) gets another runner, and a runner refuses a
request from another environment (the caller then runs the command itself). Socket, lock, pid file and log live
in a private folder (``$XDG_RUNTIME_DIR/flywheel``, else ``~/.cache/flywheel/warm``; mode 0700, refused when
owned by another user or writable by others). Only third-party libraries are preloaded; the project's own
modules are imported afresh in each child, so a code change between two stages is always seen. A runner exits
after ``idle_timeout`` seconds without a request; the caller closing its end (DVC killing the stage, Ctrl-C)
terminates the child's process group.

The runner itself (what it preloads, the fork per request) is flywheel/warm_runner.py:

    python -P -m flywheel.warm_runner SOCKET --entry flywheel.cli:main [--idle-timeout 600]
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import time
from collections.abc import Mapping
from pathlib import Path

SOCKET_ENV = "FLYWHEEL_WARM_SOCKET"
# The console script's command line, named (never imported here): the runner imports it in each child.
DEFAULT_ENTRY = "flywheel.cli:main"
# Variables that differ from one command to the next of the same run (the shell's, DVC's per stage, the run ids
# the loop sets; PS1, which `source .venv/bin/activate` exports and DVC drops from its stages' environment): left
# out of the runner's key; the child still gets the caller's values (the whole environment
# travels with each request). No library reads them at import time.
VOLATILE = frozenset(
    {
        "PWD",
        "OLDPWD",
        "PS1",
        "SHLVL",
        "_",
        "DVC_STAGE",
        "DVC_ROOT",
        SOCKET_ENV,
        "FLYWHEEL_PARENT_RUN_ID",
        "FLYWHEEL_AIRFLOW_RUN_ID",
    }
)
_MAX_SOCKET_PATH = 100  # AF_UNIX paths are limited to ~107 bytes
_REFUSED = b"refused\n"  # the runner's answer to a caller of another environment


class UnsafeRuntimeDir(OSError):
    """The runner's folder is not private (another owner, writable by others, not a folder): no runner is used."""


# ---- keys and places -----------------------------------------------------------------------------------------
def env_key(env: Mapping[str, str]) -> str:
    """What a runner must share with its callers: the environment (but ``VOLATILE``), the interpreter and the
    state of its site-packages (after a `pip install` the next command starts a fresh runner; the old one exits
    when idle)."""
    try:
        libs = os.stat(sysconfig.get_paths()["purelib"]).st_mtime_ns
    except OSError:
        libs = 0
    h = hashlib.sha256(f"{sys.executable}\0{libs}".encode())
    for name in sorted(set(env) - VOLATILE):
        h.update(f"\0{name}={env[name]}".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def private_dir(env: Mapping[str, str] | None = None, create: bool = True) -> Path:
    """The folder of the runners' sockets, locks, pid files and logs: ``$XDG_RUNTIME_DIR/flywheel``, else
    ``$XDG_CACHE_HOME`` (or ``~/.cache``) ``/flywheel/warm``; created with mode 0700. ``UnsafeRuntimeDir`` when it
    is not a folder of this user that only this user can write (its sockets carry the callers' environment)."""
    env = os.environ if env is None else env
    runtime = env.get("XDG_RUNTIME_DIR", "")
    if runtime and os.path.isabs(runtime) and os.path.isdir(runtime):
        folder = Path(runtime) / "flywheel"
    else:
        cache = env.get("XDG_CACHE_HOME", "")
        folder = (Path(cache) if cache and os.path.isabs(cache) else Path.home() / ".cache") / "flywheel" / "warm"
    if not create:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        pass
    private_dir_check(folder)
    return folder


def private_dir_check(folder: Path) -> None:
    """``UnsafeRuntimeDir`` unless ``folder`` is a real folder of this user that no one else can write."""
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeRuntimeDir(f"{folder} is not a folder (a link or a file): remove it")
    if info.st_uid != os.getuid():
        raise UnsafeRuntimeDir(f"{folder} belongs to uid {info.st_uid}, not to you (uid {os.getuid()}): remove it")
    if info.st_mode & 0o022:
        raise UnsafeRuntimeDir(
            f"{folder} is writable by others (mode {stat.S_IMODE(info.st_mode):o}): `chmod 700 {folder}`"
        )


def socket_path(root: Path, env: Mapping[str, str] | None = None) -> str:
    """Where the runner of workspace ``root`` for the environment ``env`` (this process's by default) listens, in
    the private folder (not created here). Short: the name is a hash of the workspace and ``env_key``."""
    env = os.environ if env is None else env
    digest = hashlib.sha256(f"{Path(root).resolve()}\0{env_key(env)}".encode()).hexdigest()[:16]
    return str(private_dir(env, create=False) / f"warm-{digest}.sock")


# ---- the caller side (the `flywheel` console script) -------------------------------------------------------
def delegate(path: str, argv: list[str], connect_timeout: float = 1.0) -> int | None:
    """Run ``argv`` in the warm runner at ``path``; its exit status, or None when no runner answers or the runner
    refuses (it serves another environment): the caller then runs the command itself."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(connect_timeout)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    sock.settimeout(None)
    env = {k: v for k, v in os.environ.items() if k != SOCKET_ENV}
    body = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": env, "key": env_key(env)}).encode()
    try:  # length-prefixed: our end stays open, its closing means "stop"
        socket.send_fds(sock, [len(body).to_bytes(8, "big") + body], [0, 1, 2])
    except OSError:
        sock.close()
        return None
    before = {
        sig: signal.signal(sig, lambda *_: (sock.close(), os._exit(143)))  # closing our end stops the child
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    }
    reply = b""
    while not reply.endswith(b"\n"):
        chunk = sock.recv(64)
        if not chunk:
            print("error: the warm runner went away during the command", file=sys.stderr)
            return 1
        reply += chunk
    if reply == _REFUSED:
        sock.close()
        for sig, handler in before.items():
            signal.signal(sig, handler)
        return None
    return int(reply)


def runner_command(
    path: str,
    entry: str,
    idle_timeout: float,
    preload: bool = True,
    in_group: bool = False,
    modules: tuple[str, ...] = (),
) -> list[str]:
    """The command line of a runner listening on ``path`` and calling ``entry`` (``module:function``) per request;
    ``-P``: no working directory on sys.path, so a child imports the project as the console script does.
    ``in_group``: its children stay in its process group; ``modules``: what it imports ahead besides MLflow (a
    task's runner: its stage's step module), instead of every stage's libraries between requests."""
    cmd = [
        sys.executable,
        "-P",
        "-m",
        "flywheel.warm_runner",
        path,
        "--entry",
        entry,
        "--idle-timeout",
        str(idle_timeout),
    ]
    cmd += [] if preload else ["--no-preload"]
    cmd += [arg for name in modules for arg in ("--preload-module", name)]
    return cmd + (["--in-group"] if in_group else [])


def _answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        try:
            s.connect(path)
            return True
        except OSError:
            return False


def _pid_of(path: str) -> int | None:
    """The pid a runner wrote beside its socket (first line of ``SOCKET.pid``), else None."""
    try:
        return int(Path(path + ".pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def ensure(
    root: Path, env: Mapping[str, str], idle_timeout: float = 600.0, wait: float = 60.0, entry: str = DEFAULT_ENTRY
) -> str | None:
    """The socket of a runner for ``root`` and ``env``, started detached (with ``env``, calling ``entry`` per
    request) when none answers; None when it could not start within ``wait`` seconds or its folder is not private
    (said on stderr): callers then run commands cold. Concurrent callers start one."""
    import fcntl

    env = {k: v for k, v in env.items() if k != SOCKET_ENV}
    try:
        private_dir(env)
    except OSError as exc:
        print(f"warning: no warm runner ({exc}); the stage runs in its own process", file=sys.stderr)
        return None
    path = socket_path(root, env)
    if len(path.encode()) > _MAX_SOCKET_PATH:
        return None
    if _answers(path):
        return path
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second caller waits here, then finds the first's runner
        if _answers(path):
            return path
        with open(path[: -len(".sock")] + ".log", "ab") as out:
            proc = subprocess.Popen(
                runner_command(path, entry, idle_timeout),
                cwd=root,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and proc.poll() is None:
            if _answers(path):
                return path
            time.sleep(0.05)
    return None


def _root(env) -> Path | None:
    """The workspace: ``FLYWHEEL_ROOT``, else the nearest folder at or above the working directory with a
    params.yaml; None when there is none."""
    env_root = env.get("FLYWHEEL_ROOT")
    here = Path(env_root).resolve() if env_root else Path.cwd().resolve()
    return next((d for d in (here, *here.parents) if (d / "params.yaml").is_file()), None)


def workspace(env: dict[str, str] | None = None) -> tuple[Path, float] | None:
    """``(root, idle seconds)`` when the workspace here (``FLYWHEEL_ROOT`` or the nearest folder above the
    working directory with a params.yaml) wants a warm runner; None when it does not (params
    ``orchestration.warm_runner: false``, or ``FLYWHEEL_WARM=0`` in the environment), or there is no
    workspace. Reads only params.yaml (no settings object: this path is timed by the no-op budget)."""
    env = os.environ if env is None else env
    if env.get("FLYWHEEL_WARM", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    root = _root(env)
    if root is None:
        return None
    import yaml

    try:
        raw = yaml.load((root / "params.yaml").read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
        orch = dict(raw.get("orchestration") or {})
        profile = env.get("FLYWHEEL_PROFILE", raw.get("profile") or "")
        orch.update(((raw.get("profiles") or {}).get(profile) or {}).get("orchestration") or {})
        if not orch.get("warm_runner", True):
            return None
        return root, float(orch.get("warm_idle_seconds", 600))
    except (OSError, yaml.YAMLError, AttributeError, TypeError, ValueError):
        return None  # the CLI reports a broken params.yaml properly


def run_stage(argv: list[str], entry: str = DEFAULT_ENTRY) -> int | None:
    """``flywheel stage ...``: run it in a warm runner (the one ``FLYWHEEL_WARM_SOCKET`` names, or the one of this
    workspace and environment, started when none answers, so a plain `dvc repro` gets it too); its exit status,
    or None to run the command in this process (no runner wanted, none could start, or it refused)."""
    path = os.environ.get(SOCKET_ENV)
    if path:
        return delegate(path, argv)
    if "--help" in argv:
        return None
    ws = workspace()
    if ws is None:
        return None
    path = ensure(ws[0], os.environ, ws[1], entry=entry)
    return delegate(path, argv) if path else None


def stop(path: str) -> bool:
    """Stop the runner listening on ``path`` (SIGTERM: running children finish on their own)."""
    pid = _pid_of(path)
    if pid is None:
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except OSError:
        return False
    return True


def runners(root: Path, env: Mapping[str, str] | None = None) -> list[str]:
    """The sockets of this user's runners serving workspace ``root``, whatever environment they were started with
    (their pid files name the workspace)."""
    root = Path(root).resolve()
    found = []
    for pid_file in sorted(private_dir(env, create=False).glob("warm-*.sock.pid")):
        try:
            served = Path(pid_file.read_text().splitlines()[1])
        except (OSError, IndexError):
            continue
        if served == root:
            found.append(str(pid_file)[: -len(".pid")])
    return found


def stop_workspace(root: Path, env: Mapping[str, str] | None = None) -> int:
    """Stop every runner serving workspace ``root`` (see ``runners``); how many were signalled."""
    return sum(stop(path) for path in runners(root, env))


def repro_exec(args: list[str], entry: str = DEFAULT_ENTRY) -> None:
    """``flywheel repro ARGS``: ``dvc repro ARGS`` in place of this process, its stages sent to the warm runner of
    this workspace and environment (started here when none answers); returns (to the full CLI) when there is no
    workspace."""
    env = {k: v for k, v in os.environ.items() if k != SOCKET_ENV}
    root = _root(env)
    if root is None:
        return
    ws = workspace(env)
    if ws is not None:
        path = ensure(ws[0], env, ws[1], entry=entry)
        if path:
            env[SOCKET_ENV] = path
    dvc = Path(sys.executable).with_name("dvc")
    exe = str(dvc) if dvc.exists() else "dvc"
    os.chdir(root)
    os.execvpe(exe, [exe, "repro", *args], env)
