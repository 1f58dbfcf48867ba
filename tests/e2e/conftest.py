"""Helpers for the end-to-end tests: run the installed ``flywheel`` and ``dvc`` commands in a workspace."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent


def clean_env() -> dict[str, str]:
    """The environment without any Flywheel or Airflow setting of the outer shell, the venv's bin first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLYWHEEL_", "AIRFLOW"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
               GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com", COLUMNS="200",
               PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


@pytest.fixture
def sh():
    """``sh(args, cwd)`` -> CompletedProcess (text, both streams captured, never raises on a non-zero exit)."""

    def run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=cwd, env=clean_env(), text=True, capture_output=True, timeout=timeout)

    return run
