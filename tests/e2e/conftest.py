"""Helpers for the end-to-end tests: run the installed ``flywheel`` and ``dvc`` commands in a workspace."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from devkit.workspaces import clean_env

VENV_BIN = Path(sys.executable).parent


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


def ingest_demo_rows(repo: Path, sh, n: int = 120) -> None:
    """Ingest the first ``n`` rows of the shipped HH-RLHF demo batch into ``repo`` (a small, quick loop)."""
    import gzip

    rows = gzip.open(repo / "data/demo/hh-rlhf-batch1.jsonl.gz", "rt").read().splitlines()[:n]
    small = repo / "small.jsonl.gz"
    with gzip.open(small, "wt") as fh:
        fh.write("\n".join(rows) + "\n")
    proc = sh(["flywheel", "ingest", "--format", "hh-rlhf", str(small)], repo)
    assert proc.returncode == 0, proc.stdout + proc.stderr
