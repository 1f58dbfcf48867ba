"""End to end with the real shipped models on tiny data: `dvc repro` (all stages) then `flywheel release`
in a copy of the repository, on the `tiny` profile (a few steps) and the permissive gate (set in its params.yaml:
a profile cannot change the gate)."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def test_loop_turns_and_promotes_a_fine_tuned_policy(repo_copy, sh):
    params = repo_copy / "params.yaml"
    params.write_text(
        params.read_text()
        .replace("\nprofile: demo", "\nprofile: tiny")
        .replace("\nbless:\n  gate: default", "\nbless:\n  gate: permissive")
    )
    rows = gzip.open(repo_copy / "data/demo/hh-rlhf-batch1.jsonl.gz", "rt").read().splitlines()[:120]
    small = repo_copy / "small.jsonl.gz"
    with gzip.open(small, "wt") as fh:
        fh.write("\n".join(rows) + "\n")
    for args in (
        ["flywheel", "ingest", "--format", "hh-rlhf", str(small)],
        ["flywheel", "ingest", "data/demo/native-batch.jsonl"],
    ):
        proc = sh(args, repo_copy)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    # `flywheel repro`: dvc repro with the stages forked from a warm runner; a plain `dvc repro` afterwards
    # finds everything up to date: both write the same dvc.lock
    from flywheel import warm

    try:
        first = sh(["flywheel", "repro"], repo_copy, timeout=1800)
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        assert {"base_models", "train_reward", "train_policy", "evaluate", "bless"} <= _ran(first.stdout)
        socks = warm.runners(repo_copy)  # one: the runner of this workspace and the command's environment
        assert len(socks) == 1, socks
        runner_log = Path(socks[0][: -len(".sock")] + ".log").read_text()
        assert "stage train_policy started" in runner_log and "stage evaluate started" in runner_log, runner_log
    finally:
        warm.stop_workspace(repo_copy)
    again = sh(["dvc", "repro"], repo_copy, timeout=600)
    assert again.returncode == 0, again.stderr
    assert _ran(again.stdout) == {"resolve_champion"}

    blessing = json.loads((repo_copy / "reports/blessing.json").read_text())
    assert blessing["policy"]["blessed"] and blessing["gate"] == "permissive"
    evaluation = json.loads((repo_copy / "metrics/evaluate.json").read_text())
    assert evaluation["judge"]["version"] == "base" and evaluation["policy"]["pref_accuracy"]["n"] > 0
    assert (repo_copy / "reports/evaluate/report.md").is_file()

    release = sh(["flywheel", "release", "--json"], repo_copy, timeout=900)
    assert release.returncode == 0, release.stdout + release.stderr
    rows = {r["model"]: r for r in json.loads(release.stdout.strip().splitlines()[-1])}
    assert rows["policy"]["promoted"] and rows["policy"]["version"] == "2"
    twice = sh(["flywheel", "release", "--json"], repo_copy, timeout=900)
    rows = {r["model"]: r for r in json.loads(twice.stdout.strip().splitlines()[-1])}
    assert rows["policy"]["reasons"] == ["already the champion"]

    status = json.loads(sh(["flywheel", "status", "--json"], repo_copy).stdout)
    champion = [r for r in status if r["model"] == "flywheel-policy" and "champion" in r["aliases"]]
    assert [r["version"] for r in champion] == ["2"]

    rollback = sh(["flywheel", "rollback"], repo_copy)
    assert rollback.returncode == 0 and "v2 -> v1" in rollback.stderr, rollback.stderr

    def eval_reward(model: str) -> dict:
        score = sh(
            ["flywheel", "eval-reward", "--model", model, "--pairs", str(small), "--format", "hh-rlhf", "--json"],
            repo_copy,
        )
        assert score.returncode == 0, score.stderr
        return json.loads(score.stdout)

    # the registry URI resolves to the version trained here (the reward champion was not rolled back): the
    # same figures as the folder it was registered from, and not the base version's
    result = eval_reward("models:/flywheel-reward@champion")
    assert result["n"] > 100 and result == eval_reward("models/challenger/reward")
    assert eval_reward("models:/flywheel-reward/1")["pairwise_accuracy"] != result["pairwise_accuracy"]
