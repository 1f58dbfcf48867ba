"""``POST /v1/feedback`` and ``/v1/feedback/batch``: contract v1 checked and redacted exactly as ``flywheel ingest``
does it (same model, same limits, same row building), committed before the answer (group commit).
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter

import orjson
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import Response
from pydantic import ValidationError

from flywheel.data.events import event_row
from service.auth import Principal
from service.guard import ERRORS, Invalid, invalid_from, require, too_many
from service.schemas import BatchAck, FeedbackAck, FeedbackBatch, FeedbackIn  # noqa: F401 (OpenAPI models)
from service.store import utcnow

router = APIRouter(tags=["feedback"])


def _body(ref: str) -> dict:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
        }
    }


def _parse(model, body: bytes, svc):
    try:
        return model.model_validate_json(
            body, context={"max_text_chars": svc.config.max_text_chars, "max_turns": svc.config.max_turns}
        )
    except ValidationError as exc:
        raise invalid_from(exc) from None


async def _check_answers(svc, events: list[FeedbackIn], prefix: list) -> None:
    """An event that names an answer must carry the model version that produced it."""
    named = [(i, e) for i, e in enumerate(events) if e.answer_id]
    if not named:
        return
    known = await asyncio.to_thread(svc.store.answer_versions, [e.answer_id for _, e in named])
    errors = []
    for i, e in named:
        loc = [*prefix, i] if prefix[-1] == "events" else prefix
        if e.answer_id not in known:
            errors.append({"loc": [*loc, "answer_id"], "msg": "no answer with this id", "type": "value_error"})
        elif known[e.answer_id] != e.model_version:  # name the stored version, never echo the input
            errors.append(
                {
                    "loc": [*loc, "model_version"],
                    "type": "value_error",
                    "msg": f"the answer was given by model version {known[e.answer_id]}, not this one",
                }
            )
    if errors:
        raise Invalid(errors)


def _record(event: FeedbackIn, received_at: str) -> tuple[dict, int, dict]:
    """(the feedback-store record, how much personal data was redacted, the raw-store row it holds)"""
    found: Counter = Counter()
    row = event_row(event, found)  # ids holding personal data come back pseudonymised: store those
    return (
        {
            "event_id": row["event_id"],
            "received_at": received_at,
            "answer_id": event.answer_id,
            "model_version": event.model_version,
            "feedback_type": event.feedback.type,
            "user_id": row["user_id"],
            "row": orjson.dumps(row).decode(),
        },
        row["pii_found"],
        row,
    )


async def _store(svc, events: list[FeedbackIn]) -> list[dict]:
    """Commit the events; one acknowledgement (a FeedbackAck as a dict) per event, in order."""
    received_at = utcnow()
    records = [_record(e, received_at) for e in events]
    try:
        flags = await svc.writer.write([r for r, _, _ in records])
    except Exception as exc:  # the database failed: nothing is acknowledged, the client may retry
        svc.log.error("feedback store write failed: %s", type(exc).__name__)
        raise HTTPException(503, "the feedback store is unavailable; retry later") from None
    acks, tally = [], Counter()
    known = svc.models.known_versions
    for e, (_, pii, row), new in zip(events, records, flags):
        status = "stored" if new else "duplicate"
        if new and e.answer_id and svc.tracer is not None:  # shown on the answer's MLflow trace
            svc.tracer.feedback(e.answer_id, row)
        tally[e.feedback.type, e.model_version if e.model_version in known else "other", status] += 1
        acks.append({"event_id": e.event_id, "status": status, "pii_redacted": pii})
    for (kind, version, status), n in tally.items():
        svc.metrics.inc("flywheel_feedback_events_total", n, type=kind, model_version=version, outcome=status)
    return acks


def _charge_events(svc, principal: Principal, events: int) -> None:
    """The feedback rate limit counts events, not requests: ``require`` took one token for the request, the
    batch's other events are taken here, all or none (429 with Retry-After when the bucket holds fewer)."""
    rate = svc.params.feedback_rate
    if events > rate.burst:
        raise HTTPException(
            429,
            f"a batch of {events} events is over this token's burst of {rate.burst} events "
            f"(feedback_rate); send at most {rate.burst} a batch",
            headers={"Retry-After": str(max(1, math.ceil(rate.burst / rate.per_s)))},
        )
    wait = svc.limiter.take(principal.token_id, "feedback", rate, cost=events - 1) if events > 1 else 0.0
    if wait > 0:
        raise too_many(rate, wait, "events")


def _json(payload: dict) -> Response:
    return Response(orjson.dumps(payload), media_type="application/json")


@router.post(
    "/v1/feedback",
    response_model=FeedbackAck,
    responses=ERRORS,
    openapi_extra=_body("FeedbackIn"),
    summary="Store one feedback event (idempotent on event_id)",
)
async def post_feedback(request: Request, _=Depends(require("feedback"))):
    svc = request.app.state.svc
    event = _parse(FeedbackIn, await request.body(), svc)
    await _check_answers(svc, [event], ["body"])
    (ack,) = await _store(svc, [event])
    return _json(ack)  # built from validated input: skip FastAPI's second validation pass


@router.post(
    "/v1/feedback/batch",
    response_model=BatchAck,
    responses=ERRORS,
    openapi_extra=_body("FeedbackBatch"),
    summary="Store many feedback events at once: all are valid and stored, or none",
)
async def post_feedback_batch(request: Request, principal: Principal = Depends(require("feedback"))):
    svc = request.app.state.svc
    batch = _parse(FeedbackBatch, await request.body(), svc)
    limit = svc.params.max_batch_events
    if len(batch.events) > limit:
        raise Invalid(
            [
                {
                    "loc": ["body", "events"],
                    "type": "too_long",
                    "msg": f"{len(batch.events)} events, over the limit of {limit} a batch",
                }
            ]
        )
    _charge_events(svc, principal, len(batch.events))
    await _check_answers(svc, list(batch.events), ["body", "events"])
    acks = await _store(svc, list(batch.events))
    stored = sum(a["status"] == "stored" for a in acks)
    return _json({"stored": stored, "duplicates": len(acks) - stored, "events": acks})
