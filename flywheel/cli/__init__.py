"""The ``flywheel`` command line: the edge where settings are read once and the core or a step is called.

One file per concept, each thin (parse, call, print): data.py (ingest, export, erase, publish, restore,
quarantine, contract), models.py (bootstrap, release, promote, rollback, status, eval-reward), stages.py
(``flywheel stage NAME``, discovered from pipelines/), service.py (serve, tokens), ops.py (init, check, repro),
demo.py. This file assembles them under a root that refuses a repeated option; ``main`` is the entry point
(flywheel/launch.py, the console script, calls it)."""

from __future__ import annotations

import sys

import typer
from typer.core import TyperGroup

from flywheel.cli import data, demo, models, ops, review, service, stages
from flywheel.cli._common import console, fail, quiet_libraries
from flywheel.settings import SettingsError


def _repeated_option(ctx: typer.Context) -> str | None:
    """The first single-value option given more than once to the subcommand the arguments name, else None
    (options that take a list, like ``tokens create --scope``, may repeat). Parsed with the subcommand's own
    parser, so ``--x=1``, flags and ``--x/--no-x`` pairs count; what the parser refuses is left to the real parse."""
    args = [*(getattr(ctx, "_protected_args", None) or []), *ctx.args]
    cmd, sub = ctx.command, ctx
    try:
        while hasattr(cmd, "resolve_command"):  # a group: find the subcommand its first argument names
            if not args or args[0].startswith("-"):
                return None
            name, cmd, args = cmd.resolve_command(sub, args)
            if cmd is None:
                return None
            sub = type(ctx)(cmd, parent=sub, info_name=name, **cmd.context_settings)
        _, _, order = cmd.make_parser(sub).parse_args(args=list(args))
    except typer.Exit:  # the command could not be built (a stage's signature): said once
        raise
    except Exception:  # noqa: BLE001 - a usage error (unknown command or option): click reports it itself
        return None
    seen: set[str] = set()
    for param in order:
        if (
            param.param_type_name == "option"
            and not getattr(param, "multiple", False)
            and not getattr(param, "count", False)
        ):
            if param.name in seen:
                return "/".join([*param.opts, *param.secondary_opts])
            seen.add(param.name)
    return None


class _RootGroup(TyperGroup):
    """The root command: refuses a repeated single-value option before anything runs (typer/click would keep
    the last value silently: `--name a --name b` meant b alone)."""

    def invoke(self, ctx: typer.Context):
        repeated = _repeated_option(ctx)
        if repeated:
            fail(f"option {repeated} given twice; give it once")
        quiet_libraries()  # no progress bars in a log (release, serve, eval-*: not only the stages)
        return super().invoke(ctx)


app = typer.Typer(
    cls=_RootGroup,
    add_completion=False,
    no_args_is_help=True,
    help="The `flywheel` command line: the edge where settings are read once and steps are called.",
)
for _part in (ops, demo, data, review, models, service):
    app.add_typer(_part.app)  # no name: the part's commands join the root
app.add_typer(stages.app, name="stage")


def main() -> None:
    try:
        app()
    except SettingsError as exc:
        console.print(f"error: {exc}", style="red", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
