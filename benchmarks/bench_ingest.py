"""Ingest throughput and memory, beside two baselines, on generated native contract-v1 batches.

    python benchmarks/bench_ingest.py [--sizes 100000 1000000] [--seed 0] [--workdir benchmarks/out]

For each size, three measurements, each in its own freshly spawned process, one after the other:
  pydantic alone          every line through FeedbackEvent.model_validate_json (one process)
  json.loads + Parquet    every line through json.loads, flattened, written with pyarrow (zstd)
  flywheel ingest()       flywheel.data.ingest.ingest into a fresh temporary raw store: contract check,
                          redaction, de-duplication, Parquet, batch checks (Great Expectations,
                          imported lazily inside the call, so its set-up is timed too) and commit
Only the call is timed; the product modules it needs are imported first (as a running service has
them), except Great Expectations, which ingest imports lazily and so is part of the time.
Printed: seconds, events/s, CPU seconds (process and workers), events per CPU-second, peak RSS of the
measuring process and of its largest worker, the ratio of ingest to each baseline, and the targets
(ingest >= 20,000 events/s; peak RSS <= 2 GiB per process).
The input file is generated once per size and seed (benchmarks/gen.py) and kept under --workdir.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import _common as common  # also puts the repository root on sys.path
import gen

EVENTS_PER_S_TARGET = 20_000


# --- measured calls (run in a child process by _common.measure) -------------------------------------------


def run_pydantic(path: str) -> dict:
    from flywheel.contract import FeedbackEvent

    n = 0
    with open(path, "rb") as fh:
        for line in fh:
            FeedbackEvent.model_validate_json(line)
            n += 1
    return {"events": n}


def run_json_parquet(path: str, out: str, chunk: int = 20000) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("event_id", pa.string()),
            ("schema_version", pa.int8()),
            ("timestamp", pa.string()),
            ("conversation_id", pa.string()),
            ("model_version", pa.string()),
            ("user_id", pa.string()),
            ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
            ("response", pa.string()),
            ("feedback_type", pa.string()),
            ("thumbs", pa.string()),
            ("rating", pa.int8()),
            ("rejected", pa.string()),
            ("correction", pa.string()),
        ]
    )
    n = 0
    cols: dict[str, list] = {name: [] for name in schema.names}
    with open(path, "rb") as fh, pq.ParquetWriter(out, schema, compression="zstd") as writer:

        def flush():
            writer.write_table(pa.Table.from_pydict(cols, schema=schema))
            for v in cols.values():
                v.clear()

        for line in fh:
            e = json.loads(line)
            fb = e["feedback"]
            t = fb["type"]
            cols["event_id"].append(e["event_id"])
            cols["schema_version"].append(e.get("schema_version", 1))
            cols["timestamp"].append(e["timestamp"])
            cols["conversation_id"].append(e["conversation_id"])
            cols["model_version"].append(e["model_version"])
            cols["user_id"].append(e.get("user_id"))
            cols["prompt"].append(e["prompt"])
            cols["response"].append(e["response"])
            cols["feedback_type"].append(t)
            cols["thumbs"].append(fb["value"] if t == "thumbs" else None)
            cols["rating"].append(fb["value"] if t == "rating" else None)
            cols["rejected"].append(fb.get("rejected"))
            cols["correction"].append(fb.get("text"))
            n += 1
            if n % chunk == 0:
                flush()
        if cols["event_id"]:
            flush()
    return {"events": n, "parquet_bytes": Path(out).stat().st_size}


def run_ingest(path: str, workdir: str, workers: int | None = None) -> dict:
    from flywheel.data.ingest import ingest
    from flywheel.settings import load_params

    params = load_params(common.ROOT / "params.yaml")
    raw, quarantine = Path(workdir) / "raw", Path(workdir) / "quarantine"
    result = ingest([Path(path)], "native", raw, quarantine, params.ingest, params.contract, workers=workers)
    info = {k: getattr(result, k) for k in ("read", "accepted", "duplicates", "quarantined", "failed_checks")}
    info["pii"] = result.pii
    info["events"] = result.read
    info["parquet_bytes"] = Path(result.batch_file).stat().st_size if result.batch_file else 0
    return info


# --- driver -----------------------------------------------------------------------------------------------


def _row(name: str, m: dict, n: int) -> str:
    if not m["ok"]:
        return f"  {name:<28} FAILED\n" + "\n".join("    " + ln for ln in m["error"].splitlines())
    rate = n / m["seconds"]
    return (
        f"  {name:<28} {m['seconds']:>9.2f} {rate:>12,.0f} {m['cpu']:>8.1f} {n / m['cpu']:>12,.0f}"
        f" {common.fmt_rss(m['rss_main']):>11} {common.fmt_rss(m['rss_workers']):>11}"
        f" {common.fmt_rss(m['rss_max']):>11}"
    )


def bench_size(n: int, seed: int, workdir: Path, workers: int | None) -> dict:
    t0 = time.perf_counter()
    src = gen.cached(workdir, n, seed)
    made = time.perf_counter() - t0
    size = src.stat().st_size
    print(
        f"\n== {n:,} events: {src} ({size / common.MiB:,.1f} MiB"
        f"{f', generated in {made:.0f} s' if made > 1 else ', cached'}) ==",
        flush=True,
    )
    print(
        f"  {'measurement':<28} {'seconds':>9} {'events/s':>12} {'CPU s':>8} {'events/CPU-s':>12}"
        f" {'RSS main':>11} {'RSS workers':>11} {'RSS max':>11}",
        flush=True,
    )
    res = {}
    with tempfile.TemporaryDirectory(prefix="bench-ingest-", dir=workdir) as tmp:
        res["pydantic"] = common.measure("bench_ingest", "run_pydantic", preload=("flywheel.contract",), path=str(src))
        print(_row("pydantic alone", res["pydantic"], n), flush=True)
        res["json_parquet"] = common.measure(
            "bench_ingest",
            "run_json_parquet",
            preload=("pyarrow.parquet",),
            path=str(src),
            out=str(Path(tmp) / "baseline.parquet"),
        )
        print(_row("json.loads + Parquet write", res["json_parquet"], n), flush=True)
        store = Path(tmp) / "ingest"
        res["ingest"] = common.measure(
            "bench_ingest",
            "run_ingest",
            preload=("flywheel.data.ingest", "flywheel.settings"),
            path=str(src),
            workdir=str(store),
            workers=workers,
        )
        print(_row("flywheel ingest()", res["ingest"], n), flush=True)
        shutil.rmtree(store, ignore_errors=True)
    ing = res["ingest"]
    if ing["ok"]:
        info = ing["info"]
        print(
            f"  ingest: read {info['read']:,}, accepted {info['accepted']:,}, duplicates {info['duplicates']:,},"
            f" quarantined {info['quarantined']:,}, failed checks {info['failed_checks'] or 'none'},"
            f" PII redacted {info['pii']}"
        )
        print(f"  ingest CPU: main process {ing['cpu_main']:.1f} s, workers {ing['cpu_workers']:.1f} s")
        if info["accepted"] != n:
            print("  WARNING: not every event was accepted; the figures are not of the normal path")
        rate = n / ing["seconds"]
        for key, label in (("pydantic", "pydantic alone"), ("json_parquet", "json.loads + Parquet")):
            if res[key]["ok"]:
                print(
                    f"  ratio ingest / {label}: {rate / (n / res[key]['seconds']):.2f}"
                    f" (ingest takes {ing['seconds'] / res[key]['seconds']:.2f}x the time)"
                )
        print(
            f"  target ingest >= {EVENTS_PER_S_TARGET:,} events/s: {rate:,.0f}"
            f" -> {common.verdict(rate >= EVENTS_PER_S_TARGET)}"
        )
        print(
            f"  target peak RSS <= 2 GiB per process (judged at 1M): main {common.fmt_rss(ing['rss_main'])},"
            f" largest worker {common.fmt_rss(ing['rss_workers'])}"
            f" -> {common.verdict(ing['rss_max'] <= common.RSS_TARGET)}",
            flush=True,
        )
    print("  " + common.load_line(), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--workdir",
        type=Path,
        default=common.ROOT / "benchmarks" / "out",
        help="where inputs are cached and temporary stores made (default: benchmarks/out, git-ignored)",
    )
    ap.add_argument("--workers", type=int, default=None, help="ingest worker processes (default: ingest's own)")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw figures to this JSON file")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print("bench_ingest: " + common.machine_line())
    all_res = {n: bench_size(n, args.seed, args.workdir, args.workers) for n in args.sizes}
    if args.json:
        args.json.write_text(json.dumps(all_res, indent=2, default=str))


if __name__ == "__main__":
    main()
