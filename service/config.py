"""The resolved configuration the service runs with: its tunables (``params.yaml: serve``, typed in
``flywheel/params.py`` as ``ServeParams``), the contract's limits, the store and where the models come from.

Parsed once at the edge (``flywheel serve``, tests, benchmarks) and passed down: nothing in the service
reads the environment or ``params.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flywheel.params import ServeParams


@dataclass(frozen=True)
class ServiceConfig:
    """Everything the app needs, resolved: params, contract limits, the store URL and where models come from.

    ``registry`` is a ``flywheel.registry.Registry`` (or anything with ``alias`` and ``local_dir``), or None
    to serve the fallback folders only.
    """

    params: ServeParams
    feedback_store: str
    max_text_chars: int  # params.yaml contract: the limits of one event
    max_turns: int
    max_line_bytes: int  # one feedback event's body (contract.max_line_bytes)
    fallback_policy: Path | None = None
    fallback_reward: Path | None = None
    registry: object | None = None
    base_policy: Path | None = None  # the base model adapter versions load on (models/base/policy)
    tracking_uri: str | None = None  # MLflow tracking store the answers are traced to (None: no tracing)
