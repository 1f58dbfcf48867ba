"""Chat answers as MLflow traces and their feedback as MLflow assessments (``params.yaml: serve.tracing``).

One background thread writes them, off the request path: a request only puts a record on a bounded queue. The
feedback store stays the source of truth; a record the queue has no room for, or that MLflow refuses, is counted
(``flywheel_traces_dropped_total``, ``flywheel_traces_failed_total``) and never fails a request. What reaches
MLflow is redacted as the feedback store's rows are (prompts, answers, corrections; user ids pseudonymised), and
``flywheel erase`` deletes a user's traces and assessments there too (flywheel/tracing_store.py).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass

from flywheel.redact import pseudonymise_id, redact
from flywheel.tracing_store import ANSWER_TAG, EVENT_KEY, USER_KEY, VERSION_TAG, experiment_id

log = logging.getLogger("flywheel.service")
_REMEMBERED = 100_000  # answer id -> trace id kept in memory; older answers are found by their tag


@dataclass(frozen=True)
class AnswerTrace:
    answer_id: str
    messages: list[dict]
    text: str
    model_version: str
    variant: str
    user: str | None
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    start_ns: int
    end_ns: int


@dataclass(frozen=True)
class FeedbackAssessment:
    answer_id: str
    row: dict  # the stored raw-store row (redacted)


class Tracer:
    """Writes ``AnswerTrace`` and ``FeedbackAssessment`` records to an MLflow experiment from its own thread."""

    def __init__(self, tracking_uri: str, experiment: str, max_queue: int, metrics=None):
        self.tracking_uri, self.experiment, self.metrics = tracking_uri, experiment, metrics
        self._queue: queue.Queue = queue.Queue(max_queue)
        self._thread: threading.Thread | None = None
        self._trace_ids: OrderedDict[str, str] = OrderedDict()
        self._unflushed = False
        self.written: Counter = Counter()  # traces, assessments, failed, dropped (also in /metrics)

    # ---- the request side: never blocks, never raises ----------------------------------------------------------
    def answer(self, record: AnswerTrace) -> None:
        self._put(record)

    def feedback(self, answer_id: str, row: dict) -> None:
        self._put(FeedbackAssessment(answer_id, row))

    def _put(self, record) -> None:
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._count("dropped")

    # ---- the writer thread ----------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="flywheel-tracing", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Write what is queued (up to ``timeout``), then end the thread."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)

    def _count(self, what: str) -> None:
        self.written[what] += 1
        if self.metrics is not None and what in ("failed", "dropped"):
            self.metrics.inc(f"flywheel_traces_{what}_total")

    def _run(self) -> None:
        try:
            import mlflow

            mlflow.set_tracking_uri(self.tracking_uri)
            self._mlflow, self._exp = mlflow, experiment_id(self.tracking_uri, self.experiment, create=True)
        except Exception as exc:  # a tracking store that cannot be reached: tracing is off, the service runs on
            log.error("MLflow tracing is off: %s: %s", type(exc).__name__, exc)
            self._drain_failed()
            return
        while (record := self._queue.get()) is not None:
            try:
                if isinstance(record, AnswerTrace):
                    self._write_answer(record)
                else:
                    self._write_feedback(record)
            except Exception as exc:
                self._count("failed")
                log.warning("an MLflow trace was not written: %s", type(exc).__name__)
        if self._unflushed:
            self._mlflow.flush_trace_async_logging()

    def _drain_failed(self) -> None:
        while self._queue.get() is not None:
            self._count("failed")

    def _write_answer(self, r: AnswerTrace) -> None:
        from mlflow.entities import SpanType
        from mlflow.tracing.constant import SpanAttributeKey

        found: Counter = Counter()
        messages = [{"role": m["role"], "content": redact(m["content"], found)} for m in r.messages]
        metadata = {}
        if r.user:
            metadata[USER_KEY] = pseudonymise_id(r.user, found)
        span = self._mlflow.start_span_no_context(
            name="chat",
            span_type=SpanType.CHAT_MODEL,
            inputs={"messages": messages},
            attributes={"model_version": r.model_version, "variant": r.variant},
            tags={ANSWER_TAG: r.answer_id, VERSION_TAG: r.model_version, "variant": r.variant},
            metadata=metadata,
            experiment_id=self._exp,
            start_time_ns=r.start_ns,
        )
        usage = {"input_tokens": r.prompt_tokens, "output_tokens": r.completion_tokens}
        span.set_attribute(SpanAttributeKey.CHAT_USAGE, {**usage, "total_tokens": sum(usage.values())})
        answer = {"role": "assistant", "content": redact(r.text, found)}
        span.set_outputs(
            {
                "id": r.answer_id,
                "model": r.model_version,
                "choices": [{"message": answer, "finish_reason": r.finish_reason}],
            }
        )
        span.end(end_time_ns=r.end_ns)
        self._trace_ids[r.answer_id] = span.trace_id
        if len(self._trace_ids) > _REMEMBERED:
            self._trace_ids.popitem(last=False)
        self._unflushed = True
        self._count("traces")

    def _trace_of(self, answer_id: str) -> str | None:
        if answer_id in self._trace_ids:
            return self._trace_ids[answer_id]
        found = self._mlflow.search_traces(
            locations=[self._exp], filter_string=f"tag.`{ANSWER_TAG}` = '{answer_id}'", return_type="list"
        )
        return found[0].info.trace_id if found else None

    def _write_feedback(self, r: FeedbackAssessment) -> None:
        from mlflow.entities import AssessmentSource

        if self._unflushed:  # the answer's trace may still be on MLflow's own export queue
            self._mlflow.flush_trace_async_logging()
            self._unflushed = False
        trace_id = self._trace_of(r.answer_id)
        if trace_id is None:  # answered before tracing was on (or by another replica): nothing to attach to
            self._count("no_trace")
            return
        row = r.row
        source = AssessmentSource(source_type="HUMAN", source_id=row.get("user_id") or "anonymous")
        meta = {EVENT_KEY: row["event_id"], VERSION_TAG: row["model_version"]}
        kind = row["feedback_type"]
        if kind == "correction":
            self._mlflow.log_expectation(
                trace_id=trace_id, name="expected_response", value=row["correction"], source=source, metadata=meta
            )
        else:
            name, value, why = {
                "thumbs": ("thumbs", row.get("thumbs") == "up", None),
                "rating": ("rating", row.get("rating"), None),
                "preference": ("preferred", True, "preferred over another answer: " + (row.get("rejected") or "")),
            }[kind]
            self._mlflow.log_feedback(
                trace_id=trace_id, name=name, value=value, source=source, rationale=why, metadata=meta
            )
        self._count("assessments")


def answer_record(answer_id, messages, answer, variant, user, start_ns) -> AnswerTrace:
    """The trace record of one finished answer (``service.generation`` Answer)."""
    return AnswerTrace(
        answer_id=answer_id,
        messages=messages,
        text=answer.text,
        model_version=answer.model_version,
        variant=variant,
        user=user,
        prompt_tokens=answer.prompt_tokens,
        completion_tokens=answer.completion_tokens,
        finish_reason=answer.finish_reason,
        start_ns=start_ns,
        end_ns=time.time_ns(),
    )
