"""Human review of the riskiest feedback (corrections and low ratings) through Label Studio.

``flywheel review export`` writes the events not yet reviewed as Label Studio tasks (JSON import format) and the
labeling interface to create the project with; ``flywheel review import`` reads a Label Studio JSON export back:
per task a verdict (approve or reject), optionally a revised correction, and who reviewed it. Reviews live in the
raw store (``reviews/reviews.jsonl``), so DVC versions them with the events, a remote sync carries them and an
erase removes them with the events they judge. ``prepare`` applies them (pipelines/prepare.py).

Label Studio rather than Argilla: it is maintained (HumanSignal, Apache-2.0), runs on a laptop with
``pip install label-studio``, and its import and export are plain, documented JSON files, so Flywheel needs
neither a server nor a client library to exchange work with it.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.compute as pc

from flywheel.data import rawstore
from flywheel.redact import pseudonymise_id, redact

REVIEWS = Path("reviews") / "reviews.jsonl"  # inside the raw store
VERDICTS = ("approve", "reject")
LABEL_CONFIG = """<View>
  <Header value="Conversation"/>
  <Text name="prompt" value="$prompt"/>
  <Header value="The model's answer"/>
  <Text name="response" value="$response"/>
  <Header value="The user's feedback"/>
  <Text name="feedback" value="$feedback"/>
  <Choices name="verdict" toName="feedback" choice="single" required="true">
    <Choice value="approve" hint="the feedback is right: train on it"/>
    <Choice value="reject" hint="the feedback is wrong, abusive or off-topic: never train on it"/>
  </Choices>
  <Header value="Revised correction (optional: replaces the user's text)"/>
  <TextArea name="revised" toName="feedback" maxSubmissions="1" editable="true"/>
</View>
"""


class ReviewError(ValueError):
    """A review file that cannot be read at all (not JSON, not a list of tasks)."""


@dataclass
class ImportResult:
    reviews: list[dict] = field(default_factory=list)
    unreviewed: int = 0  # tasks with no (or only cancelled) annotations
    refused: list[str] = field(default_factory=list)  # "task N: why"


def path(raw_store: Path) -> Path:
    return raw_store / REVIEWS


def load(raw_store: Path) -> dict[str, dict]:
    """The latest review of each event id."""
    p = path(raw_store)
    if not p.is_file():
        return {}
    reviews: dict[str, dict] = {}
    for line in p.read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            reviews[r["event_id"]] = r
    return reviews


def _write(raw_store: Path, reviews: dict[str, dict]) -> None:
    """Replace the reviews file atomically (written beside, flushed, renamed)."""
    p = path(raw_store)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in reviews.values():
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)


def candidates(raw_store: Path, max_rating: int, limit: int) -> list[dict]:
    """Corrections and ratings <= ``max_rating`` with no review yet, oldest first, at most ``limit``."""
    cols = ["event_id", "ingested_at", "prompt", "response", "feedback_type", "rating", "correction"]
    table = rawstore.read_columns(raw_store, cols)
    wanted = pc.or_kleene(
        pc.equal(table["feedback_type"], "correction"),
        pc.and_kleene(pc.equal(table["feedback_type"], "rating"), pc.less_equal(table["rating"], max_rating)),
    )
    table = table.filter(pc.fill_null(wanted, False))
    table = table.take(pc.sort_indices(table, [("ingested_at", "ascending"), ("event_id", "ascending")]))
    done = load(raw_store)
    return [r for r in table.to_pylist() if r["event_id"] not in done][:limit]


def _conversation(prompt_json: str) -> str:
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in json.loads(prompt_json))


def tasks(events: list[dict]) -> list[dict]:
    """Label Studio tasks (JSON import format) for ``events`` (raw-store rows, already redacted)."""
    out = []
    for e in events:
        if e["feedback_type"] == "correction":
            feedback = f"correction: {e['correction']}"
        else:
            feedback = f"rating: {e['rating']} of 5"
        out.append(
            {
                "data": {
                    "event_id": e["event_id"],
                    "feedback_type": e["feedback_type"],
                    "prompt": _conversation(e["prompt"]),
                    "response": e["response"],
                    "feedback": feedback,
                }
            }
        )
    return out


def _reviewer(annotation: dict) -> str | None:
    who = annotation.get("completed_by")
    if isinstance(who, dict):
        who = who.get("email") or who.get("username") or who.get("id")
    if who is None or isinstance(who, bool) or (isinstance(who, str) and not who.strip()):
        return None
    return pseudonymise_id(str(who).strip(), Counter())  # an e-mail address is personal data: pseudonymised


def _results(annotation: dict) -> tuple[str | None, str | None]:
    verdict = revised = None
    for item in annotation.get("result") or []:
        if not isinstance(item, dict):
            continue
        value = item.get("value") or {}
        if item.get("from_name") == "verdict":
            choices = value.get("choices") or []
            verdict = choices[0] if len(choices) == 1 else "?"
        elif item.get("from_name") == "revised":
            text = value.get("text") or []
            text = "\n".join(t for t in text if isinstance(t, str)) if isinstance(text, list) else text
            revised = text.strip() if isinstance(text, str) and text.strip() else None
    return verdict, revised


def parse_export(raw: bytes, known: dict[str, str], max_chars: int) -> ImportResult:
    """A Label Studio JSON export as reviews. ``known``: event id -> feedback type of the stored events. Per task
    the newest annotation that was not cancelled counts; a task that cannot be taken is refused with why."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReviewError(f"not a Label Studio JSON export: {exc}") from None
    if not isinstance(data, list):
        raise ReviewError("not a Label Studio JSON export: expected a list of tasks")
    result = ImportResult()
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    for i, task in enumerate(data):
        where = f"task {i + 1}"
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            result.refused.append(f"{where}: not a task object with 'data'")
            continue
        event_id = task["data"].get("event_id")
        where += f" ({event_id})" if isinstance(event_id, str) else ""
        if not isinstance(event_id, str) or event_id not in known:
            result.refused.append(f"{where}: no stored event with this event_id (erased, or not exported by Flywheel)")
            continue
        annotations = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
        if not annotations:
            result.unreviewed += 1
            continue
        latest = max(annotations, key=lambda a: str(a.get("updated_at") or a.get("created_at") or ""))
        verdict, revised = _results(latest)
        reviewer = _reviewer(latest)
        if verdict not in VERDICTS:
            result.refused.append(f"{where}: the verdict must be one of {', '.join(VERDICTS)}")
        elif reviewer is None:
            result.refused.append(f"{where}: no reviewer (the annotation's completed_by is empty)")
        elif revised is not None and known[event_id] != "correction":
            result.refused.append(f"{where}: a revised text is only for corrections, this is a {known[event_id]}")
        elif revised is not None and len(revised) > max_chars:
            result.refused.append(f"{where}: the revised text is {len(revised)} characters, over {max_chars}")
        else:
            result.reviews.append(
                {
                    "event_id": event_id,
                    "verdict": verdict,
                    "revised": redact(revised) if revised is not None else None,
                    "reviewer": reviewer,
                    "reviewed_at": str(latest.get("updated_at") or latest.get("created_at") or now),
                    "imported_at": now,
                }
            )
    return result


