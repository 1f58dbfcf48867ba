"""MLflow tracking: one parent run per loop run, a nested run per stage; plots as artifacts."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

EXPERIMENT = "flywheel"
# the MLflow UI opens an experiment without this tag in GenAI mode (an empty traces page); ours trains models
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def configure(tracking_uri: str, registry_uri: str, artifact_root: Path) -> str:
    """Point MLflow at the store and make sure the experiment exists; returns its id."""
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(registry_uri)
    client = MlflowClient()
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        for key, value in EXPERIMENT_TAGS.items():  # an experiment made by an earlier version lacks them
            if key not in exp.tags:
                client.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id
    if tracking_uri.startswith(("http://", "https://")):
        return client.create_experiment(EXPERIMENT, tags=EXPERIMENT_TAGS)
    Path(artifact_root).mkdir(parents=True, exist_ok=True)
    return client.create_experiment(EXPERIMENT, artifact_location=str(artifact_root), tags=EXPERIMENT_TAGS)


def configure_from(settings) -> str:
    return configure(settings.tracking_uri, settings.registry_uri, settings.artifact_root)


@contextlib.contextmanager
def stage_run(settings, stage: str, tags: dict | None = None) -> Iterator:
    """A run for one stage, nested under the loop's parent run when one is set."""
    import mlflow

    exp = configure_from(settings)
    parent = settings.parent_run_id or None
    with mlflow.start_run(
        experiment_id=exp, run_name=stage, parent_run_id=parent, tags={"flywheel.stage": stage, **(tags or {})}
    ) as run:
        yield run


def start_loop_run(settings, name: str, tags: dict | None = None) -> str:
    """Create (and end) the parent run of one loop turn; stages nest under its id."""
    import mlflow

    exp = configure_from(settings)
    with mlflow.start_run(experiment_id=exp, run_name=name, tags={"flywheel.loop": "true", **(tags or {})}) as run:
        return run.info.run_id


def log_loop_outcome(settings, metrics: dict[str, float], tags: dict[str, str], note: str = "") -> None:
    """The loop turn's outcome on its parent run, where the MLflow UI's run list shows it: headline metrics,
    verdict tags and a description (``note``). Nothing without a loop run."""
    if not settings.parent_run_id:
        return
    import mlflow
    from mlflow.entities import Metric, RunTag

    configure_from(settings)
    now = int(time.time() * 1000)
    tags = {**tags, **({"mlflow.note.content": note} if note else {})}
    mlflow.MlflowClient().log_batch(
        settings.parent_run_id,
        metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
        tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()],
    )


def git_commit(root: Path) -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def log_curve(values: list[float], name: str, ylabel: str, out: Path) -> Path:
    """Plot a curve to PNG (for MLflow artifacts and the report)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(range(1, len(values) + 1), values, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def stage_durations(settings, parent_run_id: str) -> dict[str, float]:
    """Seconds each stage's MLflow run lasted, for the runs nested under one loop run (start order)."""
    import mlflow

    exp = configure_from(settings)
    runs = mlflow.search_runs(
        [exp],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
        order_by=["attributes.start_time ASC"],
        output_format="list",
    )
    return {r.info.run_name: round((r.info.end_time - r.info.start_time) / 1000, 1) for r in runs if r.info.end_time}
