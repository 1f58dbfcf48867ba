"""``flywheel demo``: turn the improvement loop twice on the shipped data and models (what `make demo` runs).

Each step is the command a user would type, run in this workspace: ingest a batch, `flywheel repro` (= `dvc
repro`), `flywheel release`. Turn 1 ingests the first half of the HH-RLHF demo file and the native batch; turn 2
the second half. In a log (stderr not a terminal) the libraries' progress bars are kept out.
"""

from __future__ import annotations

import os
import sys
import time

import typer

from flywheel.cli._common import fail, quiet_libraries, settings
from flywheel.settings import Settings

app = typer.Typer()

TURNS = [
    [("hh-rlhf", "data/demo/hh-rlhf-batch1.jsonl.gz"), ("native", "data/demo/native-batch.jsonl")],
    [("hh-rlhf", "data/demo/hh-rlhf-batch2.jsonl.gz")],
]


def _flywheel(*args: str) -> list[str]:
    return [sys.executable, "-m", "flywheel.cli", *args]


def _step(message: str) -> None:
    print(f"\n==> {message}", flush=True)


def run(s: Settings, turns: int = 2) -> dict:
    """Run the loop ``turns`` times in the workspace of ``s``; returns the timings (seconds)."""
    from flywheel import tracking, warm, workspace
    from flywheel.models.device import cpu_summary

    root = s.root
    t_start = time.perf_counter()
    print(f"machine: {cpu_summary()}", flush=True)
    done = workspace.init(root)
    if done:
        _step("initialised " + ", ".join(done))
    _step("base models: SmolLM2-135M-Instruct (from GGUF) and MiniLM, made loadable")
    workspace.run([workspace._bin("dvc"), "repro", "base_models"], root)
    workspace.run(_flywheel("bootstrap"), root)
    timings = {}
    for turn, batches in enumerate(TURNS[:turns], 1):
        t0 = time.perf_counter()
        for fmt, path in batches:
            _step(f"turn {turn}: ingest {path} ({fmt})")
            workspace.run(_flywheel("ingest", "--format", fmt, path), root)
        parent = tracking.start_loop_run(s, f"loop turn {turn}", {"flywheel.turn": str(turn)})
        os.environ["FLYWHEEL_PARENT_RUN_ID"] = parent
        _step(
            f"turn {turn}: flywheel repro (= dvc repro; validate, prepare, train, evaluate, bless); MLflow run {parent}"
        )
        t_repro = time.perf_counter()
        workspace.run(_flywheel("repro"), root)
        timings[f"turn_{turn}_repro_seconds"] = round(time.perf_counter() - t_repro, 1)
        stages = tracking.stage_durations(s, parent)
        print(
            f"turn {turn}: dvc repro took {timings[f'turn_{turn}_repro_seconds']} s; inside the stages' MLflow runs: "
            + ", ".join(f"{k} {v} s" for k, v in stages.items()),
            flush=True,
        )
        _step(f"turn {turn}: release")
        workspace.run(_flywheel("release"), root)
        timings[f"turn_{turn}_seconds"] = round(time.perf_counter() - t0, 1)
        print(f"turn {turn} took {timings[f'turn_{turn}_seconds']} s", flush=True)
    warm.stop_workspace(root)  # the runner `flywheel repro` started; it would exit when idle anyway
    _step("registry")
    workspace.run(_flywheel("status"), root)
    timings["loop_seconds"] = round(time.perf_counter() - t_start, 1)
    print(f"\nThe loop took {timings['loop_seconds']} s (install excluded)\non {cpu_summary()}.")
    print(
        "Open the MLflow UI:  .venv/bin/mlflow ui --backend-store-uri "
        + s.tracking_uri
        + " --port 5000\n  then http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"
    )
    print("Evaluation report:   " + str(root / "reports/evaluate/report.html") + " (or report.md)")
    print("Data Docs:           " + str(root / "reports/validate/data_docs/index.html"))
    return timings


@app.command()
def demo(turns: int = typer.Option(2, min=1, max=2)) -> None:
    """Turn the improvement loop on the shipped data and models (what `make demo` runs)."""
    from flywheel import workspace

    s = settings()
    quiet_libraries()  # inherited by every command the demo runs
    try:
        run(s, turns)
    except workspace.WorkspaceError as exc:
        fail(str(exc), code=1)
