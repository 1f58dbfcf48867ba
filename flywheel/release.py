"""Release: bootstrap, register the challengers, check they load and answer, promote the blessed.

Not a DVC stage (DVC may restore a stage from its cache without running it, which would silently
skip a side effect): ``flywheel release`` runs after ``dvc repro``, and is idempotent: the same
model folder is never registered twice, and promoting the current champion does nothing.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from flywheel.registry import CHALLENGER, CHAMPION, MODELS, Registry, RegistryError, content_hash


@dataclass
class SmokeParams:
    prompts: list[str] = field(default_factory=lambda: ["Hello! Who are you?", "Give me one tip for sleeping well."])
    max_new_tokens: int = 16
    timeout_s: float = 120.0
    min_chars: int = 1            # an answer shorter than this (after stripping) fails the check


@dataclass
class Outcome:
    kind: str
    version: str | None = None
    created: bool = False
    blessed: bool = False
    smoke_ok: bool = False
    promoted: bool = False
    reasons: list[str] = field(default_factory=list)


def bootstrap(registry: Registry, base: Path) -> list[str]:
    """On an empty registry, register the base models as version 1 and make them champion."""
    done = []
    for kind, name in MODELS.items():
        if registry.alias(name, CHAMPION) is not None:
            continue
        version, _ = registry.register(name, base / kind, tags={"origin": "base", "blessed": "base model",
                                                                "smoke_check": "base model"})
        registry.set_alias(name, CHAMPION, version.version)
        done.append(f"{name} v{version.version} ({kind} base) is champion")
    return done


def smoke_check(kind: str, folder: Path, params: SmokeParams) -> tuple[bool, str]:
    """Load the model as the service does and make it answer (score) within the time bound."""
    t0 = time.perf_counter()
    try:
        if kind == "policy":
            from pipelines.policy_model import generate, load_policy

            model, tok = load_policy(folder)
            answers = generate(model, tok, [[{"role": "user", "content": p}] for p in params.prompts],
                               params.max_new_tokens)
            if not all(len(a.strip()) >= params.min_chars for a in answers):
                return False, f"empty answer to a smoke prompt: {answers}"
        else:
            import math

            from pipelines.reward_model import RewardModel

            model = RewardModel.load(folder)
            scores = model.score([[{"role": "user", "content": p}] for p in params.prompts], ["Sure."] * len(params.prompts))
            if not all(math.isfinite(s) for s in scores):
                return False, f"non-finite reward scores {scores}"
    except Exception as exc:  # the check's job is to catch any way a model fails to load or run
        return False, f"failed to load or run: {type(exc).__name__}: {exc}"
    took = time.perf_counter() - t0
    if took > params.timeout_s:
        return False, f"took {took:.1f} s, over the bound of {params.timeout_s} s"
    return True, f"loaded and answered {len(params.prompts)} prompts in {took:.1f} s"


def release(registry: Registry, challenger: Path, blessing: dict, lineage: dict, smoke: SmokeParams,
            log=print, hold: str | None = None) -> list[Outcome]:
    """Register each challenger, check it, and promote it when blessed and the check passed, unless
    ``hold`` says why not (a human rejected the release)."""
    outcomes = []
    for kind, name in MODELS.items():
        out = Outcome(kind)
        folder = challenger / kind
        verdict = blessing.get(kind, {"blessed": False, "reasons": ["no verdict"]})
        digest = content_hash(folder)
        evaluated = (blessing.get("candidates") or {}).get(kind)
        if evaluated and evaluated != digest:
            out.reasons.append(f"the blessing is for another model ({evaluated[:12]}), not {digest[:12]}: rerun the pipeline")
            outcomes.append(out)
            continue
        champion = registry.alias(name, CHAMPION)
        if champion is not None and champion.tags.get("content_hash") == digest:
            out.version, out.reasons = champion.version, ["already the champion"]
            outcomes.append(out)
            continue
        tags = {"blessed": str(verdict["blessed"]).lower(), "gate_reasons": json.dumps(verdict["reasons"]),
                **{k: v for k, v in lineage.items() if v}}
        version, out.created = registry.register(name, folder, tags=tags, digest=digest,
                                                 run_id=lineage.get(f"{kind}_mlflow_run_id"))
        out.version = version.version
        registry.set_tags(name, version.version, tags)
        registry.set_alias(name, CHALLENGER, version.version)
        out.blessed = bool(verdict["blessed"])
        out.smoke_ok, detail = smoke_check(kind, registry.local_dir(version), smoke)
        registry.set_tags(name, version.version, {"smoke_check": "passed" if out.smoke_ok else "failed",
                                                  "smoke_detail": detail})
        log(f"{name} v{version.version}: smoke check {'passed' if out.smoke_ok else 'FAILED'}: {detail}")
        if not out.blessed:
            out.reasons += verdict["reasons"] or ["not blessed"]
        if not out.smoke_ok:
            out.reasons.append(f"smoke check failed: {detail}")
        if hold:
            out.reasons.append(f"not promoted: {hold}")
        if out.blessed and out.smoke_ok and not hold:
            registry.promote(name, version.version)
            registry.set_tags(name, version.version, {"promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            out.promoted = True
        outcomes.append(out)
    return outcomes


def promote(registry: Registry, kind: str, version: str) -> None:
    """Promote a named version by hand; only one the gate blessed and whose smoke check passed."""
    name = MODELS[kind]
    v = registry.get(name, version)
    if v.tags.get("blessed") not in ("true", "base model"):
        raise RegistryError(f"{name} v{version} was not blessed by the gate ({v.tags.get('gate_reasons', 'no verdict')}); "
                            "it cannot be promoted")
    if v.tags.get("smoke_check") not in ("passed", "base model"):
        raise RegistryError(f"{name} v{version} has not passed its smoke check; it cannot be promoted")
    registry.promote(name, version)
