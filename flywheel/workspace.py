"""Git and DVC plumbing of the workspace: initialise, track the raw store, run stages, and the workspace lock."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


class WorkspaceError(RuntimeError):
    pass


def _bin(name: str) -> str:
    """A console script of this environment (the venv's), falling back to PATH."""
    here = Path(sys.executable).with_name(name)
    return str(here) if here.exists() else (shutil.which(name) or name)


def run(cmd: list[str], root: Path, check: bool = True, quiet: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    proc = subprocess.run(cmd, cwd=root, env=env, text=True, capture_output=quiet)
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:] if quiet else []
        raise WorkspaceError(
            f"{' '.join(cmd)} failed (exit {proc.returncode})" + (": " + " | ".join(detail) if detail else "")
        )
    return proc


def init(root: Path) -> list[str]:
    """Make ``root`` a git + DVC workspace where it is not one yet; returns what was done."""
    done = []
    if not (root / ".git").exists():
        run(["git", "init", "-q", "-b", "main"], root)
        done.append("git init")
    if not (root / ".dvc").exists():
        run([_bin("dvc"), "init", "-q"], root)
        run([_bin("dvc"), "config", "core.autostage", "true"], root, quiet=True)
        # models are hundreds of MB: link them into the cache instead of copying (files become read-only)
        run([_bin("dvc"), "config", "cache.type", "reflink,hardlink,copy"], root, quiet=True)
        done.append("dvc init")
    return done


def is_dvc_repo(root: Path) -> bool:
    return (root / ".dvc").is_dir()


def track(root: Path, path: Path) -> None:
    """``dvc add`` a data folder (the raw store), so each version of it is recorded and cached."""
    if not is_dvc_repo(root) or not path.exists():
        return
    run([_bin("dvc"), "add", "-q", str(path.relative_to(root))], root, quiet=True)


def commit_outputs(root: Path, paths: list[str | Path]) -> tuple[list[str], list[str]]:
    """Record in dvc.lock the new content of stage outputs a step rewrote in place (erase), so a sync hands other
    workspaces that version; returns (recorded, not recorded: DVC refused, e.g. an input missing here). The
    stage's recorded inputs are kept as they were: it still reruns at the next ``dvc repro`` if they changed
    (``dvc commit`` alone would mark it up to date with inputs it never ran on). Paths no stage outputs are
    skipped."""
    import yaml

    lock = root / "dvc.lock"
    if not is_dvc_repo(root) or not lock.is_file():
        return [], []
    before = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    owner = {o.get("path"): name for name, st in before.items() for o in st.get("outs", []) if isinstance(o, dict)}
    done, failed = [], []
    for path in paths:
        rel = os.path.relpath(Path(path).resolve(), root.resolve())
        if rel not in owner:
            continue
        proc = run([_bin("dvc"), "commit", "-f", "-q", rel], root, check=False, quiet=True)
        (done if proc.returncode == 0 else failed).append(rel)
    if done:
        data = yaml.safe_load(lock.read_text())
        for name in {owner[rel] for rel in done}:
            for key in ("deps", "params"):
                if key in before[name]:
                    data["stages"][name][key] = before[name][key]
        tmp = lock.with_name(".dvc.lock.tmp")
        tmp.write_text(yaml.safe_dump(data, sort_keys=False))
        os.replace(tmp, lock)
    return done, failed


def repro(root: Path, stages: list[str] | None = None, force: bool = False) -> None:
    cmd = [_bin("dvc"), "repro"] + (["--force"] if force else []) + (stages or [])
    run(cmd, root)


# ---- the workspace lock -------------------------------------------------------------------------------------------
# One lock per workspace, held by every command that changes the raw store (ingest, export, erase, publish,
# restore) and, with a DVC remote, by a DAG task for its whole pull-work-push: two of them at once could lose a
# batch (one's `dvc add` fails on DVC's own lock and leaves its batch untracked) or bring erased rows back.
LOCK_TIMEOUT = 120.0  # seconds a command waits before it fails naming the holder
_held: dict[Path, int] = {}  # lock files this process holds, with their nesting depth


class WorkspaceBusy(WorkspaceError):
    """Another command holds the workspace lock."""


def lock_file(root: Path) -> Path:
    """``.dvc/tmp/flywheel.lock`` (DVC's own ignored folder), ``.flywheel.lock`` where the root is no DVC repo."""
    return root / ".dvc" / "tmp" / "flywheel.lock" if is_dvc_repo(root) else root / ".flywheel.lock"


def _ancestors() -> set[int]:
    """This process's parent, grandparent, ... (from /proc; the parent alone where there is none)."""
    out, pid = set(), os.getpid()
    while pid > 1:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return out | {os.getppid()}
        out.add(pid)
    return out


def _holder(path: Path) -> tuple[int, str]:
    try:
        pid, _, what = path.read_text().partition(" ")
        return int(pid), what.strip()
    except (OSError, ValueError):
        return 0, ""


@contextlib.contextmanager
def locked(root: Path, what: str, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """Hold the workspace lock for ``what`` (a command line, a task id). Re-entrant in a process; a process
    started by the holder (a DAG task running ``flywheel export``) runs under its holder's lock. Waits up to
    ``timeout`` seconds, then raises ``WorkspaceBusy`` naming the holder."""
    path = lock_file(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = path.resolve()
    if _held.get(key):
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    with open(path, "a+") as fh:  # closing the file releases the lock
        if not _acquire(fh, path, root, timeout):
            yield  # our parent holds it: we are part of its work
            return
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()} {what}\n")
        fh.flush()
        _held[key] = 1
        try:
            yield
        finally:
            del _held[key]
            fh.seek(0)
            fh.truncate()
            fh.flush()


def _acquire(fh, path: Path, root: Path, timeout: float) -> bool:
    """Take the lock on ``fh`` (True), or find it held by an ancestor process (False); else wait, then fail."""
    deadline, said = time.monotonic() + timeout, False
    while True:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        pid, holder = _holder(path)
        if pid and pid in _ancestors():
            return False
        if time.monotonic() >= deadline:
            raise WorkspaceBusy(
                f"the workspace {root} is busy: {holder or 'another command'} (pid {pid}) holds "
                f"{path} (waited {timeout:.0f} s); retry when it has finished"
            )
        if not said:
            print(
                f"waiting for the workspace lock held by {holder or 'another command'} (pid {pid})",
                file=sys.stderr,
                flush=True,
            )
            said = True
        time.sleep(0.2)
