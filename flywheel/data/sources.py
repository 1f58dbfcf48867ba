"""Feedback logged elsewhere as contract-v1 events: OpenAI-style chat-completion logs with a feedback field (one
line, one event) and MLflow traces with human assessments. Each mapping either builds the event or raises
``ContractError`` naming why it cannot (the line is then quarantined with that reason, never dropped). The
mapping tables are in the README ("Feedback from where it is already logged")."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from flywheel.contract import ContractError
from flywheel.tracing_store import EVENT_KEY

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
THUMBS = {"up": "up", "down": "down", "+1": "up", "-1": "down", "1": "up"}
KINDS = ("thumbs", "rating", "correction", "rejected")  # the feedback field's keys, one per record


def _text(content, where: str) -> str:
    """A message's content: a string, or OpenAI's list of parts of which the ``text`` ones are kept."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") in ("text", "input_text")]
        if parts and all(isinstance(p, str) for p in parts):
            return "\n".join(parts)
    raise ContractError(f"{where}: content must be a string or a list of text parts")


def _messages(raw, where: str) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise ContractError(f"{where}: a non-empty list of messages is required")
    out = []
    for i, m in enumerate(raw):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ROLES:
            raise ContractError(f"{where}[{i}].role: {role!r} is not one of system, developer, user, assistant")
        out.append({"role": ROLES[role], "content": _text(m.get("content"), f"{where}[{i}]")})
    return out


