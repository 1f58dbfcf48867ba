"""Request and response bodies of the HTTP API (they make the OpenAPI spec)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from flywheel.contract import _RFC3339, FeedbackEvent, identifier

# ---- chat (OpenAI-compatible shape) -------------------------------------------------------------------


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    """Fields OpenAI clients send and this service does not use (``presence_penalty``, ...) are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = Field(None, description="ignored: the champion (or the challenger of a split) answers")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="newer name of max_tokens")
    temperature: float = Field(1.0, ge=0, le=2, description="0 is greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stream: bool = False
    best_of: int | None = Field(None, ge=1, description="candidates reranked by the champion reward model")
    user: str | None = Field(None, max_length=128, description="pseudonymous; keeps a user on one side of a split")


class ChatAnswerMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatAnswerMessage
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatResponse(BaseModel):
    id: str = Field(description="the answer id that feedback events refer to (answer_id)")
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    model_version: str
    variant: Literal["champion", "challenger"]
    choices: list[ChatChoice]
    usage: Usage


# ---- feedback (contract v1) ---------------------------------------------------------------------------


class FeedbackIn(FeedbackEvent):
    """A contract-v1 event, optionally naming the answer (``id`` of a chat completion) it rates."""

    answer_id: identifier() | None = None


EXAMPLE_EVENT = {
    "event_id": "evt-000001",
    "timestamp": "2026-11-27T10:00:00Z",
    "conversation_id": "conv-42",
    "model_version": "flywheel-policy/3",
    "answer_id": "chatcmpl-5f0c4b2e9d0a4c7e8f1a2b3c4d5e6f70",
    "prompt": [{"role": "user", "content": "How often should I water a fern?"}],
    "response": "When the top of the soil feels dry.",
    "user_id": "u-1873",
    "feedback": {"type": "thumbs", "value": "up"},
}


class FeedbackBatch(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    events: list[FeedbackIn] = Field(min_length=1)


class FeedbackAck(BaseModel):
    event_id: str
    status: Literal["stored", "duplicate"]
    pii_redacted: int = Field(description="personal-data spans replaced before storing")


class BatchAck(BaseModel):
    stored: int
    duplicates: int
    events: list[FeedbackAck]


class ErrorItem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationErrors(BaseModel):
    detail: list[ErrorItem]


class Problem(BaseModel):
    detail: str


def body_schemas(max_text_chars: int, max_turns: int, max_batch_events: int) -> dict:
    """JSON Schemas of the bodies the feedback routes parse themselves, as OpenAPI components, with the checks
    the contract makes in code (RFC 3339 timestamps, non-blank texts, the limits) written into them."""
    _, top = models_json_schema(
        [(FeedbackIn, "validation"), (FeedbackBatch, "validation")], ref_template="#/components/schemas/{model}"
    )
    defs = top["$defs"]
    text = {"type": "string", "pattern": r"\S", "maxLength": max_text_chars}
    event = defs["FeedbackIn"]["properties"]
    event["timestamp"]["pattern"] = _RFC3339.pattern
    event["response"].update(text)
    event["prompt"]["maxItems"] = max_turns
    defs["Message"]["properties"]["content"].update(text)
    defs["Preference"]["properties"]["rejected"].update(text)
    defs["Correction"]["properties"]["text"].update(text)
    defs["FeedbackBatch"]["properties"]["events"]["maxItems"] = max_batch_events
    defs["FeedbackIn"]["examples"] = [EXAMPLE_EVENT]
    return defs
