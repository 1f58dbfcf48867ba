"""Where the base models come from: ``models.policy.source`` / ``models.reward.source`` in params.yaml.

A source is a local folder (absolute, or relative to the workspace), a Hugging Face hub id (with ``revision``;
fetched only where the hub is reachable), a registry URI (``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``), or
one of the shipped models (``shipped:smollm2``, ``shipped:minilm``, built by the base_models stage). Every error
names the setting and says what to do.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from flywheel.params import ModelSource

SHIPPED = {"policy": "shipped:smollm2", "reward": "shipped:minilm"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelSourceError(ValueError):
    """A ``models.<kind>`` setting that does not name a usable model."""


def is_shipped(kind: str, spec: ModelSource) -> bool:
    """Whether ``spec`` names the shipped model of ``kind``; another ``shipped:`` name is an error naming both."""
    if not spec.source.startswith("shipped:"):
        return False
    if spec.source != SHIPPED[kind]:
        raise ModelSourceError(
            f"models.{kind}.source: {spec.source!r} is not a shipped model; the shipped {kind} model is {SHIPPED[kind]!r}"
        )
    return True


def _offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _from_registry(kind: str, uri: str, settings) -> Path:
    import tempfile

    from flywheel.models.logged import materialize

    dest = Path(tempfile.mkdtemp(prefix="flywheel-source-")) / kind
    try:
        folder = materialize(uri, dest, settings.tracking_uri if settings else None)
    except Exception as exc:  # MLflow raises several types for a missing model, version or alias
        raise ModelSourceError(f"models.{kind}.source: cannot fetch {uri} from the registry: {exc}") from None
    if not (folder / "config.json").is_file() and not (folder / "flywheel_reward.json").is_file():
        raise ModelSourceError(f"models.{kind}.source: {uri} holds no model folder (no config.json)")
    return folder


def _from_hub(kind: str, spec: ModelSource) -> Path:
    hint = (
        f"download it where the hub is reachable (`hf download {spec.source} --local-dir DIR`) and set "
        f"models.{kind}.source to that folder"
    )
    if _offline():
        raise ModelSourceError(
            f"models.{kind}.source: no folder {spec.source!r} exists, and as a Hugging Face hub id it cannot be "
            f"fetched: the hub is offline here (HF_HUB_OFFLINE=1); {hint}"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec.source, revision=spec.revision or None))
    except Exception as exc:  # network, auth and missing-repo errors alike
        raise ModelSourceError(
            f"models.{kind}.source: cannot fetch {spec.source!r} from the hub ({type(exc).__name__}: {exc}); {hint}"
        ) from None


def resolve(kind: str, spec: ModelSource, root: Path, settings=None) -> Path:
    """The local folder ``spec`` names (not for ``shipped:`` sources, which the base_models stage builds)."""
    src = spec.source.strip()
    if src.startswith("models:/"):
        return _from_registry(kind, src, settings)
    path = Path(os.path.expanduser(src))
    path = path if path.is_absolute() else Path(root) / path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"models.{kind}.source: {path} is not a Hugging Face model folder (no config.json)")
        return path
    if path.exists():
        raise ModelSourceError(f"models.{kind}.source: {path} is a file; name the model's folder")
    looks_like_path = src.startswith(("/", ".", "~")) or "\\" in src or src.count("/") > 1
    if looks_like_path or not HUB_ID.match(src):
        raise ModelSourceError(f"models.{kind}.source: the folder {path} does not exist")
    return _from_hub(kind, spec)


def torch_dtype(spec: ModelSource):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[spec.dtype]
