"""The pipeline's stages as the code sees them: each dvc.yaml stage NAME is ``pipelines/NAME.py`` with a typed
``stage()`` function, discovered here (never registered by hand); the CLI builds ``flywheel stage NAME`` from it."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flywheel.settings import Settings, SettingsError


class StageFailed(Exception):
    """An expected failure of a stage (a failed expectation, a refused input): exit 1 with this message."""


def stage_function(name: str) -> Callable[..., str]:
    """``pipelines.<name>.stage``; a ValueError naming the stage when there is none."""
    if not name.isidentifier():
        raise ValueError(f"no stage {name!r}: stage names are Python identifiers (pipelines/<name>.py)")
    try:
        module = importlib.import_module(f"pipelines.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"pipelines.{name}":
            raise ValueError(f"no stage {name!r}: there is no pipelines/{name}.py") from exc
        raise
    fn = getattr(module, "stage", None)
    if not callable(fn):
        raise ValueError(f"pipelines/{name}.py defines no stage() function")
    return fn


def pipeline_dirs() -> list[Path]:
    """The folders of the ``pipelines`` package (its ``__path__``: a test may add one)."""
    spec = importlib.util.find_spec("pipelines")
    return [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []


def _step_files(root: Path | None) -> dict[str, Path]:
    dirs = [root / "pipelines"] if root is not None else pipeline_dirs()
    return {
        p.stem: p
        for d in reversed(dirs)
        for p in d.glob("*.py")
        if not p.stem.startswith("_") and "\ndef stage(" in p.read_text()
    }


def stage_names(root: Path | None = None) -> list[str]:
    """The stages that have a step file: ``pipelines/*.py`` defining ``stage``, by file name (no import); those of
    ``root``'s pipelines/ folder, or by default of the ``pipelines`` package."""
    return sorted(_step_files(root))


def summary(name: str) -> str:
    """The first line of ``pipelines/<name>.py``'s ``stage()`` docstring (else its module docstring), read
    without importing the step (listing the stages imports neither torch nor GX)."""
    path = _step_files(None).get(name)
    if path is None:
        return ""
    tree = ast.parse(path.read_text())
    fn = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "stage"), None)
    doc = (ast.get_docstring(fn) if fn else None) or ast.get_docstring(tree) or ""
    return doc.strip().split("\n\n")[0].replace("\n", " ")


def path_options(fn: Callable[..., str]) -> list[str]:
    """The keyword-only ``Path`` parameters of a stage function: its ``--options``."""
    return [
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.annotation in (Path, "Path")
    ]


def declared_sections(name: str) -> list[str]:
    """The params.yaml sections ``pipelines/<name>.py``'s ``stage()`` takes (parameters annotated with a section
    model of flywheel/params.py), read without importing the step."""
    from flywheel.params import SECTION_OF

    by_class = {cls.__name__: section for cls, section in SECTION_OF.items()}
    path = _step_files(None).get(name)
    tree = ast.parse(path.read_text()) if path else ast.Module(body=[], type_ignores=[])
    fn = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "stage"), None)
    if fn is None:
        return []
    args = [*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs]
    names = [ast.unparse(a.annotation).strip("'\"").split(".")[-1] for a in args if a.annotation is not None]
    return [by_class[n] for n in names if n in by_class]


# ---- a stage's inputs, from its signature (the convention README "Extending Flywheel" describes) ----------------
def flag(param: str) -> str:
    """The CLI option of a keyword-only ``Path`` parameter: ``--name-with-dashes``."""
    return "--" + param.replace("_", "-")


@dataclass(frozen=True)
class StageSpec:
    """What ``stage()`` takes: the Settings (parameter ``settings``), params.yaml sections (parameters annotated
    with a section model of flywheel/params.py) and options (keyword-only ``Path`` parameters, all required)."""

    name: str
    fn: Callable[..., str]
    settings_param: str | None
    sections: dict[str, str]  # parameter -> its params.yaml section
    options: list[str]  # parameter names, in signature order


def spec(name: str) -> StageSpec:
    """Import ``pipelines.<name>`` and read its ``stage()`` signature; a TypeError names a parameter the
    convention cannot fill."""
    from flywheel.params import SECTION_OF

    fn = stage_function(name)
    where = f"pipelines/{name}.py stage()"
    try:
        hints = typing.get_type_hints(fn, localns={"Settings": Settings, "Path": Path})
    except NameError as exc:
        raise TypeError(f"{where}: an annotation cannot be resolved ({exc}); import what it names") from exc
    settings_param, sections, options = None, {}, []
    for p in inspect.signature(fn).parameters.values():
        hint = hints.get(p.name, p.annotation)
        if p.name == "settings" or hint is Settings:
            settings_param = p.name
        elif isinstance(hint, type) and hint in SECTION_OF:
            sections[p.name] = SECTION_OF[hint]
        elif p.kind is inspect.Parameter.KEYWORD_ONLY and hint is Path and p.default is inspect.Parameter.empty:
            options.append(p.name)
        else:
            raise TypeError(
                f"{where}: parameter {p.name!r} is not `settings`, a params section model "
                f"(flywheel.params.SECTION_OF) or a keyword-only Path without a default"
            )
    return StageSpec(name, fn, settings_param, sections, options)


def call(stage: StageSpec, settings: Settings, paths: dict[str, Path]) -> str:
    """Run ``stage`` with its Settings, its params sections and its option ``paths`` (by parameter name, taken
    from the workspace root when relative). Returns its one-line summary."""
    kwargs: dict[str, Any] = {name: settings.params.section(section) for name, section in stage.sections.items()}
    if stage.settings_param:
        kwargs[stage.settings_param] = settings
    for name in stage.options:
        if paths.get(name) is None:
            raise SettingsError(f"stage {stage.name}: missing option {flag(name)}")
        kwargs[name] = settings.root / paths[name]
    return stage.fn(**kwargs)