def _timestamp(value, where: str) -> str:
    """RFC 3339 as given, or a Unix time in seconds (``created``) converted."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < 32503680000:
        return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    raise ContractError(f"{where}: an RFC 3339 string or a Unix time in seconds is required")


def feedback_of(fb, where: str = "feedback") -> tuple[str, dict]:
    """``{"thumbs": "up"}`` / ``{"rating": 4}`` / ``{"correction": "..."}`` / ``{"rejected": "..."}`` (``comment``
    and ``reviewer`` may ride along) as (kind, contract feedback)."""
    if not isinstance(fb, dict):
        raise ContractError(f"{where}: an object with one of {', '.join(KINDS)} is required")
    kinds = [k for k in KINDS if fb.get(k) is not None]
    if len(kinds) != 1:
        found = ", ".join(kinds) or "none"
        raise ContractError(f"{where}: exactly one of {', '.join(KINDS)} per record (found {found})")
    kind, value = kinds[0], fb[kinds[0]]
    if kind == "thumbs":
        if isinstance(value, bool):
            thumb = "up" if value else "down"
        elif isinstance(value, int | float) and value in (1, -1):
            thumb = "up" if value > 0 else "down"
        else:
            thumb = THUMBS.get(value.lower()) if isinstance(value, str) else None
        if thumb is None:
            raise ContractError(f"{where}.thumbs: {value!r} is not up/down, true/false or 1/-1")
        return kind, {"type": "thumbs", "value": thumb}
    if kind == "rating":
        if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
            raise ContractError(f"{where}.rating: a whole number from 1 to 5 is required")
        return kind, {"type": "rating", "value": int(value)}
    if not isinstance(value, str):
        raise ContractError(f"{where}.{kind}: a string is required")
    return kind, (
        {"type": "correction", "text": value} if kind == "correction" else {"type": "preference", "rejected": value}
    )


def openai_to_event(line: bytes) -> dict:
    """One line of an OpenAI-style log (``{"request": {...}, "response": {...}, "feedback": {...}}``) as a
    contract event dict (still to be checked by the contract)."""
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ContractError(f"invalid JSON: {exc}") from None
    if not isinstance(row, dict):
        raise ContractError("a line must be a JSON object")
    request, response = row.get("request"), row.get("response")
    if not isinstance(request, dict) or not isinstance(response, dict):
        raise ContractError("openai-log line needs objects 'request' (the chat-completion request) and 'response'")
    choices = response.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ContractError("response.choices: a non-empty list is required")
    answer = choices[0].get("message")
    if not isinstance(answer, dict) or answer.get("role", "assistant") != "assistant":
        raise ContractError("response.choices[0].message: an assistant message is required")
    answer_id = response.get("id") or row.get("id")
    if not isinstance(answer_id, str) or not answer_id:
        raise ContractError("response.id: the completion's id (a string) is required")
    kind, feedback = feedback_of(row.get("feedback"))
    meta = request.get("metadata") if isinstance(request.get("metadata"), dict) else {}
    when = row.get("timestamp", response.get("created"))
    user = row.get("user", request.get("user"))
    event = {
        "event_id": f"openai-{answer_id}-{kind}",
        "timestamp": _timestamp(when, "timestamp (or response.created)"),
        "conversation_id": str(row.get("conversation_id") or meta.get("conversation_id") or answer_id),
        "model_version": response.get("model") or request.get("model") or "",
        "prompt": _messages(request.get("messages"), "request.messages"),
        "response": _text(answer.get("content"), "response.choices[0].message"),
        "feedback": feedback,
    }
    if user is not None:
        event["user_id"] = str(user)
    return event


# ---- MLflow traces with human assessments -----------------------------------------------------------------------
# a trace's root-span inputs: the user's messages under one of these keys, or one string field
_REQUEST_KEYS = ("messages", "input", "inputs", "question", "query", "prompt")
_RESPONSE_KEYS = ("content", "answer", "output", "response", "text")


def _when(ms) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _request_messages(raw) -> list[dict]:
    """The user's side of a traced call: ``{"messages": [...]}`` (an OpenAI-style request), a list of messages, or
    one string field (``{"question": "..."}``)."""
    value = raw
    if isinstance(raw, str):
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw  # a plain question, as Langfuse often records a trace's input
    if isinstance(value, dict):
        for key in _REQUEST_KEYS:
            if isinstance(value.get(key), list):
                return _messages(value[key], f"trace request.{key}")
        texts = [v for v in value.values() if isinstance(v, str)]
        if len(texts) == 1:
            return [{"role": "user", "content": texts[0]}]
    if isinstance(value, list):
        return _messages(value, "trace request")
    if isinstance(value, str) and value:
        return [{"role": "user", "content": value}]
    raise ContractError(
        "trace request: no messages found (expected 'messages', a list of messages or one string field)"
    )


def _response_text(raw) -> str:
    """The answer of a traced call: a string, an OpenAI chat completion, or one string field."""
    value = raw
    if isinstance(raw, str) and raw[:1] in "{[\"":
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        choices = value.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            return _text((choices[0].get("message") or {}).get("content"), "trace response.choices[0].message")
        for key in _RESPONSE_KEYS:
            if isinstance(value.get(key), str):
                return value[key]
    raise ContractError("trace response: no answer found (expected a string, a chat completion or one string field)")


def assessment_feedback(a: dict) -> dict:
    """A human assessment as contract feedback: a boolean or up/down feedback is a thumbs, a whole number 1-5 a
    rating (-1/1 on a feedback named like "thumbs" a thumbs), an expectation's string the correct answer."""
    name, value = str(a.get("name", "")), a.get("value")
    if a.get("kind") == "expectation":
        if isinstance(value, dict):
            value = value.get("expected_response", value.get("response"))
        if not isinstance(value, str) or not value.strip():
            raise ContractError(f"expectation {name!r}: a string (the correct answer) is required")
        return {"type": "correction", "text": value}
    if isinstance(value, bool):
        return {"type": "thumbs", "value": "up" if value else "down"}
    if isinstance(value, str) and value.lower() in ("up", "down", "thumbs_up", "thumbs_down", "yes", "no"):
        return {"type": "thumbs", "value": "up" if value.lower() in ("up", "thumbs_up", "yes") else "down"}
    if isinstance(value, int | float) and value == int(value):
        if "thumb" in name.lower() and int(value) in (1, -1, 0):
            return {"type": "thumbs", "value": "up" if value > 0 else "down"}
        if 1 <= value <= 5:
            return {"type": "rating", "value": int(value)}
    raise ContractError(f"feedback {name!r}: value {value!r} is not a thumbs (boolean, up/down) nor a 1-5 rating")


