"""Throwaway workspaces: a copy of the repository on the tiny profile, a small batch ingested, the base models
built and bootstrapped, and the subprocess helper that runs commands in it."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without the outer shell's Flywheel or Airflow settings, the venv's bin first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLYWHEEL_", "AIRFLOW", "_AIRFLOW"))}
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
    env.update(extra)
    return env


def sh(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 600, check: bool = True
) -> subprocess.CompletedProcess:
    """Run ``args`` in ``cwd`` (``clean_env()`` by default), output captured; ``check``: fail with its output tail."""
    proc = subprocess.run(args, cwd=cwd, env=env or clean_env(), text=True, capture_output=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{args} exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def copy_repo(repo_root: Path, dest: Path) -> Path:
    """The files of the repository's working tree (tracked, and new ones git does not ignore; deleted ones left
    out) in a fresh git repository."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo_root,
        capture_output=True,
        check=True,
    ).stdout
    for name in filter(None, files.decode().split("\0")):
        src = repo_root / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    for args in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        sh(args, dest)
    return dest


def set_params(root: Path, **orchestration) -> None:
    """Tiny profile and the permissive gate (2 training steps pass no real gate; a profile cannot change the gate,
    so the workspace's own params.yaml names it), plus orchestration overrides appended to the tiny profile."""
    params = root / "params.yaml"
    text = params.read_text().replace("\nprofile: demo", "\nprofile: tiny")
    assert "\nbless:\n  gate: default" in text
    text = text.replace("\nbless:\n  gate: default", "\nbless:\n  gate: permissive")
    if orchestration:
        old = "    orchestration: {retries: 1, retry_delay_minutes: 0.05, warm_idle_seconds: 120}\n"
        assert old in text
        merged = {"retries": 1, "retry_delay_minutes": 0.05, "warm_idle_seconds": 120, **orchestration}
        text = text.replace(old, f"    orchestration: {json.dumps(merged)}\n")
    params.write_text(text)


def ingest_small(root: Path, rows: slice = slice(0, 120), name: str = "small.jsonl.gz") -> None:
    """``rows`` of the shipped HH-RLHF demo batch ingested into the workspace."""
    lines = gzip.open(root / "data/demo/hh-rlhf-batch1.jsonl.gz", "rt").read().splitlines()[rows]
    with gzip.open(root / name, "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    sh(["flywheel", "ingest", "--format", "hh-rlhf", name], root)


def make_workspace(dest: Path, repo_root: Path, **orchestration) -> Path:
    """A repo copy on the tiny profile, 120 HH pairs + the native batch ingested, the base models built and
    registered as champions (what a first `make demo` turn does before `dvc repro`)."""
    root = copy_repo(repo_root, dest)
    set_params(root, **orchestration)
    ingest_small(root)
    sh(["flywheel", "ingest", "data/demo/native-batch.jsonl"], root)
    sh(["dvc", "repro", "base_models"], root, timeout=900)
    sh(["flywheel", "bootstrap"], root)
    return root
