"""Shared fixtures: the repository root, an event factory, the shipped demo batches and a demo raw store."""

from __future__ import annotations

import copy
import itertools
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_DIR = REPO_ROOT / "data" / "demo"
NATIVE_DEMO = DEMO_DIR / "native-batch.jsonl"
HH_DEMO = (DEMO_DIR / "hh-rlhf-batch1.jsonl.gz", DEMO_DIR / "hh-rlhf-batch2.jsonl.gz")

_ids = itertools.count(1)


def new_event(**overrides) -> dict:
    """A valid contract-v1 event (thumbs up), unique ids and answer; top-level keys overridden as given."""
    n = next(_ids)
    event = {
        "event_id": f"evt-{n:06d}",
        "timestamp": "2026-11-27T10:00:00Z",
        "conversation_id": f"conv-{n:06d}",
        "model_version": "policy/1",
        "prompt": [{"role": "user", "content": f"Question number {n}: how do I water a fern?"}],
        "response": f"Answer number {n}: water it when the top of the soil feels dry.",
        "user_id": f"user-{n % 7:02d}",
        "feedback": {"type": "thumbs", "value": "up"},
    }
    event.update(copy.deepcopy(overrides))
    return event


@pytest.fixture(scope="session", autouse=True)
def _stop_warm_runners_started_by_tests(tmp_path_factory):
    """Every local `dvc repro` in a test workspace starts that workspace's warm runner (flywheel/warm.py); they
    exit when idle anyway, but not holding their memory past the session is kinder to the next one. Only runners
    serving a workspace under this session's temporary folder are stopped (never another session's)."""
    from flywheel import warm

    base = tmp_path_factory.getbasetemp().resolve()
    yield
    for pid_file in warm.private_dir(create=False).glob("warm-*.sock.pid"):
        try:
            served = Path(pid_file.read_text().splitlines()[1])
        except (OSError, IndexError):
            continue
        if base in served.parents:
            warm.stop(str(pid_file)[: -len(".pid")])


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def make_event():
    """``make_event(**overrides)`` -> a valid event dict with unique ids (overrides replace top-level keys)."""
    return new_event


@pytest.fixture(scope="session")
def native_events() -> list[dict]:
    """The events of the shipped native demo batch."""
    return [json.loads(line) for line in NATIVE_DEMO.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="session")
def demo_files() -> dict[str, Path]:
    return {"native": NATIVE_DEMO, "hh1": HH_DEMO[0], "hh2": HH_DEMO[1]}


@dataclass
class Store:
    raw: Path
    quarantine: Path
    results: list = field(default_factory=list)


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory) -> Store:
    """The three shipped demo batches ingested (a day apart) into a session-wide store. Do not modify it;
    copy it (``shutil.copytree``) to change it."""
    from shipped import shipped

    from flywheel.data.ingest import ingest

    root = tmp_path_factory.mktemp("demo-store")
    store = Store(root / "raw", root / "quarantine")
    batches = [([NATIVE_DEMO], "native"), ([HH_DEMO[0]], "hh-rlhf"), ([HH_DEMO[1]], "hh-rlhf")]
    for day, (files, fmt) in enumerate(batches, start=20):
        result = ingest(
            files,
            fmt,
            store.raw,
            store.quarantine,
            shipped("ingest"),
            shipped("contract"),
            workers=1,
            now=datetime(2026, 11, day, 12, 0, tzinfo=UTC),
        )
        assert result.ok, result.failed_checks
        store.results.append(result)
    return store
