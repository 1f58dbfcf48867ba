"""End to end: ingest the demo batches with the CLI in a copy of the repository, then `dvc repro` up to
``prepare``; a second run does nothing, and a changed ``prepare`` param reruns ``prepare`` alone."""

from __future__ import annotations

import json
import re

import pytest

pytestmark = pytest.mark.e2e

STAGES = ("validate", "prepare")


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def test_dvc_repro_is_incremental(repo_copy, sh):
    # ingest through the CLI; each committed batch is `dvc add`-ed
    native = sh(["flywheel", "ingest", "data/demo/native-batch.jsonl", "--json"], repo_copy)
    assert native.returncode == 0, native.stderr
    assert json.loads(native.stdout)["accepted"] == 44
    hh = sh(
        [
            "flywheel",
            "ingest",
            "--format",
            "hh-rlhf",
            "--json",
            "data/demo/hh-rlhf-batch1.jsonl.gz",
            "data/demo/hh-rlhf-batch2.jsonl.gz",
        ],
        repo_copy,
    )
    assert hh.returncode == 0, hh.stderr
    assert json.loads(hh.stdout)["accepted"] == 1486
    assert (repo_copy / "data" / "raw.dvc").is_file()

    first = sh(["dvc", "repro", "prepare"], repo_copy)
    assert first.returncode == 0, first.stdout + first.stderr
    assert _ran(first.stdout) == set(STAGES)
    quality = json.loads((repo_copy / "metrics" / "data_quality.json").read_text())
    assert quality["rows"] == 1530 and quality["expectations_failed"] == 0
    assert len(list((repo_copy / "data" / "prepared").glob("*.jsonl"))) == 12  # pairs, sft, reward_pairs, kto x 3
    stamp = {p: p.stat().st_mtime_ns for p in (repo_copy / "metrics").glob("*.json")}

    second = sh(["dvc", "repro", "prepare"], repo_copy)
    assert second.returncode == 0, second.stdout + second.stderr
    assert _ran(second.stdout) == set()
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in second.stdout
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp
    status = sh(["dvc", "status", *STAGES], repo_copy)
    assert status.returncode == 0 and "up to date" in status.stdout

    shown = sh(["dvc", "metrics", "show"], repo_copy)
    assert shown.returncode == 0, shown.stderr
    row = next(line for line in shown.stdout.splitlines() if line.startswith("metrics/data_quality.json"))
    header = shown.stdout.splitlines()[0]
    for figure in ("rows", "positive_rate", "pii_event_rate", "expectations_failed"):
        assert figure in header
    assert "1530" in row.split() and str(quality["positive_rate"]) in row.split()

    # one prepare param changes: prepare reruns, validate does not
    params = repo_copy / "params.yaml"
    text = params.read_text()
    assert re.search(r"^  near_dup_threshold: 0\.9\b", text, flags=re.M)
    params.write_text(re.sub(r"^  near_dup_threshold: 0\.9\b", "  near_dup_threshold: 0.85", text, flags=re.M))
    status = sh(["dvc", "status", *STAGES], repo_copy)
    assert "prepare" in status.stdout and "validate:" not in status.stdout
    third = sh(["dvc", "repro", "prepare"], repo_copy)
    assert third.returncode == 0, third.stdout + third.stderr
    assert _ran(third.stdout) == {"prepare"}
    assert "Stage 'validate' didn't change, skipping" in third.stdout
    assert "up to date" in sh(["dvc", "status", *STAGES], repo_copy).stdout
