"""``flywheel stage NAME [--options]``: the pipeline's stages, as dvc.yaml and the DAG run them.

Nothing here names a stage: each is ``pipelines/NAME.py``'s ``stage()`` function, discovered by flywheel/stages.py;
its options are its keyword-only ``Path`` parameters, required, ``--name-with-dashes``, taken from the workspace
root. The stage's one-line summary is printed; ``StageFailed`` exits 1 with its message, a
settings or params error 2."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup
from typer.main import get_command

from flywheel import stages
from flywheel.cli._common import console, fail, quiet_libraries, settings
from flywheel.settings import SettingsError


def _parameter(name: str) -> inspect.Parameter:
    """The typer parameter of one stage option: a required ``--name-with-dashes`` path."""
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=typer.Option(..., stages.flag(name)), annotation=Path
    )


def _command(name: str) -> TyperCommand:
    """``flywheel stage NAME``, built from ``pipelines/NAME.py``'s ``stage()`` signature (this imports the step)."""
    try:
        spec = stages.spec(name)
    except (TypeError, ValueError) as exc:
        fail(str(exc))

    def run(**values: Any) -> None:
        s = settings()
        try:
            summary = stages.call(spec, s, values)
        except stages.StageFailed as exc:
            fail(str(exc), 1)
        except SettingsError as exc:
            fail(str(exc))
        console.print(summary, markup=False, highlight=False, soft_wrap=True)  # one line, even in a log

    params = [_parameter(o) for o in spec.options]
    run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in params}
    one = typer.Typer(add_completion=False)
    one.command(name, help=inspect.getdoc(spec.fn) or stages.summary(name))(run)
    return get_command(one)


class _StageGroup(TyperGroup):
    """The stages found in ``pipelines/`` (flywheel.stages.stage_names), built on demand; listing them (``flywheel
    stage --help``) reads their docstrings without importing them, so neither torch nor Great Expectations."""

    _listing = False

    def list_commands(self, ctx: Any) -> list[str]:
        return stages.stage_names()

    def get_command(self, ctx: Any, cmd_name: str) -> TyperCommand | None:
        if cmd_name not in stages.stage_names():
            return None
        if self._listing:
            return TyperCommand(cmd_name, help=stages.summary(cmd_name), short_help=stages.summary(cmd_name))
        quiet_libraries()  # before the step imports its libraries
        return _command(cmd_name)

    def format_help(self, ctx: Any, formatter: Any) -> None:
        self._listing = True
        try:
            return super().format_help(ctx, formatter)
        finally:
            self._listing = False


app = typer.Typer(
    cls=_StageGroup,
    no_args_is_help=True,
    help="Run one pipeline stage (what dvc.yaml calls): pipelines/NAME.py's stage().",
)
