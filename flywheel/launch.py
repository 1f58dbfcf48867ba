"""The ``flywheel`` console script. ``flywheel stage ...`` goes to a warm runner when ``FLYWHEEL_WARM_SOCKET``
names one that answers (see flywheel/warm.py); everything else, and every stage without a runner, runs here."""

from __future__ import annotations

import os
import sys


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "repro" and not {"--help", "--cold"} & set(sys.argv[2:]):
        from flywheel.warm import repro_exec

        repro_exec(sys.argv[2:])           # execs dvc; returns only when there is no workspace here
    path = os.environ.get("FLYWHEEL_WARM_SOCKET")
    if path and len(sys.argv) > 1 and sys.argv[1] == "stage":
        from flywheel.warm import delegate

        code = delegate(path, sys.argv)
        if code is not None:
            sys.exit(code)
    from flywheel.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
