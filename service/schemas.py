"""Request and response bodies of the HTTP API (they make the OpenAPI spec)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from flywheel.contract import FeedbackEvent

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

    answer_id: str | None = Field(None, min_length=1, max_length=128)


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


def body_schemas() -> dict:
    """JSON Schemas of the bodies the feedback routes parse themselves, as OpenAPI components."""
    _, top = models_json_schema([(FeedbackIn, "validation"), (FeedbackBatch, "validation")],
                                ref_template="#/components/schemas/{model}")
    return top["$defs"]