def store(raw_store: Path, reviews: list[dict]) -> int:
    """Add ``reviews`` (a later review of an event replaces the earlier one); how many events they cover."""
    merged = load(raw_store)
    for r in reviews:
        merged[r["event_id"]] = r
    if reviews:
        _write(raw_store, merged)
    return len({r["event_id"] for r in reviews})


def erase(raw_store: Path, event_ids: set[str], reviewer_forms: frozenset[str]) -> int:
    """Drop the reviews of ``event_ids`` (a user's erased events); a review *made by* the erased person keeps its
    verdict with the reviewer replaced by ``[erased]``. How many reviews were changed."""
    reviews = load(raw_store)
    changed = 0
    for event_id in list(reviews):
        if event_id in event_ids:
            del reviews[event_id]
            changed += 1
        elif reviews[event_id].get("reviewer") in reviewer_forms:
            reviews[event_id]["reviewer"] = "[erased]"
            changed += 1
    if changed:
        _write(raw_store, reviews)
    return changed


@dataclass
class Applied:
    events: list[dict]
    rejected: int = 0  # events a reviewer rejected: in no set
    revised: int = 0  # corrections whose text a reviewer replaced
    unreviewed_held_out: int = 0  # corrections kept out of SFT until reviewed (prepare.sft_requires_review)


def apply(events: list[dict], reviews: dict[str, dict], require_for_sft: bool) -> Applied:
    """The events ``prepare`` compiles, after review: rejected ones dropped, revised corrections replaced, and with
    ``require_for_sft`` the corrections nobody approved yet left out (counted)."""
    out = Applied([])
    for e in events:
        r = reviews.get(e["event_id"])
        if r is not None and r["verdict"] == "reject":
            out.rejected += 1
            continue
        if e["feedback_type"] == "correction":
            if r is None and require_for_sft:
                out.unreviewed_held_out += 1
                continue
            if r is not None and r.get("revised"):
                e = {**e, "correction": r["revised"]}
                out.revised += 1
        out.events.append(e)
    return out
