"""The preference data the model benchmarks share: the shipped HH-RLHF demo file (both halves, the
project's whole dev file) ingested and prepared by Flywheel's own steps into a temporary workspace."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def prepared_sets(work: Path) -> Path:
    """Ingest both demo halves and run ``prepare``; returns the prepared folder (cached in ``work``)."""
    from flywheel.data.ingest import ingest
    from flywheel.settings import load_params
    from pipelines.prepare import main as prepare

    out = work / "prepared"
    if (out / "pairs-test.jsonl").exists():
        return out
    raw, quarantine = work / "raw", work / "quarantine"
    params = load_params(ROOT / "params.yaml")
    for day, name in enumerate(("hh-rlhf-batch1.jsonl.gz", "hh-rlhf-batch2.jsonl.gz"), start=1):
        ingest(
            [ROOT / "data" / "demo" / name],
            "hh-rlhf",
            raw,
            quarantine,
            params.ingest,
            params.contract,
            workers=1,
            now=datetime(2026, 1, day, tzinfo=UTC),
        )
    prepare(raw, params.prepare, out, work / "prepare.json")
    return out


def params_section(name: str):
    """A section of the repository's params.yaml (demo profile), typed (flywheel/params.py)."""
    from flywheel.settings import load_settings

    return load_settings(ROOT, env={}).params.section(name)


def policy_pairs(base: Path, work: Path) -> tuple[list[dict], list[dict]]:
    """The prepared train and test preference pairs, with the base policy built in ``base`` when missing and
    torch on the machine's 2 cores (what the policy benchmarks start with)."""
    import torch

    from pipelines.base_models import build_policy
    from pipelines.prepare import read_set

    torch.set_num_threads(2)
    if not (base / "model.safetensors").exists():
        build_policy(base)
    prepared = prepared_sets(work)
    return read_set(prepared, "pairs", "train"), read_set(prepared, "pairs", "test")
