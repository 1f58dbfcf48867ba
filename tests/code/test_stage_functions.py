"""Every dvc.yaml stage is its step file: ``pipelines/<name>.py`` has a ``stage()`` whose ``--options`` are exactly
those the stage's ``cmd`` passes, whose params sections are those the stage lists under ``params:``, and whose code
in the core library (data, evaluation, models) is listed under ``deps:``, so DVC reruns the stage when it changes."""

from __future__ import annotations

import ast
import inspect
import json
import shlex
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from shipped import shipped

from flywheel.params import SECTION_OF
from flywheel.settings import Settings
from flywheel.stages import path_options, stage_function, stage_names

ROOT = Path(__file__).resolve().parents[2]
STAGES: dict = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
# the core packages whose code decides what a stage writes (settings, tracking and the registry only say where)
CODE_DEPS = ("flywheel/data/", "flywheel/evaluation/", "flywheel/models/")


def _cmd_options(name: str) -> list[str]:
    """The ``--options`` of a stage's dvc.yaml ``cmd`` as parameter names (``--out-dir`` -> ``out_dir``)."""
    words = shlex.split(STAGES[name]["cmd"])
    assert words[:3] == ["flywheel", "stage", name], f"dvc.yaml {name}: cmd must be `flywheel stage {name} ...`"
    rest = words[3:]
    assert len(rest) % 2 == 0 and all(w.startswith("--") for w in rest[::2]), (
        f"dvc.yaml {name}: cmd must pass `--option value` pairs only, got {rest}"
    )
    return [w[2:].replace("-", "_") for w in rest[::2]]


def _sections(name: str) -> dict[str, str]:
    """The params sections ``stage()`` receives: parameter name -> params.yaml key."""
    fn = stage_function(name)
    hints = typing.get_type_hints(fn)
    out = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind is inspect.Parameter.KEYWORD_ONLY:
            continue
        if p.name == "settings":
            assert hints.get("settings") is Settings, f"pipelines/{name}.py stage(): settings is not a Settings"
            continue
        assert hints.get(p.name) in SECTION_OF, (
            f"pipelines/{name}.py stage(): parameter {p.name!r} is neither settings nor a flywheel.params section"
        )
        out[p.name] = SECTION_OF[hints[p.name]]
    return out


def test_the_stages_with_a_step_file_are_the_stages_of_dvc_yaml():
    assert stage_names(ROOT) == sorted(STAGES)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_options_are_the_options_its_command_passes(name):
    fn = stage_function(name)
    options = _cmd_options(name)
    assert len(set(options)) == len(options), f"dvc.yaml {name}: an option passed twice"
    assert sorted(path_options(fn)) == sorted(options)
    kw_only = [p for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert all(typing.get_type_hints(fn)[p.name] is Path and p.default is inspect.Parameter.empty for p in kw_only), (
        f"pipelines/{name}.py stage(): every keyword-only parameter is a required Path (a CLI option)"
    )
    assert typing.get_type_hints(fn)["return"] is str, f"pipelines/{name}.py stage() returns its summary line"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_params_are_the_sections_dvc_yaml_lists(name):
    listed = [str(p) for p in STAGES[name].get("params", []) if str(p) not in ("profile", "profiles")]
    received = set(_sections(name).values())
    for section in received:
        assert any(p == section or p.startswith(section + ".") for p in listed), (
            f"dvc.yaml {name}: stage() reads params.yaml {section} but params: does not list it"
        )
    for p in listed:
        assert p.split(".")[0] in received, f"dvc.yaml {name}: lists {p}, which stage() does not receive"


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):  # imports inside functions too
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return out


def _core_code(step: Path) -> set[str]:
    """The CODE_DEPS files a step file runs: what it imports from them, and what those import, transitively."""
    seen: set[str] = set()
    todo = [step]
    while todo:
        for module in _imports(todo.pop()):
            rel = module.replace(".", "/") + ".py"
            if rel.startswith(CODE_DEPS) and rel not in seen and (ROOT / rel).is_file():
                seen.add(rel)
                todo.append(ROOT / rel)
    return seen


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_list_its_step_file_and_the_core_code_it_runs(name):
    deps = set(STAGES[name].get("deps", []))
    step = ROOT / "pipelines" / f"{name}.py"
    assert f"pipelines/{name}.py" in deps
    missing = sorted(_core_code(step) - deps)
    assert not missing, f"dvc.yaml {name}: deps must list {missing} (the stage runs their code)"


