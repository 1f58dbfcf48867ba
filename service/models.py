"""Which models serve, and hot reload: the registry's aliases are polled and a moved alias is loaded in the
background, then swapped in whole. A batch holds the slot it started with, so no request fails in a switch.

LoRA versions share one copy of the base model: the first loads it (a PEFT model), each later one only adds its
adapter (megabytes, read in milliseconds), and a batch activates its slot's adapter before generating (batches run
one at a time, on one thread). An adapter no slot uses is dropped a minute later (a batch that still holds it has
finished by then). Full-weight versions load as before.

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
    adapter: str | None = None  # the named adapter of the shared base model this slot answers with


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
        self._shared = None  # the base model adapter versions share (a PEFT model), once one is loaded
        self._unused_since: dict[str, float] = {}

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

    def _load(self, kind: str, version: str, folder: Path) -> Slot:
        if kind == "reward":
            from flywheel.models.reward import RewardModel

            return Slot(version, RewardModel.load(folder))
        from flywheel.models.policy import is_adapter, load_policy

        if is_adapter(folder) and self.config.base_policy is not None:
            return self._load_adapter(version, folder)
        model, tok = load_policy(folder, base=self.config.base_policy)
        return Slot(version, model, tok)

    def _load_adapter(self, version: str, folder: Path) -> Slot:
        """The adapter ``folder`` on the shared base model (loaded the first time only)."""
        import re

        import torch
        from transformers import AutoTokenizer

        from flywheel.models.policy import adapter_base

        base = adapter_base(folder, self.config.base_policy)  # the base it was trained on, by content hash
        name = "v_" + re.sub(r"\W", "_", version)
        tok = AutoTokenizer.from_pretrained(folder)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        if self._shared is None:
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            t0 = time.perf_counter()
            base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)  # as load_policy
            self._shared = PeftModel.from_pretrained(base_model, str(folder), adapter_name=name).eval()
            log.info("base model %s loaded once for the adapter versions (%.2f s)", base, time.perf_counter() - t0)
        elif name not in self._shared.peft_config:
            t0 = time.perf_counter()
            self._shared.load_adapter(str(folder), adapter_name=name)
            log.info("adapter of %s added to the shared base model (%.3f s)", version, time.perf_counter() - t0)
        self._drop_unused_adapters(keep=name)
        return Slot(version, self._shared, tok, adapter=name)

    def _drop_unused_adapters(self, keep: str, grace_s: float = 60.0) -> None:
        in_use = {s.adapter for s in self.slots.values() if s is not None} | {keep}
        now = time.monotonic()
        for name in list(self._shared.peft_config):
            if name in in_use:
                self._unused_since.pop(name, None)
            elif now - self._unused_since.setdefault(name, now) >= grace_s:
                self._shared.delete_adapter(name)
                self._unused_since.pop(name)

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
