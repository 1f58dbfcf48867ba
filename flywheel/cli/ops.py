"""``flywheel`` workspace commands: init (git + DVC), check (every service the settings name answers), repro
(`dvc repro` with the warm stage runner)."""

from __future__ import annotations

import os

import typer

from flywheel.cli._common import console, settings

app = typer.Typer()


@app.command()
def init() -> None:
    """Make the workspace a git + DVC repository where it is not one yet."""
    from flywheel import workspace

    s = settings()
    done = workspace.init(s.root)
    console.print("initialised: " + (", ".join(done) if done else "nothing to do"))


@app.command()
def check(timeout: float = typer.Option(2.0, min=0.1, help="seconds to wait for each service")) -> None:
    """Check that every service the settings name (Airflow DB, Celery broker, MLflow, feedback store, DVC remote)
    answers: one line per setting; exit 1 if any does not."""
    from flywheel.production import probe

    s = settings()
    results = probe(s, timeout=timeout)
    for p in results:
        state = "skipped" if p.skipped else "ok" if p.ok else "error"
        typer.echo(f"{state:<8}{p.message}")
    if not all(p.ok for p in results):
        raise typer.Exit(1)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def repro(
    ctx: typer.Context,
    warm_runner: bool = typer.Option(True, "--warm/--cold", help="run stages in a warm runner (flywheel/warm.py)"),
) -> None:
    """`dvc repro` with the stages' commands run by a warm runner (torch, MLflow and GX imported once, not once
    a stage; a plain `dvc repro` does the same); `--cold` runs each stage in its own process. Any other argument
    goes to dvc repro as is, e.g. `flywheel repro train_policy --force`."""
    import subprocess

    from flywheel import warm, workspace

    s = settings()
    if warm_runner:
        warm.repro_exec(ctx.args)  # execs dvc repro with the workspace's warm runner
    env = {k: v for k, v in os.environ.items() if k != warm.SOCKET_ENV}
    if not warm_runner:
        env["FLYWHEEL_WARM"] = "0"  # --cold: every stage in its own process, no runner started
    raise typer.Exit(subprocess.run([workspace._bin("dvc"), "repro", *ctx.args], cwd=s.root, env=env).returncode)
