"""``POST /v1/chat/completions``: OpenAI-compatible, answered by the champion (or, for a share of traffic, the
challenger) through the batching queue; every answer carries its id and model version.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
import uuid

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse

from service.batching import Job, Overloaded
from service.guard import ERRORS, Invalid, require
from service.schemas import ChatRequest, ChatResponse
from service.store import utcnow

router = APIRouter(tags=["chat"])
_STREAM = {
    "description": "with `stream: true`: server-sent events, `chat.completion.chunk` objects, then `[DONE]`",
    "content": {"text/event-stream": {"schema": {"type": "string"}}},
}


def _limits(req: ChatRequest, svc) -> tuple[int, int]:
    """(max_tokens, best_of) after the service's limits; a request past one is a 422 naming the field."""
    p, errors = svc.params, []
    if len(req.messages) > p.max_messages:
        errors.append((["messages"], f"{len(req.messages)} messages, over the limit of {p.max_messages}"))
    for i, m in enumerate(req.messages):
        if len(m.content) > p.max_message_chars:
            errors.append(
                (
                    ["messages", i, "content"],
                    f"text is {len(m.content)} characters, over the limit of {p.max_message_chars}",
                )
            )
    field = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
    max_tokens = req.max_completion_tokens or req.max_tokens or p.default_max_tokens
    if max_tokens > p.max_new_tokens:
        errors.append(([field], f"over the limit of {p.max_new_tokens}"))  # the value itself is never echoed
    best_of = req.best_of or p.best_of_n
    if best_of > p.max_best_of:
        errors.append((["best_of"], f"over the limit of {p.max_best_of}"))
    if errors:
        raise Invalid([{"loc": ["body", *loc], "msg": msg, "type": "value_error"} for loc, msg in errors])
    if svc.models.slots.get("reward") is None:
        best_of = 1  # nothing to rerank with
    return max_tokens, best_of


def _variant(svc, user: str | None) -> str:
    fraction = svc.params.challenger_fraction
    if fraction <= 0 or svc.models.slots.get("challenger") is None:
        return "champion"
    # a user stays on one side of the split; anonymous requests are split at random
    draw = (int.from_bytes(hashlib.sha256(user.encode()).digest()[:8], "big") / 2**64) if user else random.random()
    return "challenger" if draw < fraction else "champion"


def _chunk(answer_id: str, created: int, version: str, variant: str, delta: dict, finish: str | None) -> str:
    body = {
        "id": answer_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": version,
        "model_version": version,
        "variant": variant,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


@router.post(
    "/v1/chat/completions",
    response_model=ChatResponse,
    summary="Answer a conversation",
    responses={**ERRORS, 200: _STREAM},
)
async def chat_completions(req: ChatRequest, request: Request, _=Depends(require("chat"))):
    svc, start_ns = request.app.state.svc, time.time_ns()
    max_tokens, best_of = _limits(req, svc)
    if not svc.models.ready:
        raise HTTPException(503, "no model is loaded yet", headers={"Retry-After": "5"})
    variant = _variant(svc, req.user)
    messages = [m.model_dump() for m in req.messages]
    job = Job(messages, max_tokens, req.temperature, req.top_p, best_of, req.stream)
    try:
        svc.batchers[variant].submit(job)
    except Overloaded:
        raise HTTPException(503, "too many requests waiting; retry later", headers={"Retry-After": "1"}) from None
    answer_id, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())
    version = await job.started
    await svc.writer.write(
        [], [{"answer_id": answer_id, "model_version": version, "variant": variant, "created_at": utcnow()}]
    )
    headers = {"X-Model-Version": version, "X-Model-Variant": variant, "X-Answer-Id": answer_id}
    trace = _tracer(svc, answer_id, messages, variant, req.user, start_ns)
    if req.stream:
        return StreamingResponse(
            _events(svc, job, answer_id, created, version, variant, trace),
            media_type="text/event-stream",
            headers=headers,
        )
    answer = await job.result
    _count(svc, answer, variant)
    trace(answer)
    body = ChatResponse(
        id=answer_id,
        created=created,
        model=version,
        model_version=version,
        variant=variant,
        choices=[{"message": {"content": answer.text}, "finish_reason": answer.finish_reason}],
        usage={
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.prompt_tokens + answer.completion_tokens,
        },
    )
    return JSONResponse(body.model_dump(), headers=headers)


def _tracer(svc, answer_id: str, messages: list[dict], variant: str, user: str | None, start_ns: int):
    """What to call with the finished answer: queue its MLflow trace (a no-op with tracing off)."""
    if svc.tracer is None:
        return lambda _answer: None
    from service.tracing import answer_record

    return lambda answer: svc.tracer.answer(answer_record(answer_id, messages, answer, variant, user, start_ns))


def _count(svc, answer, variant: str) -> None:
    svc.metrics.inc("flywheel_answers_total", model_version=answer.model_version, variant=variant)
    svc.metrics.inc(
        "flywheel_generated_tokens_total",
        answer.completion_tokens * answer.candidates,
        model_version=answer.model_version,
    )


async def _events(svc, job: Job, answer_id: str, created: int, version: str, variant: str, trace):
    yield _chunk(answer_id, created, version, variant, {"role": "assistant", "content": ""}, None)
    while (piece := await job.deltas.get()) is not None:
        yield _chunk(answer_id, created, version, variant, {"content": piece}, None)
    try:
        answer = await job.result
    except Exception:  # the generate call failed after the stream began: say so in-band
        yield 'data: {"error": {"message": "generation failed", "type": "server_error"}}\n\n'
        return
    _count(svc, answer, variant)
    trace(answer)
    yield _chunk(answer_id, created, version, variant, {}, answer.finish_reason)
    yield "data: [DONE]\n\n"
