"""A warm stage runner: one process imports the heavy libraries once and forks a child per stage command.

Each stage of dvc.yaml is its own process (`dvc repro` runs `flywheel stage X`), so each used to pay the import
of torch, transformers, MLflow and Great Expectations (seconds apiece). Now the ``flywheel`` console script
hands a ``flywheel stage ...`` command to the workspace's runner, starting it (detached) when none answers: the
runner forks, the child takes over the caller's stdin/stdout/stderr (passed over a Unix socket), its working
directory, environment and arguments, runs the command and exits with its status, which the caller exits with.
So a plain `dvc repro`, `flywheel repro` and the DAG's tasks all pay those imports once per workspace. Turned
off by ``orchestration.warm_runner: false`` or ``FLYWHEEL_WARM=0``; a runner that cannot start is not waited
on past a minute (the command then runs in its own process, as before).

Only third-party libraries are preloaded; the project's own modules are imported afresh in each child, so a code
change between two stages is always seen. A runner exits after ``idle_timeout`` seconds without a request; the
caller closing its end (DVC or Airflow killing the stage) terminates the child.

    python -m flywheel.warm SOCKET [--idle-timeout 600]
"""

from __future__ import annotations

import hashlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

SOCKET_ENV = "FLYWHEEL_WARM_SOCKET"
# Imported before the runner listens: what every stage command needs (the CLI and the MLflow registry read of
# resolve_champion, the first stage of every run; MLflow's SQL store modules are otherwise imported lazily, ~1 s).
PRELOAD = ("mlflow", "mlflow.tracking", "mlflow.store.tracking.sqlalchemy_store",
           "mlflow.store.model_registry.sqlalchemy_store", "mlflow.store.db.utils", "alembic.command",
           "alembic.runtime.migration", "sqlalchemy", "typer", "rich.console", "yaml", "pydantic")
# Imported one by one while the runner waits for requests, in the order the stages need them (a command that
# arrives first imports what it lacks itself, as a cold process would).
PRELOAD_LATER = ("great_expectations", "pandas", "pyarrow.parquet", "datasketch", "torch", "transformers",
                 "transformers.models.llama.modeling_llama", "transformers.models.bert.modeling_bert",
                 "transformers.models.auto.modeling_auto", "transformers.models.auto.tokenization_auto",
                 "matplotlib.pyplot")
_MAX_REQUEST = 1 << 20


