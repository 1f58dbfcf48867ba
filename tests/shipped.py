"""The repository's params.yaml, typed, for tests: a test takes a section and overrides only what it varies
(``shipped("train_policy", steps=2)``), so no test carries a second copy of a tunable's value."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from flywheel.params import Params, Section

REPO_ROOT = Path(__file__).resolve().parents[1]


@lru_cache(maxsize=1)
def shipped_params() -> Params:
    """The shipped params.yaml with its own profile (``demo``: no overrides)."""
    from flywheel.settings import load_params

    return load_params(REPO_ROOT / "params.yaml")


def shipped(section: str, **changes: Any) -> Section:
    """The shipped ``section`` with ``changes`` (a mapping merges into a nested section), validated."""
    return shipped_params().section(section).updated(**changes)
