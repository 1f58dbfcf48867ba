"""``python -m flywheel.cli``: the command line without the warm runner's hand-off (the demo runs it so)."""

from flywheel.cli import main

main()
