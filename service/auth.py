"""API tokens and per-token rate limits.

A token is 256 random bits (URL-safe base64, prefixed ``fw_``), shown once when created; the store keeps
only its SHA-256. Scopes: ``chat`` (answers), ``feedback`` (events), ``admin`` (everything, metrics included);
a token may hold several (stored comma-separated, e.g. ``chat,feedback``; ``admin`` subsumes the others).
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass

from flywheel.params import RateLimit
from service.store import FeedbackStore

SCOPES = ("chat", "feedback", "admin")
PREFIX = "fw_"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def normalise_scopes(scopes: str | Iterable[str]) -> str:
    """Scopes as stored: known, de-duplicated, sorted, comma-separated; ``admin`` alone when it is among them.
    Raises ``ValueError`` naming an unknown scope."""
    names = [scopes] if isinstance(scopes, str) else list(scopes)
    wanted = {p.strip() for n in names for p in n.split(",") if p.strip()}
    if not wanted:
        raise ValueError(f"no scope given; expected one or more of {', '.join(SCOPES)}")
    unknown = sorted(wanted - set(SCOPES))
    if unknown:
        raise ValueError(f"unknown scope {unknown[0]!r}; expected one or more of {', '.join(SCOPES)}")
    return "admin" if "admin" in wanted else ",".join(sorted(wanted))


def create_token(store: FeedbackStore, scopes: str | Iterable[str], name: str = "") -> tuple[str, str]:
    """A new token allowed ``scopes`` (one name or several): (the token, to print once; its public id)."""
    scope = normalise_scopes(scopes)
    token = PREFIX + secrets.token_urlsafe(32)
    digest = token_hash(token)
    token_id = digest[:12]
    store.add_token(digest, token_id, scope, name[:128])
    return token, token_id


@dataclass(frozen=True)
class Principal:
    token_id: str
    scope: str  # as stored: "chat", "chat,feedback", "admin"

    @property
    def scopes(self) -> frozenset[str]:
        return frozenset(self.scope.split(","))

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes


class TokenBook:
    """Token hashes in memory; an unknown token reloads the table at most once per ``refresh_s``, so a
    token created while the service runs works at once and a flood of bad tokens costs no queries. The
    table is also reloaded when older than ``max_age_s``, so a revoked token stops working within that."""

    def __init__(self, store: FeedbackStore, refresh_s: float = 1.0, max_age_s: float = 5.0):
        self.store, self.refresh_s, self.max_age_s = store, refresh_s, max_age_s
        self._known: dict[str, tuple[str, str]] = {}
        self._loaded_at = float("-inf")
        self._refresh: asyncio.Task | None = None

    async def lookup(self, token: str) -> Principal | None:
        if not token.startswith(PREFIX) or len(token) > 128:
            return None
        digest = token_hash(token)
        if digest not in self._known or time.monotonic() - self._loaded_at > self.max_age_s:
            await self._reload()
        hit = self._known.get(digest)
        return Principal(*hit) if hit else None

    async def _reload(self) -> None:
        task = self._refresh
        if task is None or task.done() or task.get_loop() is not asyncio.get_running_loop():
            if time.monotonic() - self._loaded_at < self.refresh_s:
                return
            task = self._refresh = asyncio.ensure_future(self._load())
        await asyncio.shield(task)  # concurrent misses wait for the one reload

    async def _load(self) -> None:
        self._known = await asyncio.to_thread(self.store.tokens)
        self._loaded_at = time.monotonic()


class RateLimiter:
    """A token bucket per (API token, limit name)."""

    def __init__(self):
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}

    def take(self, key: str, name: str, limit: RateLimit, cost: float = 1.0) -> float:
        """0 when allowed; else the seconds to wait before retrying."""
        now = time.monotonic()
        level, last = self._buckets.get((key, name), (float(limit.burst), now))
        level = min(float(limit.burst), level + (now - last) * limit.per_s)
        if level >= cost:
            self._buckets[(key, name)] = (level - cost, now)
            return 0.0
        self._buckets[(key, name)] = (level, now)
        return (cost - level) / limit.per_s
