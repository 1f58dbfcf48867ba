"""Feedback contract v1: one event per JSON line, checked field by field.

The JSON Schema shipped beside this module (``feedback-v1.schema.json``) is generated from these
models (``flywheel contract schema``) and a test keeps the two equal.
"""

from __future__ import annotations

import json
import re
import typing
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

SCHEMA_PATH = Path(__file__).with_name("feedback-v1.schema.json")
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$")
DEFAULT_MAX_CHARS = 16000
DEFAULT_MAX_TURNS = 64
# C0 and C1 control characters and DEL. PostgreSQL refuses NUL in text (one such id once failed a whole group
# commit), and none of them belongs in an identifier; the same class is written into the JSON Schema.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
IDENTIFIER_PATTERN = r"^[^\u0000-\u001f\u007f-\u009f]*$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _check_text(value: str, info: ValidationInfo) -> str:
    limit = (info.context or {}).get("max_text_chars", DEFAULT_MAX_CHARS)
    if not value.strip():
        raise ValueError("text is empty")
    if len(value) > limit:
        raise ValueError(f"text is {len(value)} characters, over the limit of {limit}")
    return value


def _printable(value: str) -> str:
    """An identifier without control characters; the message names the character, never the value."""
    found = _CONTROL.search(value)
    if found:
        raise ValueError(f"contains a control character (U+{ord(found.group()):04X}); identifiers must be printable")
    return value


def identifier(min_length: int | None = 1, max_length: int = 128):
    """A string identifier type: length-bounded and free of control characters (checked and in the schema)."""
    return Annotated[
        str,
        Field(min_length=min_length, max_length=max_length, json_schema_extra={"pattern": IDENTIFIER_PATTERN}),
        AfterValidator(_printable),
    ]


class Message(_Model):
    role: Literal["system", "user", "assistant"]
    content: str

    _content = field_validator("content")(_check_text)


# The raw-store columns (flywheel/data/rawstore.py SCHEMA) a feedback fills; ingest redacts those holding user text.
FEEDBACK_COLUMNS = ("thumbs", "rating", "rejected", "correction")
FEEDBACK_TEXT_COLUMNS = ("rejected", "correction")


class _Feedback(_Model):
    """A kind of feedback: its fields, the raw-store columns it fills and its polarity (what ingest stores; the
    ``prepare`` step compiles it into training data)."""

    def columns(self) -> dict[str, str | int]:
        """Its values by raw-store column (of ``FEEDBACK_COLUMNS``; the others stay empty)."""
        raise NotImplementedError

    def polarity(self) -> int:
        """1 positive, -1 negative, 0 neither (the batch checks' label balance and negative-feedback rate)."""
        raise NotImplementedError


class Thumbs(_Feedback):
    type: Literal["thumbs"]
    value: Literal["up", "down"]

    def columns(self) -> dict[str, str | int]:
        return {"thumbs": self.value}

    def polarity(self) -> int:
        return 1 if self.value == "up" else -1


class Rating(_Feedback):
    type: Literal["rating"]
    value: int = Field(ge=1, le=5)

    def columns(self) -> dict[str, str | int]:
        return {"rating": self.value}

    def polarity(self) -> int:
        return 1 if self.value >= 4 else (-1 if self.value <= 2 else 0)


class Preference(_Feedback):
    """``response`` was preferred over ``rejected``."""

    type: Literal["preference"]
    rejected: str

    _rejected = field_validator("rejected")(_check_text)

    def columns(self) -> dict[str, str | int]:
        return {"rejected": self.rejected}

    def polarity(self) -> int:
        return 0


class Correction(_Feedback):
    type: Literal["correction"]
    text: str

    _text = field_validator("text")(_check_text)

    def columns(self) -> dict[str, str | int]:
        return {"correction": self.text}

    def polarity(self) -> int:
        return -1


# every kind of feedback; a new one is a class above and an entry here (README "Extending Flywheel")
FEEDBACK_MODELS = (Thumbs, Rating, Preference, Correction)
FEEDBACK_TYPES = tuple(typing.get_args(m.model_fields["type"].annotation)[0] for m in FEEDBACK_MODELS)
Feedback = Annotated[Union[FEEDBACK_MODELS], Field(discriminator="type")]  # noqa: UP007 (a union of the tuple)


class FeedbackEvent(_Model):
    """One piece of user feedback on one assistant answer."""

    schema_version: Literal[1] = 1
    event_id: identifier()
    timestamp: str = Field(description="RFC 3339, e.g. 2026-11-27T10:00:00Z")
    conversation_id: identifier()
    model_version: identifier()
    prompt: list[Message] = Field(min_length=1)
    response: str
    user_id: identifier(min_length=None) | None = None
    feedback: Feedback

    _response = field_validator("response")(_check_text)

    @field_validator("timestamp")
    @classmethod
    def _rfc3339(cls, value: str) -> str:
        if not _RFC3339.match(value):
            raise ValueError("not an RFC 3339 timestamp (e.g. 2026-11-27T10:00:00Z)")
        try:
            datetime.fromisoformat(value.replace("z", "Z"))
        except ValueError as exc:
            reason = str(exc) if value not in str(exc) else "out of range"  # never echo the input
            raise ValueError(f"not a valid date and time: {reason}") from None
        return value

    @field_validator("prompt")
    @classmethod
    def _turns(cls, value: list[Message], info: ValidationInfo) -> list[Message]:
        limit = (info.context or {}).get("max_turns", DEFAULT_MAX_TURNS)
        if len(value) > limit:
            raise ValueError(f"{len(value)} turns, over the limit of {limit}")
        if not any(m.role == "user" for m in value):
            raise ValueError("the prompt has no user turn")
        return value

    @model_validator(mode="after")
    def _two_answers(self) -> FeedbackEvent:
        if isinstance(self.feedback, Preference) and self.feedback.rejected == self.response:
            raise ValueError("feedback.rejected equals response; a preference needs two different answers")
        return self


class ContractError(ValueError):
    """A line that breaks the contract; ``reason`` names the field and the problem."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def format_errors(err: ValidationError) -> str:
    """Field-level errors on one line: ``feedback.value: Input should be 'up' or 'down'; ...``."""
    parts = []
    for e in err.errors(include_url=False):
        loc = ".".join(str(p) for p in e["loc"]) or "event"
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def parse_event(
    line: str | bytes, max_text_chars: int = DEFAULT_MAX_CHARS, max_turns: int = DEFAULT_MAX_TURNS
) -> FeedbackEvent:
    """Parse one JSON line into an event, or raise ``ContractError`` naming what is wrong."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ContractError(f"not valid UTF-8 (byte {exc.start})") from None
    context = {"max_text_chars": max_text_chars, "max_turns": max_turns}
    try:
        return FeedbackEvent.model_validate_json(line, context=context)
    except ValidationError as exc:
        if exc.errors() and exc.errors()[0]["type"] == "json_invalid":
            raise ContractError(f"invalid JSON: {exc.errors()[0]['ctx'].get('error', '')}") from None
        if exc.errors() and exc.errors()[0]["type"] in ("model_type", "model_attributes_type"):
            raise ContractError("a line must be a JSON object") from None
        raise ContractError(format_errors(exc)) from None


def json_schema() -> dict:
    """The contract as a JSON Schema (draft 2020-12)."""
    schema = FeedbackEvent.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://flywheel.dev/schemas/feedback-v1.json"
    schema["title"] = "Flywheel feedback event, contract v1"
    return schema


def write_schema(path: Path = SCHEMA_PATH) -> Path:
    path.write_text(json.dumps(json_schema(), indent=2, sort_keys=True) + "\n")
    return path
