"""Which models serve, and hot reload: the registry's aliases are polled and a moved alias is loaded in the
background, then swapped in whole. A batch holds the slot it started with, so no request fails in a switch.

Slots: ``champion`` (the policy that answers), ``challenger`` (a share of traffic, when a split is set) and
``reward`` (the champion reward model, for best-of reranking).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from service.config import ServiceConfig

log = logging.getLogger("flywheel.service")


@dataclass(frozen=True)
class Slot:
    version: str  # e.g. flywheel-policy/3, or local/<content hash> for a fallback folder
    model: object
    tok: object = None


def _local_version(folder: Path) -> str:
    from flywheel.registry import content_hash

    return f"local/{content_hash(folder)[:12]}"


class ModelManager:
    def __init__(self, config: ServiceConfig):
        self.config = config
        p = config.params
        self.kinds = (
            ["champion"]
            + (["challenger"] if p.challenger_fraction > 0 else [])
            + (["reward"] if max(p.best_of_n, p.max_best_of) > 1 else [])
        )
        self.slots: dict[str, Slot | None] = {k: None for k in self.kinds}
        self.known_versions: set[str] = set()
        self.reloads = 0
        self.errors = 0
        self._local: dict[Path, str] = {}
        self._lock = threading.Lock()

    def _resolve(self, kind: str) -> tuple[str, Path] | None:
        """(version, folder) the slot should hold now, or None when there is nothing to serve."""
        from flywheel.registry import CHALLENGER, CHAMPION, POLICY, REWARD

        reg = self.config.registry
        if reg is not None:
            name, alias = {
                "champion": (POLICY, CHAMPION),
                "challenger": (POLICY, CHALLENGER),
                "reward": (REWARD, CHAMPION),
            }[kind]
            v = reg.alias(name, alias)
            if v is not None:
                current = self.slots.get(kind)
                label = f"{name}/{v.version}"
                if current is not None and current.version == label:
                    return label, Path()
                return label, Path(reg.local_dir(v))
        folder = {"champion": self.config.fallback_policy, "reward": self.config.fallback_reward}.get(kind)
        if folder is None or not Path(folder).is_dir():
            return None
        if folder not in self._local:
            self._local[folder] = _local_version(folder)
        return self._local[folder], folder

    @staticmethod
    def _load(kind: str, version: str, folder: Path) -> Slot:
        if kind == "reward":
            from flywheel.models.reward import RewardModel

            return Slot(version, RewardModel.load(folder))
        from flywheel.models.policy import load_policy

        model, tok = load_policy(folder)
        return Slot(version, model, tok)

    def refresh(self) -> list[str]:
        """Load whatever moved (blocking; runs on a worker thread); returns what was switched."""
        switched = []
        with self._lock:
            for kind in self.kinds:
                try:
                    target = self._resolve(kind)
                    current = self.slots[kind]
                    if target is None or (current is not None and current.version == target[0]):
                        continue
                    t0 = time.perf_counter()
                    slot = self._load(kind, *target)
                except Exception as exc:  # a broken or unreachable model must not take down the one serving
                    self.errors += 1
                    log.warning(
                        "loading the %s model failed (%s: %s); keeping %s",
                        kind,
                        type(exc).__name__,
                        exc,
                        current.version if current else "none",
                    )
                    continue
                self.slots[kind] = slot
                self.known_versions.add(slot.version)
                self.reloads += current is not None
                switched.append(f"{kind}: {current.version if current else 'none'} -> {slot.version}")
                log.info("%s model %s loaded in %.1f s", kind, slot.version, time.perf_counter() - t0)
        if switched:
            # the libraries and weights just loaded are long-lived: keep them out of the cyclic collector, whose
            # full passes over them were the service's worst latency spikes (hundreds of ms)
            gc.collect()
            gc.freeze()
        return switched

    @property
    def ready(self) -> bool:
        return self.slots["champion"] is not None

    async def poll(self, interval_s: float) -> None:
        """Refresh every ``interval_s`` seconds, forever (cancel to stop)."""
        while True:
            await asyncio.to_thread(self.refresh)
            await asyncio.sleep(interval_s)
