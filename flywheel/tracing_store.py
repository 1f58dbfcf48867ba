"""The MLflow experiment the service traces its answers to: the names Flywheel gives there, and erasure of a user's
traces and assessments (``flywheel erase``). The service writes (service/tracing.py); ingest reads
(flywheel/data/sources.py)."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

ANSWER_TAG = "flywheel.answer_id"  # trace tag: the answer's id (X-Answer-Id)
VERSION_TAG = "model_version"  # trace tag and assessment metadata: the model version that answered
EVENT_KEY = "flywheel.event_id"  # assessment metadata: the feedback event it mirrors (already in the store)
USER_KEY = "mlflow.trace.user"  # trace metadata MLflow shows as the trace's user


def experiment_id(tracking_uri: str, name: str, create: bool = False) -> str | None:
    """The id of experiment ``name`` (created when ``create``; None when it does not exist)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    if not create:
        return None
    try:
        return client.create_experiment(name, tags={"mlflow.experimentKind": "genai_development"})
    except MlflowException:  # created meanwhile by another process
        return client.get_experiment_by_name(name).experiment_id


@dataclass
class TraceErasure:
    traces: int = 0
    assessments: int = 0


def erase_user(tracking_uri: str, experiment: str, forms: frozenset[str]) -> TraceErasure:
    """Delete the traces whose user is any of ``forms`` (the id as given and as its pseudonym, NFC) and the
    assessments such a user left on others' traces."""
    import mlflow

    exp = experiment_id(tracking_uri, experiment)
    done = TraceErasure()
    if exp is None:
        return done
    from mlflow.tracing.client import TracingClient

    client, tracing = mlflow.MlflowClient(tracking_uri), TracingClient(tracking_uri)

    def theirs(value) -> bool:
        return isinstance(value, str) and unicodedata.normalize("NFC", value) in forms

    token, doomed = None, []
    while True:
        page = client.search_traces(locations=[exp], max_results=500, page_token=token, include_spans=False)
        for trace in page:
            info = trace.info
            if theirs((info.trace_metadata or {}).get(USER_KEY)):
                doomed.append(info.trace_id)
                continue
            for a in info.assessments or []:
                if theirs(getattr(a.source, "source_id", None)):
                    tracing.delete_assessment(info.trace_id, a.assessment_id)
                    done.assessments += 1
        token = page.token
        if not token:
            break
    for i in range(0, len(doomed), 100):
        done.traces += client.delete_traces(exp, trace_ids=doomed[i : i + 100])
    return done
