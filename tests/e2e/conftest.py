"""Helpers for the end-to-end tests: run the installed ``flywheel`` and ``dvc`` commands in a workspace."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent


def clean_env() -> dict[str, str]:
    """The environment without any Flywheel or Airflow setting of the outer shell, the venv's bin first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLYWHEEL_", "AIRFLOW"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        DVC_NO_ANALYTICS="1",
        GIT_AUTHOR_NAME="test",
        GIT_AUTHOR_EMAIL="test@example.com",
        GIT_COMMITTER_NAME="test",
        GIT_COMMITTER_EMAIL="test@example.com",
        COLUMNS="200",
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    return env


@pytest.fixture
def sh():
    """``sh(args, cwd)`` -> CompletedProcess (text, both streams captured, never raises on a non-zero exit)."""

    def run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=cwd, env=clean_env(), text=True, capture_output=True, timeout=timeout)

    return run


@pytest.fixture
def repo_copy(tmp_path, repo_root, sh):
    """The tracked files of the repository (as in the working tree) in a fresh git repository, .dvc included."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=repo_root, capture_output=True, check=True).stdout
    dest = tmp_path / "repo"
    for name in filter(None, files.decode().split("\0")):
        src = repo_root / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    assert (dest / ".dvc" / "config").is_file() and (dest / "dvc.yaml").is_file()
    for args in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        proc = sh(args, dest)
        assert proc.returncode == 0, proc.stderr
    return dest
