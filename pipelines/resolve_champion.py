"""The ``resolve_champion`` stage (always runs): which registry versions are champion now.

It writes them to a small JSON file so DVC sees the registry's state: when the champion moves (by
`flywheel release`, a DAG, or by hand in the MLflow UI) the stages that depend on it rerun. An
empty registry resolves to the base models (version ``base``). Read-only: it registers nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from flywheel.registry import CHAMPION, MODELS, Registry
from flywheel.settings import Settings

# What this step's functions import, imported ahead by a DAG task's warm runner while DVC starts
# (flywheel/orchestration.py stage_runner): a module missing here is imported by the stage itself.
PRELOAD = ("mlflow",)


def _portable(path: Path, root: Path | None) -> str:
    """Relative to the workspace when inside it: the file reads the same on every worker's clone (DVC
    hashes it, and a path of one machine means nothing on another)."""
    path = Path(path)
    if root is not None:
        try:
            return str(path.resolve().relative_to(Path(root).resolve()))
        except ValueError:
            pass
    return str(path)


def resolve(registry: Registry | None, base: Path, root: Path | None = None) -> dict:
    """``{"policy": {"version", "path", "content_hash"}, "reward": {...}}`` for the current champions."""
    out = {}
    for kind, name in MODELS.items():
        v = registry.alias(name, CHAMPION) if registry is not None else None
        if v is None:
            out[kind] = {"name": name, "version": "base", "path": _portable(base / kind, root), "content_hash": None}
        else:
            out[kind] = {
                "name": name,
                "version": v.version,
                "path": _portable(registry.local_dir(v), root),
                "content_hash": v.tags.get("content_hash"),
            }
    return out


def local_path(settings, entry: dict) -> Path:
    """The local folder of one champion entry: its path (relative to the workspace), or, on a worker that
    has not got it, the registry version downloaded (the same relative place)."""
    path = Path(entry["path"])
    path = path if path.is_absolute() else Path(settings.root) / path
    if path.exists() or entry["version"] == "base":
        return path
    registry = Registry(settings)
    version = registry.get(entry["name"], str(entry["version"]))
    if version is None:
        raise FileNotFoundError(f"champion {entry['name']} v{entry['version']}: not in the registry, no {path}")
    return registry.local_dir(version)


def main(settings, base: Path, out: Path) -> dict:
    info = resolve(Registry(settings), base, settings.root)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=2, sort_keys=True))
    return info


def load(path: Path, settings=None) -> dict:
    """champion.json; with ``settings``, each entry's ``path`` made a local folder (see ``local_path``)."""
    info = json.loads(Path(path).read_text())
    if settings is not None:
        for entry in info.values():
            entry["path"] = str(local_path(settings, entry))
    return info


def stage(settings: Settings, *, base: Path, out: Path) -> str:
    """Write the registry's champions (``base``'s models when it has none) to ``out``."""
    info = main(settings, base, out)
    return "champion: " + ", ".join(f"{k} v{v['version']}" for k, v in info.items())
