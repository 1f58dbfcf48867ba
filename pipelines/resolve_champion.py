"""The ``resolve_champion`` stage (always runs): which registry versions are champion now.

It writes them to a small JSON file so DVC sees the registry's state: when the champion moves (by
`flywheel release`, a DAG, or by hand in the MLflow UI) the stages that depend on it rerun. An
empty registry resolves to the base models (version ``base``). Read-only: it registers nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from flywheel.registry import CHAMPION, MODELS, Registry


def resolve(registry: Registry | None, base: Path) -> dict:
    """``{"policy": {"version", "path", "content_hash"}, "reward": {...}}`` for the current champions."""
    out = {}
    for kind, name in MODELS.items():
        v = registry.alias(name, CHAMPION) if registry is not None else None
        if v is None:
            out[kind] = {"name": name, "version": "base", "path": str(base / kind), "content_hash": None}
        else:
            out[kind] = {"name": name, "version": v.version, "path": str(registry.local_dir(v)),
                         "content_hash": v.tags.get("content_hash")}
    return out


def main(settings, base: Path, out: Path) -> dict:
    info = resolve(Registry(settings), base)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=2, sort_keys=True))
    return info


def load(path: Path) -> dict:
    return json.loads(Path(path).read_text())
