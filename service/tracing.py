"""Chat answers as MLflow traces and their feedback as MLflow assessments (``params.yaml: serve.tracing``).

A writer process writes them, off the request path: a request only puts a record on a bounded queue. The
feedback store stays the source of truth; a record the queue has no room for, or that MLflow refuses, is counted
(``flywheel_traces_dropped_total``, ``flywheel_traces_failed_total``) and never fails a request. What reaches
MLflow is redacted as the feedback store's rows are (prompts, answers, corrections; user ids pseudonymised), and
``flywheel erase`` deletes a user's traces and assessments there too (flywheel/tracing_store.py).
"""

from __future__ import annotations

import logging
import os
import queue
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


COUNTS = ("traces", "assessments", "failed", "no_trace")  # what the writer process did, shared with the service


class Tracer:
    """The service's side: puts ``AnswerTrace`` and ``FeedbackAssessment`` records on a bounded queue that a
    writer process drains into an MLflow experiment.

    A process, at the lowest CPU priority, not a thread: writing one trace and one assessment costs MLflow about
    17 ms of CPU (measured here, SQLite store), and a thread would take it from the requests under the GIL
    (benchmarks/bench_service.py --tracing both: a thread cut feedback throughput by 36%, chat by 55%). The
    writer uses idle CPU; when the service is saturated the queue fills and traces are dropped (counted)."""

    def __init__(self, tracking_uri: str, experiment: str, max_queue: int):
        import multiprocessing

        self.tracking_uri, self.experiment = tracking_uri, experiment
        self._mp = multiprocessing.get_context("spawn")  # no copy of the service's models and threads
        self._queue = self._mp.Queue(max_queue)
        self._counts = self._mp.Array("q", len(COUNTS))
        self._dropped = 0
        self._process = None

    @property
    def written(self) -> Counter:
        """traces, assessments, failed, no_trace (feedback on an answer with no trace), dropped."""
        got = Counter(dict(zip(COUNTS, self._counts[:], strict=True)))
        got["dropped"] = self._dropped
        return got

    @property
    def queued(self) -> int:
        """Records waiting for the writer."""
        try:
            return self._queue.qsize()
        except NotImplementedError:  # macOS
            return -1

    # ---- the request side: never blocks, never raises ----------------------------------------------------------
    def answer(self, record: AnswerTrace) -> None:
        self._put(record)

    def feedback(self, answer_id: str, row: dict) -> None:
        self._put(FeedbackAssessment(answer_id, row))

    def _put(self, record) -> None:
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._dropped += 1

    # ---- the writer process ------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._process is None or not self._process.is_alive():
            self._process = self._mp.Process(
                target=_write_all,
                args=(self._queue, self._counts, self.tracking_uri, self.experiment, os.getpid()),
                name="flywheel-tracing",
                daemon=True,
            )
            self._process.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Write what is queued (up to ``timeout``), then end the writer."""
        if self._process is None or not self._process.is_alive():
            return
        try:
            self._queue.put(None, timeout=timeout)
            self._process.join(timeout)
        except queue.Full:
            pass
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5)


def _write_all(q, counts, tracking_uri: str, experiment: str, service: int) -> None:
    """The writer process: every record on ``q`` into MLflow until ``None`` (or until ``service``, the process
    that started it, is gone)."""
    os.nice(19)
    writer = _Writer(counts)
    try:
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)
        writer.mlflow, writer.exp = mlflow, experiment_id(tracking_uri, experiment, create=True)
    except Exception as exc:  # a tracking store that cannot be reached: nothing is traced, the service runs on
        log.error("MLflow tracing is off: %s: %s", type(exc).__name__, exc)
        for _ in _records(q, service):
            writer.count("failed")
        return
    for record in _records(q, service):
        try:
            if isinstance(record, AnswerTrace):
                writer.answer(record)
            else:
                writer.feedback(record)
        except Exception as exc:
            writer.count("failed")
            log.warning("an MLflow trace was not written: %s", type(exc).__name__)
    if writer.unflushed:
        writer.mlflow.flush_trace_async_logging()


def _records(q, service: int, every: float = 1.0):
    """The records on ``q`` until ``None``, or until the service is gone (killed: it never sends ``None``, and this
    process would wait on the queue for ever) and nothing is left on the queue."""
    while True:
        try:
            record = q.get(timeout=every)
        except queue.Empty:
            if os.getppid() != service:  # the service died: this process was handed to another parent
                return
            continue
        if record is None:
            return
        yield record


class _Writer:
    """Writes records to MLflow; remembers which trace holds which answer."""

    def __init__(self, counts):
        self.counts, self.mlflow, self.exp = counts, None, None
        self.trace_ids: OrderedDict[str, str] = OrderedDict()
        self.unflushed = False

    def count(self, what: str) -> None:
        with self.counts.get_lock():
            self.counts[COUNTS.index(what)] += 1

    def answer(self, r: AnswerTrace) -> None:
        from mlflow.entities import SpanType
        from mlflow.tracing.constant import SpanAttributeKey

        found: Counter = Counter()
        messages = [{"role": m["role"], "content": redact(m["content"], found)} for m in r.messages]
        metadata = {}
        if r.user:
            metadata[USER_KEY] = pseudonymise_id(r.user, found)
        span = self.mlflow.start_span_no_context(
            name="chat",
            span_type=SpanType.CHAT_MODEL,
            inputs={"messages": messages},
            attributes={"model_version": r.model_version, "variant": r.variant},
            tags={ANSWER_TAG: r.answer_id, VERSION_TAG: r.model_version, "variant": r.variant},
            metadata=metadata,
            experiment_id=self.exp,
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
        self.trace_ids[r.answer_id] = span.trace_id
        if len(self.trace_ids) > _REMEMBERED:
            self.trace_ids.popitem(last=False)
        self.unflushed = True
        self.count("traces")

    def _trace_of(self, answer_id: str) -> str | None:
        if answer_id in self.trace_ids:
            return self.trace_ids[answer_id]
        found = self.mlflow.search_traces(
            locations=[self.exp], filter_string=f"tag.`{ANSWER_TAG}` = '{answer_id}'", return_type="list"
        )
        return found[0].info.trace_id if found else None

    def feedback(self, r: FeedbackAssessment) -> None:
        from mlflow.entities import AssessmentSource

        if self.unflushed:  # the answer's trace may still be on MLflow's own export queue
            self.mlflow.flush_trace_async_logging()
            self.unflushed = False
        trace_id = self._trace_of(r.answer_id)
        if trace_id is None:  # answered before tracing was on (or by another replica): nothing to attach to
            self.count("no_trace")
            return
        row = r.row
        source = AssessmentSource(source_type="HUMAN", source_id=row.get("user_id") or "anonymous")
        meta = {EVENT_KEY: row["event_id"], VERSION_TAG: row["model_version"]}
        kind = row["feedback_type"]
        if kind == "correction":
            self.mlflow.log_expectation(
                trace_id=trace_id, name="expected_response", value=row["correction"], source=source, metadata=meta
            )
        else:
            name, value, why = {
                "thumbs": ("thumbs", row.get("thumbs") == "up", None),
                "rating": ("rating", row.get("rating"), None),
                "preference": ("preferred", True, "preferred over another answer: " + (row.get("rejected") or "")),
            }[kind]
            self.mlflow.log_feedback(
                trace_id=trace_id, name=name, value=value, source=source, rationale=why, metadata=meta
            )
        self.count("assessments")


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
