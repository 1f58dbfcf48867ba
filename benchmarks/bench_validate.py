"""Validate-stage throughput and memory on a generated raw store, beside a bare pandas baseline.

    python benchmarks/bench_validate.py [--sizes 100000 1000000] [--batches 10] [--seed 0] [--workdir benchmarks/out]

For each size a raw store of that many events is built once (Parquet files written directly with
flywheel.data.rawstore.SCHEMA, in --batches batches over several date partitions, every column filled
realistically, texts included) and kept under --workdir. Then, each in its own freshly spawned process:
  pandas baseline     read the same columns, compute the same checks (nulls, unique ids, value set,
                      ranges, label balance, drift of the newest batch) and the same quality metrics
  flywheel validate() pipelines.validate.validate end to end: read, derived columns, Great Expectations
                      (imported lazily inside the call, so import and context set-up are timed) and Data Docs
Only the call is timed; pandas, pyarrow and pipelines.validate are imported first, Great Expectations
is not (validate imports it lazily, so its import and set-up are part of the time).
Printed: seconds, rows/s, CPU seconds, rows per CPU-second, peak RSS, the ratio, and the targets
(>= 200,000 rows/s including GX set-up; peak RSS <= 2 GiB).
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

ROWS_PER_S_TARGET = 200_000


# --- the store --------------------------------------------------------------------------------------------


def build_store(root: Path, n: int, batches: int, seed: int, chunk: int = 100_000) -> None:
    """``n`` events in ``batches`` committed batch files under ``root`` (rawstore layout), written chunk by chunk."""
    import random

    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from flywheel.data import rawstore

    rng = np.random.default_rng(seed)
    tm = gen._TextMaker(random.Random(seed))
    # Pools of realistic texts; each row picks one (answers repeat across rows, which validate never reads).
    answers = pa.array([tm.text(int(x) + 20) for x in rng.gamma(3.0, 210.0, 4000)])
    extras = pa.array([tm.text(int(x) + 20) for x in rng.gamma(2.0, 170.0, 2000)])
    prompts, turns = [], []
    for x in rng.gamma(3.0, 90.0, 4000):
        k = 1 if rng.random() < 0.8 else 3
        msgs = [{"role": "user" if j % 2 == 0 else "assistant", "content": tm.text(int(x) // k + 10)} for j in range(k)]
        prompts.append(json.dumps(msgs, ensure_ascii=False))
        turns.append(k)
    prompts, turns = pa.array(prompts), pa.array(turns, pa.int16())
    types = np.array(["thumbs", "rating", "preference", "correction"], dtype=object)
    root.mkdir(parents=True, exist_ok=True)
    per_batch = -(-n // batches)
    done = 0
    for b in range(batches):
        m_batch = min(per_batch, n - done)
        if m_batch <= 0:
            break
        day = 1 + b * 27 // max(batches - 1, 1)
        batch_id = f"202611{day:02d}T{10 + b % 10:02d}0000Z-{seed:04x}{b:04x}"
        ingested_at = f"2026-11-{day:02d}T{10 + b % 10:02d}:00:00Z"
        part = root / f"date=2026-11-{day:02d}"
        part.mkdir(parents=True, exist_ok=True)
        with pq.ParquetWriter(part / f"batch-{batch_id}.parquet", rawstore.SCHEMA, compression="zstd") as w:
            left = m_batch
            while left > 0:
                m = min(chunk, left)
                ids = np.arange(done, done + m)
                kind = rng.choice(4, m, p=[0.4, 0.3, 0.15, 0.15])
                up = rng.random(m) < 0.65
                rating = rng.choice(np.arange(1, 6), m, p=[0.08, 0.10, 0.17, 0.30, 0.35])
                polarity = np.select(
                    [kind == 0, kind == 1, kind == 3],
                    [np.where(up, 1, -1), np.where(rating >= 4, 1, np.where(rating <= 2, -1, 0)), -1],
                    0,
                )
                ai = pa.array(rng.integers(0, len(answers), m))
                pi = pa.array(rng.integers(0, len(prompts), m))
                ei = rng.integers(0, len(extras), m)
                response = answers.take(ai)
                user = [
                    None if r < 0.1 else f"user-{u:05d}"
                    for r, u in zip(rng.random(m).tolist(), rng.integers(0, 50000, m).tolist())
                ]
                hours, mins = rng.integers(0, 24, m).tolist(), rng.integers(0, 60, m).tolist()
                cols = {
                    "event_id": pa.array([f"bench-{seed}-{i:09d}" for i in ids.tolist()]),
                    "schema_version": pa.array(np.ones(m, np.int8)),
                    "timestamp": pa.array([f"2026-11-{day:02d}T{h:02d}:{mi:02d}:00Z" for h, mi in zip(hours, mins)]),
                    "ingested_at": pa.array([ingested_at] * m),
                    "batch_id": pa.array([batch_id] * m),
                    "conversation_id": pa.array([f"conv-{seed}-{i // 3:08d}" for i in ids.tolist()]),
                    "model_version": pa.array([f"flywheel-policy/{1 + b % 4}"] * m),
                    "user_id": pa.array(user, pa.string()),
                    "prompt": prompts.take(pi),
                    "n_turns": turns.take(pi),
                    "response": response,
                    "response_chars": pc.cast(pc.utf8_length(response), pa.int32()),
                    "feedback_type": pa.array(types[kind].tolist()),
                    "thumbs": pa.array(np.where(up, "up", "down").astype(object), pa.string(), mask=kind != 0),
                    "rating": pa.array(rating.astype(np.int8), mask=kind != 1),
                    "rejected": extras.take(pa.array(ei, mask=kind != 2)),
                    "correction": extras.take(pa.array(ei, mask=kind != 3)),
                    "polarity": pa.array(polarity.astype(np.int8)),
                    "pii_found": pa.array((rng.random(m) < 0.01).astype(np.int16)),
                }
                w.write_table(pa.Table.from_pydict(cols, schema=rawstore.SCHEMA))
                left -= m
                done += m


def cached_store(workdir: Path, n: int, batches: int, seed: int) -> tuple[Path, float]:
    root = workdir / f"store-{n}-b{batches}-seed{seed}"
    if (root / ".complete").exists():
        return root, 0.0
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    build_store(root, n, batches, seed)
    (root / ".complete").write_text("")
    return root, time.perf_counter() - t0


# --- measured calls (run in a child process by _common.measure) -------------------------------------------


def run_baseline(store: str) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from flywheel.settings import load_params
    from pipelines.validate import COLUMNS, FEEDBACK_TYPES, REQUIRED

    p = load_params(common.ROOT / "params.yaml").validate_
    files = sorted(f for f in Path(store).glob("date=*/*.parquet"))
    df = pa.concat_tables(pq.read_table(f, columns=COLUMNS) for f in files).to_pandas()
    n = len(df)
    failures = []
    if n < p.min_rows:
        failures.append("rows")
    nulls = df[REQUIRED].isna().mean()
    failures += [f"nulls({c})" for c, r in nulls.items() if r > p.max_null_rate]
    if not df["event_id"].is_unique:
        failures.append("unique")
    if not df["feedback_type"].isin(FEEDBACK_TYPES).all():
        failures.append("value set")
    rc = df["response_chars"]
    if not rc.between(1, p.max_response_chars).all():
        failures.append("length range")
    r = df["rating"].dropna()
    if not r.between(1, 5).all():
        failures.append("rating range")
    pol = df["polarity"].to_numpy()
    polar = pol[pol != 0]
    pos = float((polar > 0).mean()) if len(polar) else None
    if len(polar) >= p.min_rows and not p.min_positive_rate <= pos <= p.max_positive_rate:
        failures.append("label balance")
    is_new = (df["batch_id"] == df["batch_id"].max()).to_numpy()
    if (~is_new).sum() >= p.min_rows and is_new.sum() >= p.min_rows:
        old_mean = float(rc[~is_new].mean())
        new_mean = float(rc[is_new].mean())
        if not old_mean / p.max_length_drift_ratio <= new_mean <= old_mean * p.max_length_drift_ratio:
            failures.append("length drift")
        if float((pol[is_new] < 0).mean()) > float((pol[~is_new] < 0).mean()) + p.max_negative_rate_rise:
            failures.append("negative drift")
    metrics = {
        "rows": n,
        "batches": int(df["batch_id"].nunique()),
        "conversations": int(df["conversation_id"].nunique()),
        "by_feedback_type": df["feedback_type"].value_counts().to_dict(),
        "positive_rate": pos,
        "negative_rate": float((pol < 0).mean()),
        "pii_event_rate": float((df["pii_found"] > 0).mean()),
        "mean_response_chars": float(rc.mean()),
        "multi_turn_rate": float((df["n_turns"].to_numpy() > 1).mean()),
    }
    return {"rows": n, "failures": failures, "metrics": {k: v for k, v in metrics.items() if k != "by_feedback_type"}}


def run_validate(store: str, docs: str) -> dict:
    from flywheel.settings import load_params
    from pipelines.validate import validate

    params = load_params(common.ROOT / "params.yaml").validate_
    result = validate(Path(store), params, Path(docs))
    return {
        "rows": result.metrics["rows"],
        "failures": result.outcome.failures,
        "metrics": result.metrics,
        "checks": len(result.outcome.results),
    }


# --- driver -----------------------------------------------------------------------------------------------


def _row(name: str, m: dict, n: int) -> str:
    if not m["ok"]:
        return f"  {name:<22} FAILED\n" + "\n".join("    " + ln for ln in m["error"].splitlines())
    return (
        f"  {name:<22} {m['seconds']:>9.2f} {n / m['seconds']:>12,.0f} {m['cpu']:>8.1f}"
        f" {n / m['cpu']:>11,.0f} {common.fmt_rss(m['rss_main']):>11} {common.fmt_rss(m['rss_workers']):>12}"
    )


def bench_size(n: int, batches: int, seed: int, workdir: Path) -> dict:
    store, built = cached_store(workdir, n, batches, seed)
    size = sum(f.stat().st_size for f in store.glob("date=*/*.parquet"))
    files = len(list(store.glob("date=*/*.parquet")))
    print(
        f"\n== {n:,} rows: {store} ({files} batch files, {size / common.MiB:,.1f} MiB"
        f"{f', built in {built:.0f} s' if built else ', cached'}) ==",
        flush=True,
    )
    print(
        f"  {'measurement':<22} {'seconds':>9} {'rows/s':>12} {'CPU s':>8} {'rows/CPU-s':>11}"
        f" {'RSS main':>11} {'RSS children':>12}",
        flush=True,
    )
    res = {}
    res["baseline"] = common.measure(
        "bench_validate", "run_baseline", preload=("pandas", "pyarrow.parquet", "pipelines.validate"), store=str(store)
    )
    print(_row("pandas baseline", res["baseline"], n), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-validate-", dir=workdir) as tmp:
        res["validate"] = common.measure(
            "bench_validate",
            "run_validate",
            preload=("pipelines.validate",),
            store=str(store),
            docs=str(Path(tmp) / "data_docs"),
        )
    print(_row("flywheel validate()", res["validate"], n), flush=True)
    v, b = res["validate"], res["baseline"]
    if v["ok"]:
        print(
            f"  validate: {v['info']['rows']:,} rows, {v['info']['checks']} expectations,"
            f" failed: {v['info']['failures'] or 'none'}"
        )
        if b["ok"]:
            print(f"  baseline failed checks: {b['info']['failures'] or 'none'}")
            print(
                f"  ratio validate / baseline: {b['seconds'] / v['seconds']:.3f}"
                f" (validate takes {v['seconds'] / b['seconds']:.1f}x the time)"
            )
        rate = n / v["seconds"]
        print(
            f"  target >= {ROWS_PER_S_TARGET:,} rows/s including GX set-up: {rate:,.0f}"
            f" -> {common.verdict(rate >= ROWS_PER_S_TARGET)}"
        )
        print(
            f"  target peak RSS <= 2 GiB: {common.fmt_rss(v['rss_max'])}"
            f" -> {common.verdict(v['rss_max'] <= common.RSS_TARGET)}",
            flush=True,
        )
    print("  " + common.load_line(), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--batches", type=int, default=10, help="batch files in the store (default 10)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--workdir",
        type=Path,
        default=common.ROOT / "benchmarks" / "out",
        help="where stores are cached and Data Docs written (default: benchmarks/out, git-ignored)",
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the raw figures to this JSON file")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print("bench_validate: " + common.machine_line())
    all_res = {n: bench_size(n, args.batches, args.seed, args.workdir) for n in args.sizes}
    if args.json:
        args.json.write_text(json.dumps(all_res, indent=2, default=str))


if __name__ == "__main__":
    main()
