"""The ``prepare`` stage: de-duplicate the raw events and compile the training sets.

Out come three sets, each split into train / val / test by a hash of ``conversation_id`` (a
conversation never straddles two splits, and an example's split never changes as data grows):
- ``pairs``: preference pairs (prompt, chosen, rejected) for DPO, from preference events and from
  thumbs up / down on the same prompt;
- ``sft``: (prompt, completion) from corrections and top-rated answers;
- ``reward_pairs``: the preference pairs plus pairs from ratings of the same prompt;
- ``kto``: unpaired (prompt, answer, desirable) examples for KTO, from every thumb, every rating at or above /
  at or below the thresholds of ``prepare.kto``, and both halves of preference events: most feedback is a thumb
  on one answer, which forms no pair.
Every record keeps the ``event_ids`` and ``user_ids`` it came from, so erasure can find it.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.compute as pc

from flywheel.data import rawstore, review
from flywheel.data.golden import Golden, GoldenError, load_golden
from flywheel.params import GoldenParams, PrepareParams, SplitParams
from flywheel.settings import Settings
from flywheel.stages import StageFailed

# What this step's functions import, imported ahead by a DAG task's warm runner while DVC starts
# (flywheel/orchestration.py stage_runner): a module missing here is imported by the stage itself.
PRELOAD = ("datasketch",)

SETS = ("pairs", "sft", "reward_pairs", "kto")
SPLITS = ("train", "val", "test")


def split_of(conversation_id: str, split: SplitParams) -> str:
    """test / val / train by a stable hash of the conversation id."""
    bucket = int(hashlib.sha256(conversation_id.encode()).hexdigest()[:8], 16) % 100
    if bucket < split.test_pct:
        return "test"
    if bucket < split.test_pct + split.val_pct:
        return "val"
    return "train"


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _answer_text(e: dict) -> str:
    return " ".join([e["response"], e.get("rejected") or "", e.get("correction") or ""])


def _key_text(e: dict) -> str:
    last_user = next((m["content"] for m in reversed(e["prompt"]) if m["role"] == "user"), "")
    return " ".join([last_user, _answer_text(e)])


def _shingles(text: str, k: int) -> set[str]:
    return {text[j : j + k] for j in range(max(1, len(text) - k + 1))}


@dataclass
class DedupReport:
    exact: int = 0
    near: int = 0


def deduplicate(events: list[dict], params: PrepareParams) -> tuple[list[dict], DedupReport]:
    """Drop exact duplicates (same prompt, answers and feedback) and MinHash near-duplicates; keep the first."""
    from datasketch import MinHash, MinHashLSH

    report = DedupReport()
    seen: set[str] = set()
    unique = []
    for e in events:
        key = hashlib.sha256(
            json.dumps(
                [
                    e["prompt"],
                    _norm(e["response"]),
                    e["feedback_type"],
                    e.get("thumbs"),
                    e.get("rating"),
                    _norm(e.get("rejected") or ""),
                    _norm(e.get("correction") or ""),
                ],
                sort_keys=True,
            ).encode()
        ).hexdigest()
        if key in seen:
            report.exact += 1
            continue
        seen.add(key)
        unique.append(e)
    try:
        lsh = MinHashLSH(threshold=params.near_dup_threshold, num_perm=params.minhash_perms)
    except ValueError as exc:
        raise ValueError(
            f"prepare.near_dup_threshold={params.near_dup_threshold} with prepare.minhash_perms="
            f"{params.minhash_perms}: {exc}"
        ) from None
    kept = []
    k = params.shingle_chars

    def same_answer(a: dict, b: dict) -> bool:
        """The answers alone are near-identical (with a long prompt, prompt + answer can be similar when the
        answers are not: another answer to the same question is not a duplicate)."""
        sa, sb = _shingles(_norm(_answer_text(a)), k), _shingles(_norm(_answer_text(b)), k)
        return len(sa & sb) >= params.near_dup_threshold * len(sa | sb)

    for i, e in enumerate(unique):
        m = MinHash(num_perm=params.minhash_perms)
        m.update_batch(s.encode() for s in _shingles(_norm(_key_text(e)), k))
        # feedback of a different kind on the same answer is not a duplicate
        if any(
            unique[int(j)]["feedback_type"] == e["feedback_type"] and same_answer(unique[int(j)], e)
            for j in lsh.query(m)
        ):
            report.near += 1
            continue
        lsh.insert(str(i), m)
        kept.append(e)
    return kept, report


def _record(kind: str, events: list[dict], split: str, **fields) -> dict:
    return {
        "source": kind,
        "split": split,
        "conversation_id": events[0]["conversation_id"],
        "event_ids": [e["event_id"] for e in events],
        "user_ids": sorted({e["user_id"] for e in events if e.get("user_id")}),
        "n_turns": events[0]["n_turns"],
        **fields,
    }


def _kto_label(e: dict, params: PrepareParams) -> bool | None:
    """Whether a thumbs or rating event's answer is desirable (True), undesirable (False) or neither (None)."""
    if e["feedback_type"] == "thumbs":
        return {"up": True, "down": False}.get(e.get("thumbs"))
    if e["feedback_type"] == "rating" and e.get("rating") is not None:
        if e["rating"] >= params.kto.desirable_min_rating:
            return True
        if e["rating"] <= params.kto.undesirable_max_rating:
            return False
    return None


