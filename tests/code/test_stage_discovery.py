"""`flywheel stage NAME` is discovered, never registered: a step file with a ``stage()`` function is a command whose
options come from its signature (README "Extending Flywheel"). A toy stage is added the documented way: its step
file, its params section and its dvc.yaml entry, nothing else, and `dvc repro` runs it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flywheel import cli, stages
from flywheel.cli._common import QUIET_ENV

TOY = '''"""A toy step: the tests' example of a stage added by its step file alone."""

from __future__ import annotations

import json
import os
from pathlib import Path

from flywheel.params import PrepareParams
from flywheel.settings import Settings
from flywheel.stages import StageFailed


def stage(settings: Settings, params: PrepareParams, *, note: Path, out: Path) -> str:
    """Write what the toy was given to ``out``.

    More words that only the stage's own --help shows."""
    text = note.read_text() if note.exists() else ""
    if text == "refuse":
        raise StageFailed("toy: refused, as asked")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"root": str(settings.root), "shingle_chars": params.shingle_chars, "note": text,
                               "tqdm_disable": os.environ.get("TQDM_DISABLE")}))
    return f"toy: wrote {out.name}"
'''

BROKEN = '''from pathlib import Path


def stage(settings, *, out: Path, when: str = "now") -> str:
    """A stage whose option the convention cannot build."""
    return "never"
