"""Regenerate eval/golden/hh-rlhf-golden.jsonl.gz, the golden set (README "The golden set"): the rows of the shipped
HH-RLHF demo batches whose conversation falls in a fixed hash bucket (20%, a hash salted apart from the test
split's, so the two sets are independent). Deterministic; prepare keeps these conversations out of training.

    python scripts/make_golden.py [--pct 20]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "data/demo/hh-rlhf-batch1.jsonl.gz", ROOT / "data/demo/hh-rlhf-batch2.jsonl.gz"]
OUT = ROOT / "eval/golden/hh-rlhf-golden.jsonl.gz"


def main() -> None:
    from flywheel.contract import ContractError, parse_event
    from flywheel.data.events import hh_to_event
    from flywheel.settings import load_params

    contract = load_params(ROOT / "params.yaml").contract

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pct", type=int, default=20, help="share of the demo conversations held out (percent)")
    args = ap.parse_args()
    kept = []
    for src in SOURCES:
        for raw in gzip.open(src, "rb").read().splitlines():
            try:
                event = hh_to_event(raw, "2026-01-01T00:00:00Z")
                parse_event(json.dumps(event), contract.max_text_chars, contract.max_turns)
                conv = event["conversation_id"]
            except ContractError:  # ingest quarantines such a row (an empty answer...): it is no pair to score
                continue
            if int(hashlib.sha256(f"golden:{conv}".encode()).hexdigest()[:8], 16) % 100 < args.pct:
                kept.append(json.loads(raw))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(OUT, "wb", mtime=0) as fh:  # mtime 0: the same bytes on every run
        fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept).encode())
    print(f"{OUT.relative_to(ROOT)}: {len(kept)} pairs")


if __name__ == "__main__":
    main()