def compile_sets(events: list[dict], params: PrepareParams) -> dict[str, list[dict]]:
    """Preference pairs, SFT examples, reward pairs and KTO examples from de-duplicated events."""
    sets: dict[str, list[dict]] = {s: [] for s in SETS}
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for e in events:
        split = split_of(e["conversation_id"], params.split)
        fb = e["feedback_type"]
        if fb == "preference":
            rec = _record("preference", [e], split, prompt=e["prompt"], chosen=e["response"], rejected=e["rejected"])
            sets["pairs"].append(rec)
            sets["reward_pairs"].append(rec)
            for answer, good in ((e["response"], True), (e["rejected"], False)):
                sets["kto"].append(_record("preference", [e], split, prompt=e["prompt"], answer=answer, desirable=good))
        elif fb == "correction":
            sets["sft"].append(_record("correction", [e], split, prompt=e["prompt"], completion=e["correction"]))
        elif fb == "rating" and e["rating"] >= params.sft_min_rating:
            sets["sft"].append(_record("rating", [e], split, prompt=e["prompt"], completion=e["response"]))
        label = _kto_label(e, params)
        if label is not None:
            sets["kto"].append(_record(fb, [e], split, prompt=e["prompt"], answer=e["response"], desirable=label))
        if fb in ("thumbs", "rating"):
            groups[(split, json.dumps(e["prompt"], sort_keys=True))].append(e)
    for (split, _), group in groups.items():
        ups = [e for e in group if e.get("thumbs") == "up"]
        downs = [e for e in group if e.get("thumbs") == "down"]
        for u in ups:
            for d in downs:
                if _norm(u["response"]) != _norm(d["response"]):
                    rec = _record(
                        "thumbs", [u, d], split, prompt=u["prompt"], chosen=u["response"], rejected=d["response"]
                    )
                    sets["pairs"].append(rec)
                    sets["reward_pairs"].append(rec)
        rated = [e for e in group if e.get("rating") is not None]
        for a in rated:
            for b in rated:
                if a["rating"] - b["rating"] >= params.pair_min_rating_gap and _norm(a["response"]) != _norm(
                    b["response"]
                ):
                    sets["reward_pairs"].append(
                        _record(
                            "rating", [a, b], split, prompt=a["prompt"], chosen=a["response"], rejected=b["response"]
                        )
                    )
    return sets


def load_events(raw_store: Path) -> list[dict]:
    """Every stored event as a dict with its prompt decoded, in ingestion order."""
    cols = [
        "event_id",
        "ingested_at",
        "conversation_id",
        "user_id",
        "prompt",
        "n_turns",
        "response",
        "feedback_type",
        "thumbs",
        "rating",
        "rejected",
        "correction",
    ]
    table = rawstore.read_columns(raw_store, cols)
    table = table.take(pc.sort_indices(table, [("ingested_at", "ascending"), ("event_id", "ascending")]))
    rows = table.to_pylist()
    for r in rows:
        r["prompt"] = json.loads(r["prompt"])
    return rows


@dataclass
class PrepareResult:
    sets: dict[str, list[dict]]
    dedup: DedupReport
    metrics: dict = field(default_factory=dict)


def prepare(
    events: list[dict], params: PrepareParams, golden: Golden | None = None, reviews: dict | None = None
) -> PrepareResult:
    """``golden``: the golden set, whose conversations and prompts are held out of every set (counted);
    ``reviews``: human reviews by event id (flywheel/data/review.py), applied before anything is compiled."""
    total = len(events)
    if golden is not None:
        events = [e for e in events if not golden.holds(e)]
    held_golden = total - len(events)
    reviewed = review.apply(events, reviews or {}, params.sft_requires_review)
    events = reviewed.events
    kept, report = deduplicate(events, params)
    sets = compile_sets(kept, params)
    metrics = {
        "events": total,
        "golden_held_out": held_golden,
        "review_rejected": reviewed.rejected,
        "review_revised": reviewed.revised,
        "unreviewed_corrections_held_out": reviewed.unreviewed_held_out,
        "exact_duplicates": report.exact,
        "near_duplicates": report.near,
    }
    for name, records in sets.items():
        for split in SPLITS:
            metrics[f"{name}_{split}"] = sum(1 for r in records if r["split"] == split)
    return PrepareResult(sets, report, metrics)


def write_sets(result: PrepareResult, out_dir: Path) -> None:
    """One JSONL file per set and split: ``<set>-<split>.jsonl``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, records in result.sets.items():
        for split in SPLITS:
            with open(out_dir / f"{name}-{split}.jsonl", "w", encoding="utf-8") as fh:
                for r in records:
                    if r["split"] == split:
                        fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_set(out_dir: Path, name: str, split: str) -> list[dict]:
    path = out_dir / f"{name}-{split}.jsonl"
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def main(
    raw_store: Path, params: PrepareParams, out_dir: Path, metrics_file: Path, golden: Golden | None = None
) -> PrepareResult:
    result = prepare(load_events(raw_store), params, golden, review.load(raw_store))
    write_sets(result, out_dir)
    metrics_file.parent.mkdir(parents=True, exist_ok=True)
    metrics_file.write_text(json.dumps(result.metrics, indent=2))
    return result


def stage(settings: Settings, params: PrepareParams, golden: GoldenParams, *, out: Path, metrics: Path) -> str:
    """De-duplicate the raw store's events and compile the training sets into ``out``, the golden set's
    conversations held out."""
    c = settings.params.contract
    try:
        held_out = load_golden(settings.root / golden.path, golden.format, c.max_text_chars, c.max_turns)
    except GoldenError as exc:
        raise StageFailed(str(exc)) from exc
    result = main(settings.raw_store, params, out, metrics, held_out)
    return "prepare: " + json.dumps(result.metrics)
