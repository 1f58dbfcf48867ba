"""flywheel.data.erase: a user's data leaves the raw store and the training sets; quarantine retention."""

from __future__ import annotations

import json
import os
import shutil
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shipped import shipped

from flywheel.data import rawstore
from flywheel.data.erase import erase_user, purge_quarantine
from pipelines import prepare


@pytest.fixture
def store(demo_store, tmp_path):
    """A private copy of the demo store, with the training sets prepared from it."""
    raw = tmp_path / "raw"
    shutil.copytree(demo_store.raw, raw)
    prepared = tmp_path / "prepared"
    prepare.main(raw, shipped("prepare"), prepared, tmp_path / "prepare.json")
    return raw, prepared


def rows(raw) -> list[dict]:
    return pa.concat_tables(pq.read_table(f) for f in rawstore.batch_files(raw)).to_pylist()


def records(prepared) -> list[dict]:
    return [json.loads(line) for p in sorted(prepared.glob("*.jsonl")) for line in p.read_text().splitlines()]


def test_erase_user_removes_their_rows_and_records_and_keeps_the_rest(store):
    raw, prepared = store
    before_rows, before_records = rows(raw), records(prepared)
    theirs = [r for r in before_rows if r["user_id"] == "user-03"]
    their_records = [r for r in before_records if "user-03" in r["user_ids"]]
    assert theirs and their_records

    result = erase_user("user-03", raw, prepared)

    assert result.raw_events == len(theirs)
    assert result.training_records == len(their_records)
    after_rows, after_records = rows(raw), records(prepared)
    assert all(r["user_id"] != "user-03" for r in after_rows)
    assert sorted(r["event_id"] for r in after_rows) == sorted(
        r["event_id"] for r in before_rows if r["user_id"] != "user-03"
    )
    assert sum(r["user_id"] is None for r in after_rows) == sum(r["user_id"] is None for r in before_rows) > 0
    assert all("user-03" not in r["user_ids"] for r in after_records)
    assert after_records == [r for r in before_records if "user-03" not in r["user_ids"]]
    assert result.files_rewritten and all(p.endswith(".jsonl") for p in result.files_rewritten)
    # rewritten in place, schema kept, nothing temporary left behind
    for f in rawstore.batch_files(raw):
        assert pq.read_schema(f).equals(rawstore.SCHEMA, check_metadata=False)
    assert not [p for p in raw.rglob("*") if p.name.startswith(rawstore.TMP_PREFIX)]
    assert not [p for p in prepared.iterdir() if p.name.startswith(".tmp-")]
    # the user's id is nowhere in the store any more
    for f in rawstore.batch_files(raw):
        assert "user-03" not in pq.read_table(f).column("user_id").to_pylist()


def test_erase_is_idempotent(store):
    raw, prepared = store
    erase_user("user-05", raw, prepared)
    snapshot = {p: p.read_bytes() for p in list(raw.rglob("*.parquet")) + list(prepared.glob("*.jsonl"))}
    again = erase_user("user-05", raw, prepared)
    assert (again.raw_events, again.training_records, again.files_rewritten) == (0, 0, [])
    assert {p: p.read_bytes() for p in snapshot} == snapshot


def test_unknown_user_changes_nothing(store):
    raw, prepared = store
    mtimes = {p: p.stat().st_mtime_ns for p in list(raw.rglob("*.parquet")) + list(prepared.glob("*.jsonl"))}
    result = erase_user("nobody", raw, prepared)
    assert (result.raw_events, result.training_records) == (0, 0)
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_batch_of_only_that_user_is_removed(tmp_path):
    raw = tmp_path / "raw"
    part = raw / "date=2026-11-27"
    part.mkdir(parents=True)
    base = {name: None for name in rawstore.SCHEMA.names}

    def write(name, users):
        table = pa.Table.from_pylist(
            [{**base, "event_id": f"{name}-{i}", "user_id": u} for i, u in enumerate(users)], schema=rawstore.SCHEMA
        )
        pq.write_table(table, part / f"batch-{name}.parquet")

    write("a", ["gone", "gone"])
    write("b", ["gone", "stay", None])
    result = erase_user("gone", raw, tmp_path / "no-prepared-yet")
    assert result.raw_events == 3 and result.training_records == 0
    assert [f.name for f in rawstore.batch_files(raw)] == ["batch-b.parquet"]
    assert pq.read_table(part / "batch-b.parquet").column("user_id").to_pylist() == ["stay", None]


