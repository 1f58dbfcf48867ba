"""What the commands of the ``flywheel`` CLI share: errors and exit codes, the settings read once, printing that
fits the terminal (80 columns when the output is not one), and quiet libraries in a log."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import textwrap
from collections.abc import Iterator
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flywheel.settings import Settings, SettingsError, load_settings

console = Console(stderr=True)

# environment that keeps progress bars and advisory chatter of the libraries out of a log (read at their import,
# so it also reaches the processes a command starts: dvc, its stages, the warm runner)
QUIET_ENV = {
    "TQDM_DISABLE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` on stderr and exit with ``code`` (2: bad usage or settings; 1: the work failed)."""
    console.print(f"error: {message}", style="red", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        fail(str(exc))


def quiet_libraries() -> None:
    """When stderr is not a terminal (a log: `make demo > log`, DVC, Airflow), no progress bars: tqdm,
    huggingface_hub and transformers are told by environment (inherited by the processes started after) and,
    when already imported (the warm runner preloads them), by their own switches."""
    if sys.stderr.isatty():
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if "tqdm" in sys.modules and not getattr(sys.modules["tqdm"], "_flywheel_quiet", False):
        import functools

        import tqdm
        from tqdm import std

        std.tqdm.__init__ = functools.partialmethod(std.tqdm.__init__, disable=True)  # read TQDM_DISABLE too late
        tqdm._flywheel_quiet = True
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def width() -> int:
    """The terminal's width; 80 when the output is not a terminal (``COLUMNS`` overrides both)."""
    return shutil.get_terminal_size((80, 24)).columns


def fit(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, an ellipsis marking the cut."""
    return text if len(text) <= limit else text[: max(limit - 1, 0)] + "…"


def aligned(rows: list[list[str]], limit: int) -> list[str]:
    """Rows as lines of left-aligned columns two spaces apart; only the last column is cut to fit ``limit``."""
    if not rows:
        return []
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    out = []
    for r in rows:
        head = "".join(cell.ljust(w + 2) for cell, w in zip(r, widths))
        out.append((head + fit(r[-1], limit - len(head))).rstrip())
    return out


def wrapped(text: str, indent: str, limit: int) -> list[str]:
    """``text`` wrapped to ``limit`` columns, every line indented."""
    return textwrap.wrap(
        text,
        max(limit, len(indent) + 20),
        initial_indent=indent,
        subsequent_indent=indent + "  ",
        break_long_words=True,
        break_on_hyphens=False,
    ) or [indent]


def print_record(data: dict, as_json: bool, title: str) -> None:
    """One result: a JSON object on stdout with ``--json``, else a two-column table."""
    if as_json:
        typer.echo(json.dumps(data))
        return
    table = Table(title=title, show_header=False)
    for k, v in data.items():
        table.add_row(escape(k), escape(json.dumps(v) if isinstance(v, (dict, list)) else str(v)))
    Console().print(table)


def registry(s: Settings):
    from flywheel.registry import Registry

    return Registry(s)


def gate(s: Settings, name: str | None = None):
    """The gate in force (params.yaml ``bless.gate``; ``name``: another gate params.yaml defines)."""
    from pipelines.bless import GateError, gate_in_force

    try:
        return gate_in_force(s.params.bless, name)
    except GateError as exc:
        fail(str(exc))


@contextlib.contextmanager
def feedback_store(url: str | None = None) -> Iterator:
    """The service's feedback store (settings.feedback_store unless ``url``), closed afterwards."""
    from service.store import FeedbackStore

    store = FeedbackStore(url or settings().feedback_store)
    try:
        yield store
    finally:
        store.close()


@contextlib.contextmanager
def changing_raw_store(s: Settings, command: str) -> Iterator[list[str]]:
    """flywheel.publishing.changing_raw_store, its failures as exit codes (1: the lock or the remote, 2: the
    settings)."""
    from flywheel import publishing, remote, workspace

    try:
        with publishing.changing_raw_store(s, command, log=console.print) as push:
            yield push
    except SettingsError as exc:
        fail(str(exc))
    except (workspace.WorkspaceError, remote.RemoteError) as exc:
        fail(str(exc), 1)


def no_track_with_remote(s: Settings, track: bool) -> None:
    if not track and s.dvc_remote:
        fail(
            "--no-track cannot be used with a DVC remote (dvc_remote is set): an untracked batch is never "
            "published, and the next sync would delete it"
        )
