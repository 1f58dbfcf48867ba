"""`flywheel status` and `flywheel release` at 80 columns: one line per version, model names whole, a one-line
verdict built from the gate's figures; every reason with --verbose, everything with --json. And no library
progress bars in a log."""

from __future__ import annotations

import json
import shutil
import sys
from io import StringIO

import pytest
from typer.testing import CliRunner

from flywheel import cli, verdicts
from flywheel.cli import _common
from flywheel.registry import Version
from flywheel.release import Outcome

PRIMARY_LINE = (
    "pref_accuracy: challenger 0.6100 vs champion 0.5900, difference +0.0200, 95% interval "
    "[-0.0100, +0.0490] on 386 items - not better beyond noise (lower bound <= 0.0)"
)
MANY = (
    [PRIMARY_LINE]
    + [
        f"pref_accuracy[feedback_type=thumbs_{i}]: regresses by 0.0{i}00 against the champion "
        f"(0.6000 -> 0.5{i}00), over the allowed 0.03"
        for i in range(1, 10)
    ]
    + [f"harmless_win_rate: not applied: no judge: the champion reward model scores {i} pairs alike" for i in range(10)]
)
PROMOTED = {"diff": 0.119, "ci": [0.037, 0.201], "n": 386, "beyond_noise": True, "metric": "pref_accuracy"}


def _versions() -> dict[str, list[Version]]:
    judge = "flywheel-reward v12 (0123456789ab)"
    return {
        "flywheel-policy": [
            Version(
                "flywheel-policy",
                "1",
                "",
                {"origin": "base", "blessed": "base model", "smoke_check": "base model"},
                ["previous-champion"],
            ),
            Version(
                "flywheel-policy",
                "2",
                "",
                {
                    "blessed": "true",
                    "smoke_check": "passed",
                    "gate": "default",
                    "judge": judge,
                    "gate_reasons": "[]",
                    "promoted_at": "2026-11-30",
                    "gate_primary": json.dumps(PROMOTED),
                },
                ["champion"],
            ),
            Version(
                "flywheel-policy",
                "13",
                "",
                {
                    "blessed": "false",
                    "smoke_check": "passed",
                    "gate": "default",
                    "judge": judge,
                    "gate_reasons": json.dumps(MANY),
                    "refused": "; ".join(MANY),
                },
                [],
            ),
        ],
        "flywheel-reward": [  # tagged before gate_primary was kept: the figure is read from the reason
            Version(
                "flywheel-reward",
                "2",
                "",
                {
                    "blessed": "false",
                    "smoke_check": "passed",
                    "gate": "default",
                    "gate_reasons": json.dumps([PRIMARY_LINE]),
                    "refused": PRIMARY_LINE,
                },
                ["challenger"],
            ),
        ],
    }


class _Registry:
    def __init__(self, *_):
        self.data = _versions()

    def versions(self, name):
        return self.data.get(name, [])


@pytest.fixture
def ws(tmp_path, monkeypatch, repo_root):
    ws = tmp_path / "a-rather-long-folder-name-for-a-workspace" / "ws"
    ws.mkdir(parents=True)
    shutil.copy(repo_root / "params.yaml", ws / "params.yaml")
    monkeypatch.setenv("FLYWHEEL_ROOT", str(ws))
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setattr("flywheel.cli.models.registry", _Registry)
    return ws


