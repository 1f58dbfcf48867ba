"""One feedback line as a raw-store row: reading JSONL(.gz) files, HH-RLHF dialogues as preference events, and the
redacted row every accepted event becomes. Shared by ingest, the service and the golden set; no Great
Expectations, no worker pool here (those are ingest's)."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from flywheel.contract import FEEDBACK_COLUMNS, FEEDBACK_TEXT_COLUMNS, ContractError, parse_event
from flywheel.data.sources import langfuse_to_event, mlflow_to_event, openai_to_event
from flywheel.redact import pseudonymise_id, redact

# line formats; mlflow-trace and langfuse-score are what `ingest --from mlflow` and `--format langfuse` write
FORMATS = ("native", "hh-rlhf", "openai-log", "mlflow-trace", "langfuse-score")
_TURN = re.compile(r"\n\n(Human|Assistant): ?")
_PROMPT_JSON = json.JSONEncoder(ensure_ascii=False)  # json.dumps(..., ensure_ascii=False), built once


class IngestError(RuntimeError):
    """The input as a whole cannot be ingested (unreadable, wrong format, empty)."""


def read_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, raw bytes) of a JSONL or JSONL.gz file; blank lines are skipped."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(2)
    except OSError as exc:
        raise IngestError(f"cannot read {path}: {exc.strerror or exc}") from None
    opener = gzip.open if magic == b"\x1f\x8b" else open
    try:
        with opener(path, "rb") as fh:
            for n, line in enumerate(fh, 1):
                line = line.rstrip(b"\r\n")
                if line.strip():
                    yield n, line
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise IngestError(f"cannot read {path}: {exc}") from None


def split_dialogue(text: str) -> list[dict]:
    """``\\n\\nHuman: … \\n\\nAssistant: …`` into [{role, content}]; the text before the first turn is dropped."""
    parts = _TURN.split(text)
    turns = []
    for i in range(1, len(parts) - 1, 2):
        turns.append({"role": "user" if parts[i] == "Human" else "assistant", "content": parts[i + 1].strip()})
    return turns


def hh_to_event(line: bytes, ingested_at: str) -> dict:
    """An HH-RLHF ``{"chosen", "rejected"}`` row as a preference event (``response`` preferred)."""
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ContractError(f"invalid JSON: {exc}") from None
    if not isinstance(row, dict) or not isinstance(row.get("chosen"), str) or not isinstance(row.get("rejected"), str):
        raise ContractError("hh-rlhf line needs string fields 'chosen' and 'rejected'")
    chosen, rejected = split_dialogue(row["chosen"]), split_dialogue(row["rejected"])
    if len(chosen) < 2 or chosen[-1]["role"] != "assistant" or rejected[-1:] and rejected[-1]["role"] != "assistant":
        raise ContractError("hh-rlhf dialogue does not end with an assistant turn")
    if chosen[:-1] != rejected[:-1]:
        raise ContractError("hh-rlhf chosen and rejected do not share the dialogue before the last answer")
    prompt = chosen[:-1]
    digest = hashlib.sha256(line).hexdigest()
    conv = hashlib.sha256(json.dumps(prompt, sort_keys=True).encode()).hexdigest()
    return {
        "event_id": f"hh-{digest[:32]}",
        "timestamp": ingested_at,
        "conversation_id": f"hh-{conv[:24]}",
        "model_version": "hh-rlhf",
        "prompt": prompt,
        "response": chosen[-1]["content"],
        "feedback": {"type": "preference", "rejected": rejected[-1]["content"]},
    }


def event_row(event, found: Counter) -> dict:
    """A contract event as a raw-store row, personal data redacted (kinds tallied in ``found``); every column
    of ``rawstore.SCHEMA`` but the batch's own ``ingested_at`` and ``batch_id``. The service stores the same rows.
    Ids holding personal data (an e-mail as user id) are pseudonymised: ``flywheel.redact.pseudonymise_id``."""
    fb = event.feedback
    prompt = [{"role": m.role, "content": redact(m.content, found)} for m in event.prompt]
    response = redact(event.response, found)
    return {
        "event_id": pseudonymise_id(event.event_id, found),
        "schema_version": event.schema_version,
        "timestamp": event.timestamp,
        "conversation_id": pseudonymise_id(event.conversation_id, found),
        "model_version": event.model_version,
        "user_id": pseudonymise_id(event.user_id, found),
        "prompt": _PROMPT_JSON.encode(prompt),
        "n_turns": len(prompt),
        "response": response,
        "response_chars": len(response),
        "feedback_type": fb.type,
        **{
            col: redact(value, found) if col in FEEDBACK_TEXT_COLUMNS and value is not None else value
            for col, value in (dict.fromkeys(FEEDBACK_COLUMNS) | fb.columns()).items()
        },
        "polarity": fb.polarity(),
        "pii_found": sum(found.values()),
    }


# a format's line -> a contract event dict; native lines are contract events already. mlflow-trace and
# langfuse-score are the lines `ingest --from mlflow` and `--format langfuse` write
_CONVERTERS = {
    "hh-rlhf": hh_to_event,
    "openai-log": lambda raw, _at: openai_to_event(raw),
    "mlflow-trace": lambda raw, _at: mlflow_to_event(raw),
    "langfuse-score": lambda raw, _at: langfuse_to_event(raw),
}


def parse_line(raw: bytes, fmt: str, ingested_at: str, max_chars: int, max_turns: int):
    """One line of a ``native`` (contract events), ``hh-rlhf`` or ``openai-log`` file as a checked contract event;
    ContractError names what is wrong. Ingest, eval-reward/eval-policy and the golden set read lines through it."""
    convert = _CONVERTERS.get(fmt)
    line = json.dumps(convert(raw, ingested_at)) if convert else raw
    return parse_event(line, max_chars, max_turns)