def test_the_deps_check_follows_imports_into_the_core():
    """The check above sees what evaluate runs through its step file (not only what the step imports by name)."""
    code = _core_code(ROOT / "pipelines" / "evaluate.py")
    assert {
        "flywheel/evaluation/policy_eval.py",
        "flywheel/evaluation/refusal.py",
        "flywheel/models/policy.py",
        "flywheel/evaluation/stats.py",
    } <= code


# ---- what stage() adds to its step's main(): the champion read, the expected failure, the summary line ----------


def test_validate_fails_as_an_expected_stage_failure_with_the_message_naming_each_expectation(monkeypatch, tmp_path):
    from flywheel.stages import StageFailed
    from pipelines import validate

    message = "validation failed:\n  enough data: ExpectTableRowCountToBeBetween"

    def broken(*_):
        raise validate.ValidationFailed(message)

    monkeypatch.setattr(validate, "main", broken)
    with pytest.raises(StageFailed) as caught:
        validate.stage(SimpleNamespace(raw_store=tmp_path), None, out=tmp_path / "r", metrics=tmp_path / "m.json")
    assert str(caught.value) == message


def test_train_policy_starts_from_the_policy_champion_json_names(monkeypatch, tmp_path):
    from pipelines import train_policy

    (tmp_path / "policy").mkdir()
    (tmp_path / "reward").mkdir()
    entry = {"name": "flywheel-policy", "version": "4", "path": "policy", "content_hash": "ab"}
    (tmp_path / "champion.json").write_text(json.dumps({"policy": entry, "reward": {**entry, "path": "reward"}}))
    seen = {}
    monkeypatch.setattr(
        train_policy,
        "main",
        lambda s, p, champion, info, *rest: seen.update(champion=champion, info=info, rest=rest) or {"steps": 1},
    )
    line = train_policy.stage(
        SimpleNamespace(root=tmp_path, models=tmp_path / "models"),
        shipped("train_policy"),
        shipped("score_cache"),
        champion=tmp_path / "champion.json",
        base=tmp_path / "base",
        prepared=tmp_path / "prepared",
        out=tmp_path / "out",
        metrics=tmp_path / "m.json",
    )
    assert seen["champion"] == tmp_path / "policy" and seen["info"]["version"] == "4"  # relative to the workspace
    assert seen["rest"][:4] == (
        tmp_path / "prepared",
        tmp_path / "out",
        tmp_path / "m.json",
        tmp_path / "base" / "policy",
    )
    assert (tmp_path / "models" / "score-cache" / "scores.sqlite").is_file()  # the store the fast loop reads
    assert line == "train_policy: {'steps': 1}"


def test_evaluate_summary_says_not_measured_instead_of_failing_on_an_empty_split(monkeypatch, tmp_path):
    """An empty test split leaves the accuracies unmeasured (None): the stage has written its metrics and must
    not then crash formatting its summary line (the CLI's command did, with a TypeError)."""
    from pipelines import evaluate

    empty = {"challenger": None, "champion": None, "n": 0}
    measured = {"challenger": 0.625, "champion": 0.5, "n": 40}
    monkeypatch.setattr(evaluate, "load", lambda path, settings: {})
    monkeypatch.setattr(
        evaluate, "main", lambda *_: {"policy": {"pref_accuracy": empty}, "reward": {"pairwise_accuracy": measured}}
    )
    names = ("champion", "base", "challenger", "prepared", "suites", "out", "metrics", "summary")
    paths = {k: tmp_path / k for k in names}
    line = evaluate.stage(SimpleNamespace(root=tmp_path), None, None, None, **paths)
    assert line == "evaluate: policy accuracy not measured -> not measured, reward accuracy 0.500 -> 0.625"
    # `dvc metrics show` reads the summary: flat, numbers only, the unmeasured left out
    assert json.loads(paths["summary"].read_text()) == {
        "reward.pairwise_accuracy.challenger": 0.625,
        "reward.pairwise_accuracy.champion": 0.5,
    }


@pytest.mark.parametrize("name", sorted(STAGES))
def test_what_a_step_preloads_names_a_group_or_an_installed_module(name):
    """A DAG task's runner imports a step's PRELOAD while DVC starts (flywheel/warm_runner.py): each entry is one of
    the runner's groups or a module that is installed, so a typo cannot silently leave a stage cold."""
    import importlib.util

    from flywheel.warm_runner import PRELOAD_GROUPS

    step = importlib.import_module(f"pipelines.{name}")
    for entry in getattr(step, "PRELOAD", ()):
        modules = PRELOAD_GROUPS.get(entry, (entry,))
        assert all(importlib.util.find_spec(m) is not None for m in modules), f"pipelines/{name}.py PRELOAD: {entry!r}"