def test_erase_reaches_the_quarantine(tmp_path):
    q = tmp_path / "quarantine" / "20261127T000000Z-aaaa1111"
    q.mkdir(parents=True)
    base = {name: None for name in rawstore.SCHEMA.names}
    pq.write_table(
        pa.Table.from_pylist(
            [{**base, "event_id": f"q-{i}", "user_id": u} for i, u in enumerate(["gone", "stay", None, "gone"])],
            schema=rawstore.SCHEMA,
        ),
        q / "batch.parquet",
    )
    lines = [
        {"line": 1, "reason": "bad timestamp", "text": '{"event_id": "x", "user_id": "gone", "timestamp": 1}'},
        {"line": 2, "reason": "bad timestamp", "text": '{"event_id": "y", "user_id": "stay"}'},
        {"line": 3, "reason": "not JSON", "text": '{"user_id": "gone", '},
    ]
    (q / "rejected-lines.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))

    result = erase_user("gone", tmp_path / "raw", tmp_path / "prepared", tmp_path / "quarantine")

    assert result.quarantined == 4
    assert pq.read_table(q / "batch.parquet").column("user_id").to_pylist() == ["stay", None]
    kept = [json.loads(x) for x in (q / "rejected-lines.jsonl").read_text().splitlines()]
    assert [x["line"] for x in kept] == [2]
    assert erase_user("gone", tmp_path / "raw", tmp_path / "prepared", tmp_path / "quarantine").quarantined == 0


def test_empty_user_id_is_refused(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        erase_user("", tmp_path / "raw", tmp_path / "prepared")


def _ts(s: str) -> float:
    return datetime.strptime(s, "%Y-%m-%d").replace(tzinfo=UTC).timestamp()


def test_purge_quarantine_removes_only_batches_older_than_retention(tmp_path):
    q = tmp_path / "quarantine"
    # "edge" is exactly 30 days old: not older than the retention
    names = {
        "old": "20261001T120000Z-aaaa1111",
        "edge": "20261028T000000Z-bbbb2222",
        "recent": "20261120T080000Z-cccc3333",
        "today": "20261127T000000Z-dddd4444",
    }
    for name in names.values():
        (q / name).mkdir(parents=True)
        (q / name / "rejected-lines.jsonl").write_text("{}\n")
    odd_old, odd_new = q / "manual-copy", q / "another"
    odd_old.mkdir()
    odd_new.mkdir()
    os.utime(odd_old, (_ts("2026-09-01"), _ts("2026-09-01")))
    os.utime(odd_new, (_ts("2026-11-26"), _ts("2026-11-26")))
    (q / "notes.txt").write_text("a file, not a batch")

    removed = purge_quarantine(q, 30, now=_ts("2026-11-27"))

    assert sorted(removed) == sorted([names["old"], "manual-copy"])
    left = sorted(p.name for p in q.iterdir())
    assert left == sorted([names["edge"], names["recent"], names["today"], "another", "notes.txt"])


def test_purge_with_zero_retention_and_missing_folder(tmp_path):
    q = tmp_path / "quarantine"
    assert purge_quarantine(q, 30) == []
    (q / "20261127T000000Z-aaaa").mkdir(parents=True)
    assert purge_quarantine(q, 30, now=_ts("2026-11-27") + 3600) == []
    assert purge_quarantine(q, 0, now=_ts("2026-11-27") + 3600) == ["20261127T000000Z-aaaa"]
    assert list(q.iterdir()) == []


# ---- ids however encoded, every place user text lives, one lock with export and ingest -----------------------------


def _rejected(path, texts: list[str]) -> None:
    """rejected-lines.jsonl as ingest writes it: the input line's text, UTF-8, not ASCII-escaped."""
    path.write_text(
        "".join(
            json.dumps({"line": i, "reason": "r", "text": t}, ensure_ascii=False) + "\n" for i, t in enumerate(texts, 1)
        ),
        encoding="utf-8",
    )


@pytest.mark.parametrize("user_id", ["józef", "bob@corp"])
def test_erase_finds_an_id_in_the_quarantine_however_it_was_encoded(tmp_path, user_id):
    import unicodedata

    q = tmp_path / "quarantine" / "20261127T000000Z-aaaa1111"
    q.mkdir(parents=True)
    base = {name: None for name in rawstore.SCHEMA.names}
    nfd = unicodedata.normalize("NFD", user_id)
    pq.write_table(
        pa.Table.from_pylist(
            [{**base, "event_id": f"q-{i}", "user_id": u} for i, u in enumerate([user_id, nfd, "stay", None])],
            schema=rawstore.SCHEMA,
        ),
        q / "batch.parquet",
    )
    escaped = "".join(f"\\u{ord(c):04x}" if not c.isalnum() or ord(c) > 127 else c for c in user_id)
    texts = [
        json.dumps({"event_id": "a", "user_id": user_id, "timestamp": 1}, ensure_ascii=False),  # literal, parses
        '{"event_id": "b", "user_id": "' + escaped + '", "timestamp": 1}',  # escaped, parses
        '{"user_id": "' + user_id + '", "prompt": [',  # literal, broken
        '{"user_id": "' + escaped + '", "prompt": [',  # escaped, broken
        '{"user_id": "' + nfd + '", ',  # other form
        '{"event_id": "c", "user_id": "stay"}',
        '{"event_id": "d", "user_id": "' + user_id + 'ina"}',  # another id
        "not json at all",
    ]
    _rejected(q / "rejected-lines.jsonl", texts)

    result = erase_user(user_id, tmp_path / "raw", tmp_path / "prepared", tmp_path / "quarantine")

    assert result.quarantined == 2 + 5
    assert pq.read_table(q / "batch.parquet").column("user_id").to_pylist() == ["stay", None]
    kept = [json.loads(x)["text"] for x in (q / "rejected-lines.jsonl").read_text(encoding="utf-8").splitlines()]
    assert kept == texts[5:]


def test_erase_finds_an_id_in_a_quarantine_record_that_does_not_parse(tmp_path):
    q = tmp_path / "quarantine" / "20261127T000000Z-bbbb2222"
    q.mkdir(parents=True)
    (q / "rejected-lines.jsonl").write_text(
        '{"line": 1, "reason": "r", "text": "{\\"user_id\\": \\"j\\\\u00f3zef\\"\n'
        '{"line": 2, "reason": "r", "text": "{}"}\n',
        encoding="utf-8",
    )
    assert erase_user("józef", tmp_path / "raw", tmp_path / "p", tmp_path / "quarantine").quarantined == 1


def test_erase_reaches_the_raw_store_and_training_sets_in_another_unicode_form(tmp_path):
    import unicodedata

    raw = tmp_path / "raw" / "date=2026-11-27"
    raw.mkdir(parents=True)
    base = {name: None for name in rawstore.SCHEMA.names}
    pq.write_table(
        pa.Table.from_pylist(
            [
                {**base, "event_id": "a", "user_id": unicodedata.normalize("NFD", "józef")},
                {**base, "event_id": "b", "user_id": "stay"},
            ],
            schema=rawstore.SCHEMA,
        ),
        raw / "batch-x.parquet",
    )
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "pairs-train.jsonl").write_text(
        json.dumps({"user_ids": [unicodedata.normalize("NFD", "józef")]})
        + "\n"
        + json.dumps({"user_ids": ["stay"]})
        + "\n"
    )
    result = erase_user("józef", tmp_path / "raw", prepared)
    assert (result.raw_events, result.training_records) == (1, 1)
    assert result.variants == [unicodedata.normalize("NFD", "józef")]  # the feedback store is asked for it too


def test_erase_drops_held_out_evaluation_samples_and_the_answer_cache(tmp_path):
    metrics, report_dir, cache = tmp_path / "metrics/evaluate.json", tmp_path / "reports/evaluate", tmp_path / "cache"
    metrics.parent.mkdir()
    report_dir.mkdir(parents=True)
    cache.mkdir()
    legacy = [
        {
            "prompt": "my neighbour Anna's secret",
            "challenger": "a",
            "champion": "b",
            "judge_challenger": 0.1,
            "judge_champion": 0.2,
        },
        {"prompt": "my bank", "challenger": "c", "champion": "d", "judge_challenger": 0.0, "judge_champion": 0.0},
    ]
    suite = {"suite": "eval/benign.yaml", "prompt": "Name three fruits.", "challenger": "x", "champion": "y"}
    metrics.write_text(json.dumps({"policy": {"samples": legacy + [suite], "pref_accuracy": {"n": 3}}}))
    (report_dir / "report.md").write_text(
        "# report\n\n| table |\n\n## Sample answers\n\n**Prompt:** my neighbour "
        "Anna's secret\n\n- champion (+0.20): b\n"
    )
    (cache / "abc.jsonl").write_text('{"k": "h", "a": "an answer quoting my bank"}\n')
    score_cache = tmp_path / "score-cache"  # beside the answer cache: trunk outputs derived from held-out text
    score_cache.mkdir()
    (score_cache / "scores.sqlite").write_bytes(b"stand-in")
    (score_cache / "scores.sqlite-wal").write_bytes(b"stand-in")

    result = erase_user(
        "anyone", tmp_path / "raw", tmp_path / "prepared", evaluation=(metrics, report_dir), answer_cache=cache
    )

    assert (result.evaluation_samples, result.answer_cache_files) == (2, 3)
    assert not list(score_cache.iterdir())
    data = json.loads(metrics.read_text())
    assert data["policy"]["samples"] == [suite] and data["policy"]["pref_accuracy"] == {"n": 3}
    text = (report_dir / "report.md").read_text()
    assert "Anna" not in text and "| table |" in text
    assert not list(cache.glob("*.jsonl"))
    assert sorted(result.outputs_rewritten) == sorted([str(report_dir), str(metrics)])
    again = erase_user(
        "anyone", tmp_path / "raw", tmp_path / "prepared", evaluation=(metrics, report_dir), answer_cache=cache
    )
    assert (again.evaluation_samples, again.answer_cache_files, again.outputs_rewritten) == (0, 0, [])


def test_evaluation_writes_no_held_out_user_text(tmp_path):
    """evaluate_policy on a tiny model: its metrics quote the shipped suites only; held-out items by index."""
    from flywheel.evaluation.policy_eval import evaluate_policy
    from flywheel.models.policy import load_policy
    from tests.model.conftest import build_policy

    model, tok = load_policy(build_policy(tmp_path / "policy"))

    class Judge:
        def score(self, prompts, answers):
            return [float(len(a) % 3) for a in answers]

    pairs = [
        {
            "prompt": [{"role": "user", "content": f"private-user-text-{i} about my garden"}],
            "chosen": "yes",
            "rejected": "no thank you",
            "source": "preference",
            "split": "test",
            "conversation_id": f"c{i}",
            "event_ids": [f"e{i}"],
            "user_ids": [f"u{i}"],
            "n_turns": 1,
        }
        for i in range(6)
    ]
    params = shipped(
        "evaluate",
        max_prompt_tokens=32,
        max_answer_tokens=8,
        batch_size=8,
        frozen_layers=2,
        judged_prompts=3,
        redteam_prompts=3,
        benign_prompts=2,
        max_new_tokens=3,
        bootstrap=50,
        bf16=False,
    )
    out = evaluate_policy(
        model,
        model,
        model,
        tok,
        Judge(),
        pairs,
        ["say yes", "say no"],
        [{"prompt": "yes", "must_include": [], "must_not_include": ["zzz"]}],
        params,
    )
    assert "private-user-text" not in json.dumps(out)
    assert [s["prompt"] for s in out["samples"]] == ["say yes", "say no"]
    assert all(s["suite"] == "eval/benign.yaml" for s in out["samples"])
    assert {(j["set"], j["item"]) for j in out["judged_items"]} == {("held-out", i) for i in range(3)} | {
        ("red-team", i) for i in range(3)
    }
    # a report from metrics an older evaluation wrote shows none of its held-out samples
    from flywheel.evaluation.report import sample_lines

    legacy = [
        {
            "prompt": "private-user-text-9",
            "challenger": "a",
            "champion": "b",
            "judge_challenger": 0.0,
            "judge_champion": 0.0,
        }
    ]
    assert "private-user-text" not in "\n".join(sample_lines(legacy + out["samples"]))
    assert "say yes" in "\n".join(sample_lines(legacy + out["samples"]))


_HOLDER = """
import subprocess, sys, time
from pathlib import Path
from flywheel import workspace
root, release, child = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
with workspace.locked(root, "holder"):
    print("held", flush=True)
    if child:            # a command this holder starts runs under its lock (a DAG task running flywheel export)
        sys.exit(subprocess.run(child, timeout=120).returncode)
    while not release.exists():
        time.sleep(0.05)
"""


def test_ingest_export_and_erase_share_one_workspace_lock(tmp_path, repo_root, make_event):
    import subprocess
    import sys
    import time
    from pathlib import Path

    from flywheel import workspace

    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copy(repo_root / "params.yaml", ws / "params.yaml")
    batch = tmp_path / "batch.jsonl"
    batch.write_text(
        "".join(
            json.dumps(make_event(feedback={"type": "thumbs", "value": "up" if i % 2 else "down"})) + "\n"
            for i in range(6)
        )
    )
    env = {**os.environ, "FLYWHEEL_ROOT": str(ws), "FLYWHEEL_DVC_REMOTE": ""}
    flywheel = str(Path(sys.executable).with_name("flywheel"))
    release = tmp_path / "release"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(ws), str(release)], env=env, text=True, stdout=subprocess.PIPE
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(workspace.WorkspaceBusy, match=r"busy: holder \(pid \d+\)"):
        with workspace.locked(ws, "impatient", timeout=0.3):
            pass
    commands = {"ingest": ["ingest", str(batch)], "export": ["export"], "erase": ["erase", "--user-id", "user-01"]}
    procs = {}
    for name, args in commands.items():
        procs[name] = subprocess.Popen(
            [flywheel, *args], env=env, text=True, stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"{name}.err", "w")
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not all(
        "waiting for the workspace lock held by holder" in (tmp_path / f"{n}.err").read_text() for n in commands
    ):
        assert all(p.poll() is None for p in procs.values()), "a command ran while the lock was held"
        time.sleep(0.2)
    assert not rawstore.batch_files(ws / "data/raw")  # nothing ingested while the lock was held
    release.write_text("")
    assert holder.wait(30) == 0
    for name, p in procs.items():
        assert p.wait(120) == 0, (tmp_path / f"{name}.err").read_text()
    assert rawstore.batch_files(ws / "data/raw")
    # a command started by the holder itself runs at once
    child = subprocess.run(
        [sys.executable, "-c", _HOLDER, str(ws), str(release), flywheel, "erase", "--user-id", "user-02"],
        env=env,
        text=True,
        capture_output=True,
        timeout=180,
    )
    assert child.returncode == 0 and "waiting" not in child.stderr, child.stderr