def mlflow_to_event(line: bytes) -> dict:
    """One exported human assessment with its trace (``mlflow_assessment_lines``) as a contract event dict."""
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ContractError(f"invalid JSON: {exc}") from None
    a, trace = row.get("assessment") or {}, row.get("trace") or {}
    if not a.get("id") or not trace.get("trace_id"):
        raise ContractError("an mlflow-trace line needs 'trace' (with trace_id) and 'assessment' (with id)")
    if trace.get("request") is None:
        raise ContractError(f"assessment {a['id']}: its trace {trace['trace_id']} is not in the store (no request)")
    meta, tags = trace.get("metadata") or {}, trace.get("tags") or {}
    try:
        prompt, response = _request_messages(trace.get("request")), _response_text(trace.get("response"))
    except json.JSONDecodeError as exc:
        raise ContractError(f"trace {trace['trace_id']}: request or response is not JSON: {exc}") from None
    event = {
        "event_id": f"mlflow-{a['id']}",
        "timestamp": _when(a.get("create_time_ms") or trace.get("request_time") or 0),
        "conversation_id": meta.get("mlflow.trace.session") or trace["trace_id"],
        "model_version": tags.get("model_version")
        or meta.get("model_version")
        or meta.get("mlflow.modelId")
        or "unknown",
        "prompt": prompt,
        "response": response,
        "feedback": assessment_feedback(a),
    }
    user = meta.get("mlflow.trace.user") or a.get("source_id")
    if user:
        event["user_id"] = str(user)
    return event


