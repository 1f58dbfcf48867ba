"""Workspaces and Airflow homes for the orchestration tests. The workspace and Airflow helpers live in devkit/
(shared with the benchmarks) and are re-exported here; the rest (a broken batch, registry reads, feedback as
the service stores it) are the tests' own."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from devkit.airflow_home import POOL, airflow_env, dag_test, init_airflow  # noqa: F401 - re-exported for the tests
from devkit.workspaces import VENV_BIN, clean_env, copy_repo, ingest_small, make_workspace, set_params, sh  # noqa: F401


def broken_batch(path: Path, n: int = 15) -> Path:
    """A batch that passes ingest (too small for its rate checks) but breaks the window's answer-length
    drift expectation in ``validate``: answers ~20x longer than the window's."""
    events = []
    for i in range(n):
        events.append(
            {
                "event_id": f"broken-{i}",
                "timestamp": "2026-11-27T10:00:00Z",
                "conversation_id": f"broken-conv-{i}",
                "model_version": "policy/1",
                "prompt": [{"role": "user", "content": f"Tell me about topic {i}."}],
                "response": f"Answer {i}: " + " ".join(f"word{i}-{j}" for j in range(900)),
                "feedback": {"type": "thumbs", "value": "up" if i % 3 else "down"},
            }
        )
    path.write_text("\n".join(json.dumps(e) for e in events) + "\n")
    return path


def registry(root: Path) -> dict[str, dict]:
    """``flywheel status --json`` as {"policy v2": row}."""
    rows = json.loads(sh(["flywheel", "status", "--json"], root).stdout.strip().splitlines()[-1])
    return {f"{r['model'].split('-')[-1]} v{r['version']}": r for r in rows}


def champion(root: Path, model: str = "policy") -> str:
    return next(
        k.split(" v")[1] for k, r in registry(root).items() if k.startswith(model + " ") and "champion" in r["aliases"]
    )


def version_tags(root: Path, model: str, version: str) -> dict[str, str]:
    """The registry tags of one model version (read with MLflow in a subprocess)."""
    code = (
        "import json, sys; from flywheel.settings import load_settings; from mlflow import MlflowClient; "
        "s = load_settings(); c = MlflowClient(s.tracking_uri, s.registry_uri); "
        "print(json.dumps(c.get_model_version(sys.argv[1], sys.argv[2]).tags))"
    )
    out = sh([sys.executable, "-c", code, f"flywheel-{model}", version], root).stdout
    return json.loads(out.strip().splitlines()[-1])


def capture_feedback(root: Path, n: int, tag: str) -> list[str]:
    """``n`` thumbs events stored in the workspace's feedback store exactly as the service stores a posted event
    (its own record builder), as if users had left them; returns their event ids."""
    from service.feedback import _record
    from service.schemas import FeedbackIn
    from service.store import FeedbackStore, utcnow

    events = [
        FeedbackIn.model_validate(
            {
                "event_id": f"{tag}-{i:04d}",
                "timestamp": "2026-11-29T10:00:00Z",
                "conversation_id": f"{tag}-conv-{i}",
                "model_version": "flywheel-policy/1",
                "prompt": [{"role": "user", "content": f"How do I repot plant {i}?"}],
                "response": f"Water plant {i} first, then move it to a pot one size larger.",
                "feedback": {"type": "thumbs", "value": "up" if i % 3 else "down"},
            }
        )
        for i in range(n)
    ]
    store = FeedbackStore(f"sqlite:///{root / 'feedback.db'}")
    try:
        received = utcnow()
        store.write([_record(e, received)[0] for e in events])
    finally:
        store.close()
    return [e.event_id for e in events]


def raw_event_ids(root: Path) -> list[str]:
    """Every event id in the workspace's raw store."""
    import pyarrow.parquet as pq

    return [
        i
        for f in sorted((root / "data/raw").rglob("*.parquet"))
        for i in pq.read_table(f, columns=["event_id"]).column("event_id").to_pylist()
    ]