def test_erase_deletes_older_evaluation_reports_from_mlflow(tmp_path, repo_root):
    import mlflow

    from flywheel import tracking
    from flywheel.data.erase import evaluation_runs_with_samples, purge_evaluation_artifacts
    from flywheel.settings import load_settings

    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copy(repo_root / "params.yaml", ws / "params.yaml")
    settings = load_settings(ws, env={})
    report = tmp_path / "report.md"
    report.write_text("## Sample answers\n\n**Prompt:** a user's words\n")
    ids = {}
    for name, tags in (("old", {}), ("new", {"flywheel.samples": "suites"})):
        with tracking.stage_run(settings, "evaluate", tags) as run:
            mlflow.log_artifact(str(report))
            ids[name] = run.info.run_id
    runs = evaluation_runs_with_samples(settings)
    assert [r for r, _ in runs] == [ids["old"]]
    assert purge_evaluation_artifacts(runs) == []
    client = mlflow.MlflowClient()
    assert [f.path for f in client.list_artifacts(ids["old"])] == []
    assert [f.path for f in client.list_artifacts(ids["new"])] == ["report.md"]


def test_rewritten_stage_outputs_are_recorded_in_dvc_lock_and_the_stage_still_reruns(tmp_path):
    """What a sync hands other workspaces is the erased training set; the stage's inputs stay as it ran them."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from flywheel import workspace

    dvc = str(Path(sys.executable).with_name("dvc"))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    root = tmp_path / "ws"
    root.mkdir()
    for cmd in (["git", "init", "-q"], [dvc, "init", "-q"]):
        subprocess.run(cmd, cwd=root, check=True, env=env)
    (root / "raw.txt").write_text("a\nb\n")
    (root / "dvc.yaml").write_text(
        "stages:\n  prepare:\n    cmd: mkdir -p prepared && cp raw.txt prepared/x.jsonl\n"
        "    deps: [raw.txt]\n    outs: [prepared]\n"
    )
    subprocess.run([dvc, "repro", "-q"], cwd=root, check=True, env=env)
    lock0 = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["prepare"]
    (root / "raw.txt").write_text("b\n")  # erased from the input...
    (root / "prepared/x.jsonl").write_text("b\n")  # ...and from the output, in place
    assert workspace.commit_outputs(root, [root / "prepared", root / "not-an-output"]) == (["prepared"], [])
    lock1 = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["prepare"]
    assert lock1["outs"] != lock0["outs"] and lock1["deps"] == lock0["deps"]
    status = subprocess.run([dvc, "status", "--json"], cwd=root, env=env, text=True, capture_output=True, check=True)
    assert "prepare" in json.loads(status.stdout)  # its input changed: it reruns at the next repro
    subprocess.run([dvc, "checkout", "--force", "-q"], cwd=root, check=True, env=env)
    assert (root / "prepared/x.jsonl").read_text() == "b\n"  # a checkout brings the erased version, not the old
