"""The golden set: a fixed, versioned evaluation file (params.yaml ``golden``) whose conversations never enter
training, whatever the window. Evaluation scores champion and challenger on it beside the rolling test split, so
scores are comparable from turn to turn (the test split grows and changes with the data).

Its pairs are read as ingest stores them (the contract's checks, personal data redacted, ids pseudonymised), so
the keys that keep them out of training are the ones the raw store holds: a stored event is held out when its
conversation id is a golden conversation's, or its prompt (the dialogue before the answer) is a golden prompt.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from flywheel.contract import ContractError
from flywheel.data.events import IngestError, event_row, parse_line, read_lines


class GoldenError(RuntimeError):
    pass


def prompt_key(prompt: list[dict]) -> str:
    return json.dumps([{"role": m["role"], "content": m["content"]} for m in prompt], sort_keys=True)


@dataclass(frozen=True)
class Golden:
    pairs: list[dict]  # prompt, chosen, rejected, conversation_id: as the raw store would hold them
    conversations: frozenset[str]
    prompts: frozenset[str]

    def holds(self, event: dict) -> bool:
        """Whether a stored event (``prepare.load_events``' row) belongs to the golden set."""
        return event["conversation_id"] in self.conversations or prompt_key(event["prompt"]) in self.prompts


def load_golden(path: Path | str, fmt: str, max_text_chars: int, max_turns: int) -> Golden:
    """The golden file's preference pairs; a line that is not one is an error (the set is curated: nothing in it
    may be skipped silently)."""
    path = Path(path)
    if not path.is_file():
        raise GoldenError(f"golden set {path}: no such file (params.yaml golden.path)")
    if fmt not in ("native", "hh-rlhf"):
        raise GoldenError(f"golden set: unknown format {fmt!r}; expected native or hh-rlhf")
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    pairs = []
    try:
        for n, raw in read_lines(path):
            try:
                event = parse_line(raw, fmt, now, max_text_chars, max_turns)
            except ContractError as exc:
                raise GoldenError(f"golden set {path} line {n}: {exc.reason}") from None
            if event.feedback.type != "preference":
                raise GoldenError(f"golden set {path} line {n}: a {event.feedback.type} event, not a preference pair")
            row = event_row(event, Counter())
            pairs.append(
                {
                    "prompt": json.loads(row["prompt"]),
                    "chosen": row["response"],
                    "rejected": row["rejected"],
                    "conversation_id": row["conversation_id"],
                }
            )
    except IngestError as exc:
        raise GoldenError(f"golden set: {exc}") from None
    if not pairs:
        raise GoldenError(f"golden set {path} holds no pairs")
    return Golden(
        pairs,
        frozenset(p["conversation_id"] for p in pairs),
        frozenset(prompt_key(p["prompt"]) for p in pairs),
    )