def mlflow_assessment_lines(tracking_uri: str, experiment: str, since_ms: int = 0) -> tuple[list[bytes], dict]:
    """One JSON line per human assessment created after ``since_ms`` on the traces of ``experiment``, with its trace
    (request, response, metadata); and counts: ``traces``, ``skipped_not_human`` (judges, code),
    ``skipped_from_service`` (Flywheel's service mirrored them from its feedback store), ``skipped_invalid``
    (overridden assessments), ``latest_ms`` (the new watermark)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"no MLflow experiment {experiment!r} at {tracking_uri}")
    mlflow.set_tracking_uri(tracking_uri)
    try:
        traces = mlflow.search_traces(locations=[exp.experiment_id], return_type="list")
    except MlflowException as exc:
        raise ValueError(f"cannot read the traces of {experiment!r}: {exc}") from None
    counts = {"traces": len(traces), "skipped_not_human": 0, "skipped_invalid": 0, "skipped_from_service": 0}
    lines, counts["latest_ms"] = [], since_ms
    for trace in traces:
        info = trace.info
        for a in info.assessments or []:
            created = a.create_time_ms or 0
            if created <= since_ms:
                continue
            counts["latest_ms"] = max(counts["latest_ms"], created)
            if a.valid is False:
                counts["skipped_invalid"] += 1
                continue
            if getattr(a.source, "source_type", "") != "HUMAN":
                counts["skipped_not_human"] += 1
                continue
            if (a.metadata or {}).get(EVENT_KEY):  # the service's own feedback: `flywheel export` stores it
                counts["skipped_from_service"] += 1
                continue
            kind = "expectation" if a.expectation is not None else "feedback"
            value = a.expectation.value if a.expectation is not None else (a.feedback.value if a.feedback else None)
            record = {
                "trace": {
                    "trace_id": info.trace_id,
                    "request_time": info.request_time,
                    "request": trace.data.request,
                    "response": trace.data.response,
                    "metadata": dict(info.trace_metadata or {}),
                    "tags": {k: v for k, v in (info.tags or {}).items() if not k.startswith("mlflow.")},
                },
                "assessment": {
                    "id": a.assessment_id,
                    "name": a.name,
                    "kind": kind,
                    "value": value,
                    "source_id": getattr(a.source, "source_id", None),
                    "create_time_ms": created,
                },
            }
            lines.append(json.dumps(record, default=str).encode())
    return lines, counts


# ---- Langfuse: an export of traces and scores -------------------------------------------------------------------
# Scores people gave (the SDK or API from an app's thumbs, annotation in the Langfuse UI) are feedback; an EVAL
# score (an LLM judge) is not
HUMAN_SCORE_SOURCES = ("API", "ANNOTATION")


def langfuse_records(raw: bytes) -> tuple[list[bytes], dict]:
    """A Langfuse export (``{"traces": [...], "scores": [...]}`` as the public API's list endpoints return them, or
    JSONL of trace and score objects) as one line per human score with its trace (``None`` when the export lacks
    it: that line is quarantined). Counts: ``traces``, ``scores``, ``skipped_not_human``."""
    text = raw.decode("utf-8")
    try:
        doc = json.loads(text)
        objects = (doc.get("traces") or []) + (doc.get("scores") or []) if isinstance(doc, dict) else doc
    except json.JSONDecodeError:
        objects = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    objects.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    objects.append({"_invalid": f"line {n}: invalid JSON: {exc}"})
    if not isinstance(objects, list):
        raise ContractError("a Langfuse export is {'traces': [...], 'scores': [...]} or JSONL of traces and scores")

    def is_trace(o) -> bool:
        return isinstance(o, dict) and "traceId" not in o and "id" in o

    traces = {o["id"]: o for o in objects if is_trace(o)}
    # the scores: those listed on their own, then those embedded in a trace (GET /traces/{id})
    embedded = [
        {**sc, "traceId": t["id"]} for t in traces.values() for sc in t.get("scores") or [] if isinstance(sc, dict)
    ]
    lines, counts = [], {"traces": len(traces), "scores": 0, "skipped_not_human": 0}
    for o in [o for o in objects if not is_trace(o)] + embedded:
        if not isinstance(o, dict) or "_invalid" in o:
            why = o["_invalid"] if isinstance(o, dict) else "not an object"
            lines.append(json.dumps({"invalid": why}).encode())
            continue
        counts["scores"] += 1
        if o.get("source", "API") not in HUMAN_SCORE_SOURCES:
            counts["skipped_not_human"] += 1
            continue
        lines.append(json.dumps({"score": o, "trace": traces.get(o.get("traceId"))}).encode())
    return lines, counts


def langfuse_to_event(line: bytes) -> dict:
    """One human score with its trace (``langfuse_records``) as a contract event dict."""
    row = json.loads(line)
    if "invalid" in row:
        raise ContractError(row["invalid"])
    score, trace = row.get("score") or {}, row.get("trace")
    sid = score.get("id")
    if not sid:
        raise ContractError("score: an 'id' is required")
    if trace is None:
        raise ContractError(f"score {sid}: its trace {score.get('traceId')!r} is not in the export")
    kind, value = score.get("dataType", "NUMERIC"), score.get("value")
    if kind == "BOOLEAN":
        value = bool(value) if value in (0, 1, True, False) else value
    elif kind in ("CATEGORICAL", "CORRECTION"):
        value = score.get("stringValue", value)
    a = {"name": score.get("name", ""), "value": value, "kind": "expectation" if kind == "CORRECTION" else "feedback"}
    event = {
        "event_id": f"langfuse-{sid}",
        "timestamp": score.get("timestamp") or trace.get("timestamp") or "",
        "conversation_id": trace.get("sessionId") or trace.get("id"),
        "model_version": trace.get("release") or trace.get("version") or "unknown",
        "prompt": _request_messages(trace.get("input")),
        "response": _response_text(trace.get("output")),
        "feedback": assessment_feedback(a),
    }
    if trace.get("userId"):
        event["user_id"] = str(trace["userId"])
    return event