def _run(*args: str):
    result = CliRunner().invoke(cli.app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def _fits(out: str) -> list[str]:
    lines = out.splitlines()
    assert lines and max(len(line) for line in lines) <= 80, "\n".join(x for x in lines if len(x) > 80)
    return lines


def test_status_prints_one_line_per_version_within_80_columns(ws):
    lines = _fits(_run("status"))
    rows = [line for line in lines if line.startswith(("policy", "reward"))]
    assert [r.split()[:2] for r in rows] == [["policy", "v1"], ["policy", "v2"], ["policy", "v13"], ["reward", "v2"]]
    assert rows[0].split()[2:] == ["previous", "base", "model"]
    assert rows[1].split(None, 3)[2:] == ["champion", "promoted: +0.119 [+0.037, +0.201]"]
    assert "refused: +0.020 [-0.010, +0.049], not beyond noise" in rows[2]
    assert rows[3].endswith("refused: +0.020 [-0.010, +0.049], not beyond noise")
    assert rows[3].split()[2] == "challenger"
    assert len(lines) == 2 + len(rows)  # the registry line, the header, the versions: nothing wraps


def test_status_verbose_prints_every_reason_wrapped_within_80_columns(ws):
    out = _run("status", "--verbose")
    lines = _fits(out)
    joined = " ".join(line.strip() for line in lines)
    for reason in MANY:
        assert " ".join(reason.split()) in joined
    assert "judge flywheel-reward v12 (0123456789ab)" in joined


def test_status_json_keeps_its_keys_and_adds_the_verdict(ws):
    rows = json.loads(_run("status", "--json"))
    assert {
        "model",
        "version",
        "aliases",
        "blessed",
        "smoke_check",
        "origin",
        "reasons",
        "gate",
        "judge",
        "refused",
        "rolled_back",
        "verdict",
    } == set(rows[0])
    assert rows[2]["model"] == "flywheel-policy" and rows[2]["reasons"] == MANY
    assert rows[1]["verdict"] == "promoted: +0.119 [+0.037, +0.201]"


def test_release_prints_one_line_per_model_within_80_columns(ws, monkeypatch):
    from flywheel import release as rel
    from flywheel.settings import load_settings
    from pipelines.bless import gate_in_force

    gate = gate_in_force(load_settings().params.bless)
    (ws / "models" / "challenger").mkdir(parents=True)
    (ws / "reports").mkdir()
    blessing = {
        "gate": gate.name,
        "gate_sha256": gate.sha256,
        "judge": "none",
        "policy": {"blessed": True, "reasons": [], "passed": [], "primary": PROMOTED},
        "reward": {"blessed": False, "reasons": MANY, "passed": []},
    }
    (ws / "reports" / "blessing.json").write_text(json.dumps(blessing))
    outcomes = [
        Outcome("policy", "14", True, True, True, True, []),
        Outcome("reward", "3", True, False, True, False, MANY),
    ]
    monkeypatch.setattr(rel, "bootstrap", lambda *a, **k: [])
    monkeypatch.setattr(rel, "lineage", lambda s: {})
    monkeypatch.setattr(rel, "release", lambda *a, **k: outcomes)
    lines = _fits(_run("release"))
    assert any(
        line.startswith("policy") and line.endswith("v14 (new)  promoted: +0.119 [+0.037, +0.201]") for line in lines
    ), lines
    assert any(
        line.startswith("reward") and "refused: +0.020 [-0.010, +0.049], not beyond noise" in line for line in lines
    ), lines
    verbose = _fits(_run("release", "--verbose"))
    assert len(verbose) > len(lines) + len(MANY)
    rows = json.loads(_run("release", "--json"))
    assert [r["model"] for r in rows] == ["policy", "reward"] and rows[1]["reasons"] == MANY
    assert {"model", "version", "new_version", "blessed", "smoke_check", "promoted", "reasons"} <= set(rows[0])


@pytest.mark.parametrize(
    "tags, expected",
    [
        ({"origin": "base"}, "base model"),
        (
            {
                "blessed": "true",
                "smoke_check": "passed",
                "awaiting": "change freeze",
                "gate_primary": json.dumps(PROMOTED),
            },
            "held: +0.119 [+0.037, +0.201], change freeze",
        ),
        (
            {
                "blessed": "true",
                "smoke_check": "passed",
                "rolled_back": "2026-11-30T10:00:00Z, champion moved back to v1",
                "gate_primary": json.dumps(PROMOTED),
            },
            "rolled back: +0.119 [+0.037, +0.201], champion moved back to v1",
        ),
        (
            {
                "blessed": "true",
                "smoke_check": "failed",
                "refused": "smoke check failed: no answer in 120 s",
                "gate_primary": json.dumps(PROMOTED),
            },
            "refused: +0.119 [+0.037, +0.201], smoke check failed: no answer in 120 s",
        ),
    ],
)
def test_version_verdicts(tags, expected):
    assert verdicts.of_version(tags) == expected


def test_no_progress_bars_when_stderr_is_not_a_terminal(monkeypatch):
    """The environment reaches the processes started after (the demo's dvc, its stages, the warm runner); a tqdm
    already imported (the runner preloads it) is told directly."""
    import os

    import tqdm
    from tqdm import std

    for key in _common.QUIET_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(std.tqdm, "__init__", vars(std.tqdm)["__init__"])  # restored after the test
    monkeypatch.setattr(tqdm, "_flywheel_quiet", False, raising=False)
    monkeypatch.setattr(sys, "stderr", StringIO())
    _common.quiet_libraries()
    assert {k: os.environ.get(k) for k in _common.QUIET_ENV} == _common.QUIET_ENV
    log = StringIO()
    for _ in tqdm.tqdm(range(3), file=log):
        pass
    assert log.getvalue() == ""