'''


@pytest.fixture
def toy(tmp_path, monkeypatch, repo_root):
    """A workspace and a second folder of the ``pipelines`` package holding toy.py and broken.py."""
    extra = tmp_path / "extra"
    (extra / "pipelines").mkdir(parents=True)
    (extra / "pipelines" / "toy.py").write_text(TOY)
    (extra / "pipelines" / "broken.py").write_text(BROKEN)
    monkeypatch.syspath_prepend(str(extra))
    for name in ("pipelines.toy", "pipelines.broken"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copy(repo_root / "params.yaml", ws / "params.yaml")
    monkeypatch.setenv("FLYWHEEL_ROOT", str(ws))
    monkeypatch.chdir(tmp_path)  # paths are taken from the workspace root, not the cwd
    for key in QUIET_ENV:  # the stage entry sets them (stderr is no terminal here)
        monkeypatch.delenv(key, raising=False)
    import tqdm
    from tqdm import std

    monkeypatch.setattr(std.tqdm, "__init__", vars(std.tqdm)["__init__"])  # and quiets an imported tqdm
    monkeypatch.setattr(tqdm, "_flywheel_quiet", False, raising=False)
    yield ws
    for name in ("pipelines.toy", "pipelines.broken"):
        sys.modules.pop(name, None)


def _run(*args: str):
    return CliRunner().invoke(cli.app, ["stage", *args])


def test_every_dvc_yaml_stage_is_a_discovered_command(repo_root):
    dvc = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]
    assert set(dvc) <= set(stages.stage_names())
    for name, stage in dvc.items():
        cmd = " ".join(stage["cmd"].split())
        assert cmd.startswith(f"flywheel stage {name} "), cmd
        spec = stages.spec(name)
        flags = set(re.findall(r"(--[a-z][a-z-]*)", cmd))
        assert flags == {stages.flag(o) for o in spec.options}, f"dvc.yaml {name}: {flags}"


def test_the_toy_stage_is_listed_without_importing_it(toy):
    listed = _run("--help")
    assert listed.exit_code == 0, listed.output
    assert "toy" in listed.output and "Write what the toy was given" in listed.output
    assert "validate" in listed.output
    assert "pipelines.toy" not in sys.modules


def test_the_toy_stage_options_come_from_its_signature(toy):
    shown = _run("toy", "--help")
    assert shown.exit_code == 0, shown.output
    for flag in ("--note", "--out", "only the stage's own --help"):
        assert flag in shown.output
    missing = _run("toy", "--note", "n.txt")
    assert missing.exit_code == 2 and "--out" in missing.output


def test_the_toy_stage_runs_with_its_settings_section_and_paths_from_the_root(toy):
    (toy / "n.txt").write_text("hello")
    ran = _run("toy", "--out", "out.json", "--note", "n.txt")
    assert ran.exit_code == 0, ran.output
    assert "toy: wrote out.json" in ran.output
    got = json.loads((toy / "out.json").read_text())
    shipped = yaml.safe_load((toy / "params.yaml").read_text())["prepare"]["shingle_chars"]
    assert got == {"root": str(toy), "shingle_chars": shipped, "note": "hello", "tqdm_disable": "1"}
    assert not (toy.parent / "out.json").exists()


def test_a_stage_failure_exits_1_and_a_params_error_2(toy):
    (toy / "n.txt").write_text("refuse")
    refused = _run("toy", "--out", "out.json", "--note", "n.txt")
    assert refused.exit_code == 1 and "error: toy: refused, as asked" in refused.output
    assert not (toy / "out.json").exists()
    text = (toy / "params.yaml").read_text().replace("prepare:\n", "prepare:\n  shingle_char: 3\n", 1)
    (toy / "params.yaml").write_text(text)
    bad = _run("toy", "--out", "out.json", "--note", "n.txt")
    assert bad.exit_code == 2 and "prepare.shingle_char" in bad.output, bad.output
    twice = _run("toy", "--note", "n.txt", "--out", "a.json", "--out", "b.json")
    assert twice.exit_code == 2 and "option --out given twice" in twice.output


def test_a_signature_the_convention_cannot_fill_is_named(toy):
    broken = _run("broken", "--out", "x")
    assert broken.exit_code == 2
    assert "pipelines/broken.py stage(): parameter 'when'" in broken.output
    with pytest.raises(TypeError, match="'when'"):
        stages.spec("broken")
    unknown = _run("nope")
    assert unknown.exit_code == 2 and "No such command 'nope'" in unknown.output


def _add_toy_the_documented_way(repo: Path) -> None:
    """What README "Extending Flywheel" says a new stage touches: its step file, its params section (params.yaml
    and its model in flywheel/params.py) and dvc.yaml."""
    (repo / "pipelines" / "toy.py").write_text(
        TOY.replace("PrepareParams", "ToyParams")
        .replace("params.shingle_chars", "params.greeting")
        .replace('"shingle_chars"', '"greeting"')
    )
    params_py = repo / "flywheel" / "params.py"
    text = params_py.read_text()
    assert text.count("\nclass Params(") == 1 and "    orchestration: OrchestrationParams\n" in text
    text = text.replace("\nclass Params(", "\nclass ToyParams(Section):\n    greeting: str\n\n\nclass Params(")
    text = text.replace(
        "    orchestration: OrchestrationParams\n", "    orchestration: OrchestrationParams\n    toy: ToyParams\n", 1
    )
    params_py.write_text(text)
    with (repo / "params.yaml").open("a") as fh:
        fh.write("\ntoy:\n  greeting: hello from params.yaml\n")
    with (repo / "dvc.yaml").open("a") as fh:
        fh.write(
            "\n  toy:\n    cmd: flywheel stage toy --note note.txt --out ${settings.reports}/toy.json\n"
            "    deps:\n      - note.txt\n      - pipelines/toy.py\n    params:\n      - toy\n"
            "    outs:\n      - ${settings.reports}/toy.json\n"
        )


def test_a_toy_stage_added_by_its_step_file_params_section_and_dvc_yaml_runs_in_dvc_repro(tmp_path, repo_root):
    repo = tmp_path / "repo"
    repo.mkdir()
    ignore = shutil.ignore_patterns("__pycache__")
    for part in ("flywheel", "pipelines", "service"):
        shutil.copytree(repo_root / part, repo / part, ignore=ignore)
    for part in ("params.yaml", "dvc.yaml"):
        shutil.copy(repo_root / part, repo / part)
    _add_toy_the_documented_way(repo)
    (repo / "note.txt").write_text("from dvc")
    venv_bin = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLYWHEEL_", "AIRFLOW"))}
    env.update(
        PYTHONPATH=str(repo),
        FLYWHEEL_ROOT=str(repo),
        FLYWHEEL_WARM="0",
        PATH=f"{venv_bin}{os.pathsep}{env.get('PATH', '')}",
        GIT_CONFIG_NOSYSTEM="1",
    )
    for cmd in (["git", "init", "-q"], [str(venv_bin / "dvc"), "init", "-q"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
    proc = subprocess.run(
        [str(venv_bin / "dvc"), "repro", "toy"], cwd=repo, env=env, text=True, capture_output=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "toy: wrote toy.json" in proc.stdout + proc.stderr
    got = json.loads((repo / "reports" / "toy.json").read_text())
    assert got["greeting"] == "hello from params.yaml" and got["root"] == str(repo) and got["note"] == "from dvc"
    assert "toy" in yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
