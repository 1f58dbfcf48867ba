"""Git and DVC plumbing of the workspace: initialise, track the raw store, run stages."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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
    proc = subprocess.run(cmd, cwd=root, env=env, text=True,
                          capture_output=quiet)
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:] if quiet else []
        raise WorkspaceError(f"{' '.join(cmd)} failed (exit {proc.returncode})" +
                             (": " + " | ".join(detail) if detail else ""))
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


def repro(root: Path, stages: list[str] | None = None, force: bool = False) -> None:
    cmd = [_bin("dvc"), "repro"] + (["--force"] if force else []) + (stages or [])
    run(cmd, root)