# ---- the caller side (the `flywheel` console script) -------------------------------------------------------
def delegate(path: str, argv: list[str], connect_timeout: float = 1.0) -> int | None:
    """Run ``argv`` in the warm runner at ``path``; its exit status, or None when no runner answers."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(connect_timeout)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    sock.settimeout(None)
    env = {k: v for k, v in os.environ.items() if k != SOCKET_ENV}
    body = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": env}).encode()
    try:                                 # length-prefixed: our end stays open, its closing means "stop"
        socket.send_fds(sock, [len(body).to_bytes(8, "big") + body], [0, 1, 2])
    except OSError:
        sock.close()
        return None
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: (sock.close(), os._exit(143)))   # closing our end stops the child
    reply = b""
    while not reply.endswith(b"\n"):
        chunk = sock.recv(64)
        if not chunk:
            print("error: the warm runner went away during the command", file=sys.stderr)
            return 1
        reply += chunk
    return int(reply)


# ---- the runner -------------------------------------------------------------------------------------------
def _child(request: dict, fds: list[int]) -> int:
    for fd, target in zip(fds, (0, 1, 2)):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = list(request["argv"])
    main_module = sys.modules["__main__"]            # click names the program from __main__ (this runner)
    main_module.__spec__, main_module.__package__ = None, None
    code: object = 0
    try:
        from flywheel.cli import main

        main()
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


def _import(name: str) -> None:
    import importlib

    try:
        importlib.import_module(name)
    except Exception:  # noqa: BLE001 - a library that fails to import fails in the stage that needs it
        pass


def serve(path: str, idle_timeout: float = 600.0, preload: tuple[str, ...] = PRELOAD,
          preload_later: tuple[str, ...] = PRELOAD_LATER) -> None:
    """Preload, listen on ``path``, fork a child per request until idle for ``idle_timeout`` seconds; between
    requests, import ``preload_later`` one module at a time."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))      # runs the finally below: the socket goes
    for name in preload:
        _import(name)
    later = list(preload_later)
    Path(path).unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    os.chmod(path, 0o600)                   # the caller's environment travels over it: owner only
    Path(path + ".pid").write_text(str(os.getpid()))
    server.listen(16)
    server.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(server, selectors.EVENT_READ, None)
    running: dict[int, socket.socket] = {}
    last = time.monotonic()
    print(f"warm runner ready on {path} (pid {os.getpid()})", flush=True)
    try:
        while running or time.monotonic() - last < idle_timeout:
            events = sel.select(timeout=0 if later else 0.2)
            if not events and later:
                _import(later.pop(0))       # nothing waiting: the next heavy import (forks see it from now on)
            for key, _ in events:
                if key.data is None:
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
                    if len(fds) != 3:
                        for fd in fds:
                            os.close(fd)
                        conn.close()
                        continue
                    pid = os.fork()
                    if pid == 0:
                        sel.close()
                        server.close()
                        for other in running.values():
                            other.close()
                        conn.close()
                        signal.signal(signal.SIGTERM, signal.SIG_DFL)
                        os._exit(_child(request, fds))
                    for fd in fds:
                        os.close(fd)
                    print(f"{pid}: {' '.join(request['argv'][1:3])} started", flush=True)
                    running[pid] = conn
                    sel.register(conn, selectors.EVENT_READ, pid)
                    last = time.monotonic()
                else:                        # the caller closed its end before the child finished: stop it
                    pid = key.data
                    sel.unregister(key.fileobj)
                    try:
                        os.kill(pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
            while running:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
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
        if Path(path + ".pid").exists() and Path(path + ".pid").read_text() == str(os.getpid()):
            Path(path).unlink(missing_ok=True)
            Path(path + ".pid").unlink(missing_ok=True)


def socket_path(root: Path) -> str:
    """Where the runner of a workspace and this environment listens (short: Unix socket paths are limited to
    ~100 bytes). The interpreter and the state of its site-packages are part of the key: a runner never serves
    another virtual environment, and after a `pip install` the next command starts a fresh runner instead of
    using one that imported the old libraries (that one exits when idle)."""
    try:
        libs = os.stat(sysconfig.get_paths()["purelib"]).st_mtime_ns
    except OSError:
        libs = 0
    key = f"{Path(root).resolve()}\0{sys.executable}\0{libs}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return str(Path(tempfile.gettempdir()) / f"flywheel-warm-{os.getuid()}-{digest}.sock")


def _answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        try:
            s.connect(path)
            return True
        except OSError:
            return False


def ensure(root: Path, env: dict[str, str], idle_timeout: float = 600.0, wait: float = 60.0) -> str | None:
    """The socket of a runner for ``root``, started detached (with ``env``) when none answers; None when it
    could not start within ``wait`` seconds (callers then run commands cold). Concurrent callers start one."""
    import fcntl

    path = socket_path(root)
    if _answers(path):
        return path
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)            # a second caller waits here, then finds the first's runner
        if _answers(path):
            return path
        log = Path(tempfile.gettempdir()) / (Path(path).stem + ".log")
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "flywheel.warm", path, "--idle-timeout", str(idle_timeout)], cwd=root,
                env={k: v for k, v in env.items() if k != SOCKET_ENV}, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True)
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
        raw = yaml.safe_load((root / "params.yaml").read_text()) or {}
        orch = dict(raw.get("orchestration") or {})
        profile = env.get("FLYWHEEL_PROFILE", raw.get("profile") or "")
        orch.update(((raw.get("profiles") or {}).get(profile) or {}).get("orchestration") or {})
        if not orch.get("warm_runner", True):
            return None
        return root, float(orch.get("warm_idle_seconds", 600))
    except (OSError, yaml.YAMLError, AttributeError, TypeError, ValueError):
        return None                              # the CLI reports a broken params.yaml properly


def run_stage(argv: list[str]) -> int | None:
    """``flywheel stage ...``: run it in the workspace's warm runner (the one ``FLYWHEEL_WARM_SOCKET`` names, or
    the workspace's own, started when none answers, so a plain `dvc repro` gets it too); its exit status, or
    None to run the command in this process (no runner wanted or none could start)."""
    path = os.environ.get(SOCKET_ENV)
    if path:
        return delegate(path, argv)
    if "--help" in argv:
        return None
    ws = workspace()
    if ws is None:
        return None
    path = ensure(ws[0], dict(os.environ), ws[1])
    return delegate(path, argv) if path else None


def stop(path: str) -> bool:
    """Stop the runner listening on ``path`` (SIGTERM: running children finish on their own)."""
    try:
        pid = int(Path(path + ".pid").read_text())
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError):
        return False
    return True


def repro_exec(args: list[str]) -> None:
    """``flywheel repro ARGS``: ``dvc repro ARGS`` in place of this process, its stages sent to the workspace's
    warm runner (started here when none answers); returns (to the full CLI) when there is no workspace."""
    env = dict(os.environ)
    root = _root(env)
    if root is None:
        return
    ws = workspace(env)
    if ws is not None:
        path = ensure(ws[0], env, ws[1])
        if path:
            env[SOCKET_ENV] = path
    dvc = Path(sys.executable).with_name("dvc")
    exe = str(dvc) if dvc.exists() else "dvc"
    os.chdir(root)
    os.execvpe(exe, [exe, "repro", *args], env)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="A warm runner of `flywheel stage` commands (see module doc).")
    ap.add_argument("socket")
    ap.add_argument("--idle-timeout", type=float, default=600.0)
    ap.add_argument("--no-preload", action="store_true", help="import nothing ahead (tests)")
    args = ap.parse_args()
    serve(args.socket, args.idle_timeout, *(((), ()) if args.no_preload else (PRELOAD, PRELOAD_LATER)))


if __name__ == "__main__":
    main()
