"""The ``flywheel`` console script. ``flywheel stage ...`` goes to the warm runner of this workspace and environment
(flywheel/warm.py; started when none answers, unless params or ``FLYWHEEL_WARM=0`` say not to; Airflow and Celery
tasks always say so), so a local `dvc repro` pays the imports of torch, MLflow and GX once, not once per stage;
everything else, and every stage no runner takes, runs here."""

from __future__ import annotations

import sys

CLI = "flywheel.cli:main"  # what the runner's children call (it imports it per command, never ahead)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "repro" and not {"--help", "--cold"} & set(sys.argv[2:]):
        from flywheel.warm import repro_exec

        repro_exec(sys.argv[2:], entry=CLI)  # execs dvc; returns only when there is no workspace here
    if len(sys.argv) > 1 and sys.argv[1] == "stage":
        from flywheel.warm import run_stage

        code = run_stage(sys.argv, entry=CLI)
        if code is not None:
            sys.exit(code)
    from flywheel.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
