"""Release: bootstrap, register the challengers, check they load and answer, promote the blessed.

Only a version blessed by the gate params.yaml names (``bless.gate``, its rules' hash recorded in the blessing)
and smoke-checked becomes champion, by a release, ``flywheel promote`` or ``flywheel rollback`` alike; the base
model of the bootstrap is the one exception (the floor a rollback can always reach).

Not a DVC stage (DVC may restore a stage from its cache without running it, which would silently
skip a side effect): ``flywheel release`` runs after ``dvc repro``, and is idempotent: the same
model folder is never registered twice, and promoting the current champion does nothing.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from flywheel.params import SmokeParams
from flywheel.registry import CHALLENGER, CHAMPION, MODELS, PREVIOUS, Registry, RegistryError, Version, content_hash

# lineage tags: written when a version is registered, never overwritten by a later release of the same content
PROVENANCE = frozenset(
    {"git_commit", "airflow_run_id", "loop_run_id", "feedback_window", "dvc_inputs"}
    | {"policy_mlflow_run_id", "reward_mlflow_run_id"}
)


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
        version, _ = registry.register(
            name, base / kind, tags={"origin": "base", "blessed": "base model", "smoke_check": "base model"}
        )
        registry.set_alias(name, CHAMPION, version.version)
        registry.describe(name, version.version, f"base model ({kind}): the first champion, never gated")
        done.append(f"{name} v{version.version} ({kind} base) is champion")
    return done


def smoke_check(kind: str, folder: Path, params: SmokeParams, base: Path | None = None) -> tuple[bool, str]:
    """Load the model as the service does (an adapter on ``base``'s policy) and make it answer (score) within the
    time bound."""
    t0 = time.perf_counter()
    try:
        if kind == "policy":
            from flywheel.models.policy import generate, load_policy

            model, tok = load_policy(folder, base=base / "policy" if base else None)
            answers = generate(
                model, tok, [[{"role": "user", "content": p}] for p in params.prompts], params.max_new_tokens
            )
            if not all(len(a.strip()) >= params.min_chars for a in answers):
                return False, f"empty answer to a smoke prompt: {answers}"
        else:
            import math

            from flywheel.models.reward import RewardModel

            model = RewardModel.load(folder)
            scores = model.score(
                [[{"role": "user", "content": p}] for p in params.prompts], ["Sure."] * len(params.prompts)
            )
            if not all(math.isfinite(s) for s in scores):
                return False, f"non-finite reward scores {scores}"
    except Exception as exc:  # the check's job is to catch any way a model fails to load or run
        return False, f"failed to load or run: {type(exc).__name__}: {exc}"
    took = time.perf_counter() - t0
    if took > params.timeout_s:
        return False, f"took {took:.1f} s, over the bound of {params.timeout_s} s"
    return True, f"loaded and answered {len(params.prompts)} prompts in {took:.1f} s"


class GateMismatch(RegistryError):
    """The blessing is not from the gate params.yaml names (or not from its current rules)."""


def gate_problem(blessing: dict, gates: dict[str, str]) -> str | None:
    """Why ``blessing`` does not count under the accepted ``gates`` (name -> rules' sha256; the first is
    params.yaml's ``bless.gate``); None when it does."""
    name, sha = blessing.get("gate"), blessing.get("gate_sha256")
    in_force = next(iter(gates), "?")
    if not name or not sha:
        return "the blessing records no gate (its name and rules' hash): rerun `dvc repro bless`"
    if name not in gates:
        return (
            f"the blessing is from the {name!r} gate, but params.yaml bless.gate is {in_force!r}: rerun "
            f"`dvc repro bless` (a test may accept it with `flywheel release --allow-gate {name}`)"
        )
    if sha != gates[name]:
        return (
            f"the blessing is from other rules of the {name!r} gate (sha256 {sha[:12]}, params.yaml has "
            f"{gates[name][:12]}): rerun `dvc repro bless`"
        )
    return None


def refusal(v: Version, gate: str | None = None, allow_gate: str | None = None) -> str | None:
    """Why version ``v`` may not become champion by hand (promote, rollback); None when it may. The base
    model of the bootstrap may (it is the floor every rollback can reach)."""
    if v.tags.get("origin") == "base" or v.tags.get("blessed") == "base model":
        return None
    if v.tags.get("blessed") != "true":
        return f"was never blessed by the gate ({v.tags.get('gate_reasons', 'no verdict')})"
    if v.tags.get("smoke_check") != "passed":
        return "has not passed its smoke check"
    if v.tags.get("approval") == "rejected":
        return f"was rejected by {v.tags.get('approval_by', 'a reviewer')}"
    blessed_by = v.tags.get("gate")
    if gate and blessed_by and blessed_by not in (gate, allow_gate):
        return (
            f"was blessed by the {blessed_by!r} gate, but params.yaml bless.gate is {gate!r} "
            f"(--allow-gate {blessed_by} accepts it)"
        )
    return None


def drop_stale_challenger(registry: Registry, name: str, log=print, gates: list[str] | None = None) -> None:
    """Remove the ``challenger`` alias unless it points at a blessed, smoke-checked version awaiting promotion
    (never one refused, rolled back from, already champion, or blessed by a gate not in ``gates``): the service
    splits traffic to it."""
    v = registry.alias(name, CHALLENGER)
    if v is None:
        return
    champion = registry.alias(name, CHAMPION)
    other_gate = gates and v.tags.get("gate") and v.tags["gate"] not in gates
    why = (
        refusal(v)
        or ("is refused" if v.tags.get("refused") else None)
        or (f"was blessed by the {v.tags.get('gate')!r} gate" if other_gate else None)
        or ("was rolled back from" if v.tags.get("rolled_back") else None)
        or ("is the champion" if champion is not None and champion.version == v.version else None)
    )
    if why:
        registry.delete_alias(name, CHALLENGER)
        log(f"{name} v{v.version} {why}: `challenger` alias removed")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def release(
    registry: Registry,
    challenger: Path,
    blessing: dict,
    lineage: dict,
    smoke: SmokeParams,
    log=print,
    *,
    gates: dict[str, str],
    reject: str | None = None,
    hold: str | None = None,
    base: Path | None = None,
) -> list[Outcome]:
    """Register each challenger, check it, and promote it when the gate in force blessed it and the check passed.

    ``gates``: the gates whose blessing counts, name -> rules' sha256 (params.yaml's ``bless.gate`` first, plus
    an explicit ``--allow-gate``); any other raises ``GateMismatch``. ``reject``: a human rejected the release
    (registered, checked, refused). ``hold``: not promoted now; a blessed, checked version becomes ``challenger``,
    awaiting ``flywheel promote``. A version refused (not blessed, check failed, rejected, rolled back from) is
    tagged ``refused`` and never carries the ``challenger`` alias."""
    problem = gate_problem(blessing, gates)
    if problem:
        raise GateMismatch(problem)
    outcomes = []
    for kind, name in MODELS.items():
        drop_stale_challenger(registry, name, log, list(gates))
        out = Outcome(kind)
        folder = challenger / kind
        verdict = blessing.get(kind, {"blessed": False, "reasons": ["no verdict"]})
        digest = content_hash(folder)
        evaluated = (blessing.get("candidates") or {}).get(kind)
        if evaluated and evaluated != digest:
            out.reasons.append(
                f"the blessing is for another model ({evaluated[:12]}), not {digest[:12]}: rerun the pipeline"
            )
            outcomes.append(out)
            continue
        champion = registry.alias(name, CHAMPION)
        if champion is not None and champion.tags.get("content_hash") == digest:
            out.version, out.reasons = champion.version, ["already the champion"]
            outcomes.append(out)
            continue
        tags = {  # short ones (the MLflow UI cuts long values); each run's own id only (training_run_id)
            "blessed": str(verdict["blessed"]).lower(),
            "gate_reasons": json.dumps(verdict["reasons"]),
            **({"gate_not_applied": json.dumps(verdict["not_applied"])} if verdict.get("not_applied") else {}),
            "gate": blessing["gate"],
            "gate_primary": json.dumps(verdict.get("primary")),
            "gate_sha256": blessing["gate_sha256"],
            "judge": blessing.get("judge") or "none",
            **{k: v for k, v in lineage.items() if v and not k.endswith("_mlflow_run_id")},
        }
        version, out.created = registry.register(
            name, folder, tags=tags, digest=digest, run_id=lineage.get(f"{kind}_mlflow_run_id"), base=base
        )
        out.version = version.version
        if not out.created:  # released again (another run): the verdict may change, where it came from never
            tags = {k: v for k, v in tags.items() if k not in PROVENANCE or k not in version.tags}
            registry.set_tags(name, version.version, {k: v for k, v in tags.items() if version.tags.get(k) != v})
        out.blessed = bool(verdict["blessed"])
        out.smoke_ok, detail = smoke_check(kind, registry.local_dir(version), smoke, base)
        smoke_tag = "passed" if out.smoke_ok else "failed"
        if out.created or version.tags.get("smoke_check") != smoke_tag:  # its timing alone is no news
            registry.set_tags(name, version.version, {"smoke_check": smoke_tag, "smoke_detail": detail})
        log(f"{name} v{version.version}: smoke check {'passed' if out.smoke_ok else 'FAILED'}: {detail}")
        if not out.blessed:
            out.reasons += verdict["reasons"] or ["not blessed"]
        if not out.smoke_ok:
            out.reasons.append(f"smoke check failed: {detail}")
        rolled_back = version.tags.get("rolled_back")
        if rolled_back:
            out.reasons.append(
                f"v{version.version} was rolled back from ({rolled_back}): a release does not promote "
                f"it again; `flywheel promote {version.version} --model {kind}` does, by hand"
            )
        if reject:
            out.reasons.append(f"not promoted: {reject}")
        if out.reasons:
            registry.set_tags(name, version.version, {"refused": "; ".join(out.reasons)})
            drop_stale_challenger(registry, name, log, list(gates))
        elif hold:
            out.reasons.append(f"not promoted: {hold}; `challenger` until `flywheel promote`")
            registry.delete_tags(name, version.version, ["refused"])
            registry.set_tags(name, version.version, {"awaiting": hold})
            registry.set_alias(name, CHALLENGER, version.version)
        else:
            registry.delete_tags(name, version.version, ["refused", "awaiting"])
            registry.promote(name, version.version)
            registry.set_tags(name, version.version, {"promoted_at": _now()})
            drop_stale_challenger(registry, name, log, list(gates))
            out.promoted = True
        describe(registry, name, out.version)
        outcomes.append(out)
    return outcomes


def describe(registry: Registry, name: str, version: str) -> None:
    """The version's description in the MLflow UI: its one-line verdict with the gate's figure, e.g.
    ``promoted: +0.119 [+0.037, +0.201] (heldout_pref_accuracy, gate default)``."""
    from flywheel import verdicts

    tags = registry.get(name, version).tags
    try:
        metric = (json.loads(tags.get("gate_primary") or "null") or {}).get("metric")
    except (ValueError, AttributeError):
        metric = None
    what = ", ".join(x for x in (metric, f"gate {tags['gate']}" if tags.get("gate") else "") if x)
    registry.describe(name, version, verdicts.of_version(tags) + (f" ({what})" if what else ""))


def promote(
    registry: Registry, kind: str, version: str, gate: str | None = None, allow_gate: str | None = None
) -> list[str]:
    """Promote a named version by hand: only one the gate in force blessed and whose smoke check passed (or the
    base model). Returns notes worth printing."""
    name = MODELS[kind]
    v = registry.get(name, version)
    why = refusal(v, gate, allow_gate)
    if why:
        raise RegistryError(f"{name} v{version} {why}; it cannot be promoted")
    registry.promote(name, version)
    registry.delete_tags(name, version, ["awaiting", "refused", "rolled_back"])
    registry.set_tags(
        name,
        version,
        {
            "promoted_at": _now(),
            **({"promoted_after_rollback": v.tags["rolled_back"]} if v.tags.get("rolled_back") else {}),
        },
    )
    drop_stale_challenger(registry, name, log=lambda *_: None)
    describe(registry, name, version)
    notes = (
        [f"{name} v{version} had been rolled back from ({v.tags['rolled_back']}): promoted again by hand"]
        if v.tags.get("rolled_back")
        else []
    )
    if v.tags.get("origin") == "base":
        notes.append(f"{name} v{version} is the base model (bootstrap): never gated, allowed as the floor")
    return notes


def rollback(
    registry: Registry, kind: str, to: str | None = None, gate: str | None = None, allow_gate: str | None = None
) -> tuple[Version, Version, list[str]]:
    """Point ``champion`` back at ``to`` (default: ``previous-champion``): only a version the gate in force
    blessed and whose smoke check passed, or the base model. The former champion is tagged ``rolled_back`` (a
    release will not promote it again). Returns (new champion, former champion, notes)."""
    name = MODELS[kind]
    target = registry.get(name, to) if to else registry.alias(name, PREVIOUS)
    if target is None:
        raise RegistryError(f"{name} has no previous-champion to roll back to; name a version")
    why = refusal(target, gate, allow_gate)
    if why:
        raise RegistryError(f"{name} v{target.version} {why}; it cannot be rolled back to")
    new, old = registry.rollback(name, target.version)
    registry.set_tags(name, old.version, {"rolled_back": f"{_now()}, champion moved back to v{new.version}"})
    drop_stale_challenger(registry, name, log=lambda *_: None)
    describe(registry, name, old.version)
    notes = (
        [f"v{new.version} is the base model (bootstrap): never gated, always a valid rollback target"]
        if new.tags.get("origin") == "base"
        else []
    )
    return new, old, notes


def lineage(settings) -> dict:
    """What produced the challengers, tagged on the versions a release registers: the git commit, the input hashes
    of the training stages in dvc.lock, the feedback window, the Airflow, loop and training run ids. dvc.lock is
    also logged to the loop's MLflow run when there is one."""
    import yaml

    from flywheel import tracking
    from flywheel.data import rawstore

    s = settings
    out = {
        "git_commit": tracking.git_commit(s.root),
        "airflow_run_id": s.airflow_run_id,
        "loop_run_id": s.parent_run_id,
    }
    lock = s.root / "dvc.lock"
    if lock.exists():
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        inputs = {
            st: {d["path"]: d.get("md5") for d in stages.get(st, {}).get("deps", [])}
            for st in ("prepare", "train_reward", "train_policy")
        }
        # one short tag (the MLflow UI cuts long ones); the inputs themselves: dvc.lock, logged on the loop run
        out["dvc_inputs"] = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    window = rawstore.read_columns(s.raw_store, ["ingested_at", "batch_id"])
    if window.num_rows:
        col = window.column("ingested_at").to_pylist()
        out["feedback_window"] = (
            f"{min(col)}..{max(col)} ({window.num_rows} events, "
            f"{len(set(window.column('batch_id').to_pylist()))} batches)"
        )
    for kind, f in (("policy", "metrics/train_policy.json"), ("reward", "metrics/train_reward.json")):
        p = s.root / f
        if p.exists():
            out[f"{kind}_mlflow_run_id"] = json.loads(p.read_text()).get("mlflow_run_id", "")
    if lock.exists() and s.parent_run_id:
        import mlflow

        tracking.configure_from(s)
        with mlflow.start_run(run_id=s.parent_run_id):
            mlflow.log_artifact(str(lock))
    return out
