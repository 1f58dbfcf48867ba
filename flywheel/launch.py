"""The ``flywheel`` console script. ``flywheel stage ...`` goes to the workspace's warm runner (flywheel/warm.py;
started when none answers, unless params or ``FLYWHEEL_WARM=0`` say not to), so a plain `dvc repro` pays the
imports of torch, MLflow and GX once, not once per stage; everything else, and every stage no runner takes,
runs here."""

from __future__ import annotations

import os
import sys


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "repro" and not {"--help", "--cold"} & set(sys.argv[2:]):
        from flywheel.warm import repro_exec

        repro_exec(sys.argv[2:])           # execs dvc; returns only when there is no workspace here
    if len(sys.argv) > 1 and sys.argv[1] == "stage":
        from flywheel.warm import run_stage

        code = run_stage(sys.argv)
        if code is not None:
            sys.exit(code)
    from flywheel.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
