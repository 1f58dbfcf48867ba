"""The service's tunables (``params.yaml: serve``), typed, and the resolved configuration it runs with.

Parsed once at the edge (``flywheel serve``, tests, benchmarks) and passed down: nothing in the service
reads the environment or ``params.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RateLimit(_Strict):
    """A token bucket per API token: ``per_s`` requests a second on average, bursts of ``burst``. The feedback
    bucket counts events (a batch of n costs n), so its burst bounds the largest batch a token can send."""

    per_s: float = Field(gt=0)
    burst: int = Field(gt=0)


class ServeParams(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    fallback_policy: str = "models/base/policy"   # served when the registry has no champion
    fallback_reward: str = "models/base/reward"
    max_body_bytes: int = Field(1048576, gt=0)     # a chat request; 413 past it
    max_batch_body_bytes: int = Field(8388608, gt=0)
    max_batch_events: int = Field(1000, gt=0)
    max_messages: int = Field(64, gt=0)
    max_message_chars: int = Field(16000, gt=0)
    max_new_tokens: int = Field(256, gt=0)         # the largest max_tokens a request may ask for
    default_max_tokens: int = Field(64, gt=0)
    max_prompt_tokens: int = Field(512, gt=0)      # a longer prompt keeps its last tokens
    batch_window_ms: float = Field(10.0, ge=0)     # how long the batcher waits for more requests
    max_batch_size: int = Field(8, gt=0)           # rows (answers) in one generate call
    max_queue: int = Field(256, gt=0)              # waiting requests past which chat answers 503
    best_of_n: int = Field(1, ge=1, le=16)         # default candidates per answer, reranked by the reward model
    max_best_of: int = Field(4, ge=1, le=16)
    best_of_temperature: float = Field(0.8, gt=0, le=2)
    threads: int = Field(1, ge=0)                  # torch threads for generation; 0: torch's default (all cores)
    challenger_fraction: float = Field(0.0, ge=0, le=1)
    reload_poll_s: float = Field(5.0, gt=0, le=10)
    write_batch_max: int = Field(512, gt=0)        # feedback requests committed in one transaction
    sqlite_synchronous: str = Field("normal", pattern="^(normal|full)$")
    access_log: bool = True
    chat_rate: RateLimit = RateLimit(per_s=2.0, burst=10)
    feedback_rate: RateLimit = RateLimit(per_s=100.0, burst=1000)   # events; burst = max_batch_events


def parse_serve_params(section: dict | None) -> ServeParams:
    """``params.yaml: serve`` as ``ServeParams``; a wrong key or value raises ``ValueError`` naming it."""
    try:
        return ServeParams.model_validate(section or {})
    except ValidationError as exc:
        parts = [".".join(str(p) for p in e["loc"]) + ": " + e["msg"] for e in exc.errors(include_url=False)]
        raise ValueError("params.yaml serve: " + "; ".join(parts)) from None


@dataclass(frozen=True)
class ServiceConfig:
    """Everything the app needs, resolved: params, contract limits, the store URL and where models come from.

    ``registry`` is a ``flywheel.registry.Registry`` (or anything with ``alias`` and ``local_dir``), or None
    to serve the fallback folders only.
    """

    params: ServeParams
    feedback_store: str
    max_text_chars: int = 16000
    max_turns: int = 64
    max_line_bytes: int = 262144       # one feedback event's body (contract.max_line_bytes)
    fallback_policy: Path | None = None
    fallback_reward: Path | None = None
    registry: object | None = None
