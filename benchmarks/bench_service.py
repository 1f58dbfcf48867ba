"""The online service over loopback, beside a bare baseline run in the same invocation.

    python benchmarks/bench_service.py                 # tiny random policy (built in a temp folder)
    python benchmarks/bench_service.py --real          # models/base/policy (run `dvc repro base_models` first)
    python benchmarks/bench_service.py --only feedback --seconds 5 --json out.json

1. feedback: single-event ``POST /v1/feedback`` at ``--conns`` connections (64): ``flywheel serve`` (token check,
   rate limit, contract v1, redaction, group commit into SQLite WAL) vs a bare FastAPI endpoint inserting each
   body into SQLite WAL (no auth, no contract, one commit per request), each alone on the machine in turn;
2. batch: ``POST /v1/feedback/batch`` of ``--batch-events`` events at ``--batch-conns`` connections: events/s;
3. chat: completion tokens/s with 8 concurrent clients vs 1 alone (greedy, ``--max-tokens``).

Servers run as separate processes (uvicorn, one worker, access log off); the load comes from one asyncio
process: a minimal HTTP/1.1 keep-alive client by default (``--client httpx`` for httpx's, slower). Everything
shares the same cores, so quote the ratios beside the absolute figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from fastapi import FastAPI, Request

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TEXT = (
    "My fern's fronds are turning brown at the tips even though I water it twice a week; the pot is by a "
    "north window and the room is heated. Should I mist it, move it, or change the soil? "
)


def bare_app():
    """The baseline: one INSERT and commit into SQLite WAL per request (database path in $BENCH_DB)."""
    import sqlite3

    conn = sqlite3.connect(os.environ["BENCH_DB"], check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE IF NOT EXISTS events (event_id TEXT PRIMARY KEY, body TEXT NOT NULL)")
    app = FastAPI()

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> dict:
        body = await request.body()
        conn.execute("INSERT OR IGNORE INTO events VALUES (?, ?)", (json.loads(body)["event_id"], body.decode()))
        return {"status": "stored"}

    @app.get("/readyz")
    async def readyz() -> dict:
        return {"ready": True}

    return app


def _event(n: int) -> dict:
    pii = " Reach me at jo.smith@example.com." if n % 100 == 0 else ""
    return {
        "event_id": f"bench-{n}",
        "timestamp": "2026-11-27T10:00:00Z",
        "conversation_id": f"c-{n // 3}",
        "model_version": "flywheel-policy/1",
        "user_id": f"u-{n % 97}",
        "prompt": [{"role": "user", "content": TEXT + pii}],
        "response": "Move it a little closer to the light and keep the soil evenly moist, not wet.",
        "feedback": {"type": "thumbs", "value": "up" if n % 3 else "down"},
    }


class _Raw:
    """One keep-alive HTTP/1.1 connection (Content-Length bodies only)."""

    def __init__(self, port: int, headers: str):
        self.port, self.headers = port, headers

    async def open(self):
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n{self.headers}"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
        return int(head[9:12]), await self.reader.readexactly(length)


async def _load(port, path, make_body, conns, seconds, token="", client="raw", on_body=None) -> dict:
    headers = f"Authorization: Bearer {token}\r\n" if token else ""
    lat, codes, counter = [], Counter(), iter(range(10**12))
    deadline = time.perf_counter() + seconds
    if client == "httpx":
        import httpx

        hx = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}",
            limits=httpx.Limits(max_connections=conns),
            headers={"Authorization": f"Bearer {token}"} if token else {},
            timeout=120,
        )

    async def worker():
        conn = await _Raw(port, headers).open() if client == "raw" else None
        while time.perf_counter() < deadline:
            body = make_body(next(counter))
            t0 = time.perf_counter()
            if conn is not None:
                status, data = await conn.post(path, body)
            else:
                r = await hx.post(path, content=body, headers={"Content-Type": "application/json"})
                status, data = r.status_code, r.content
            lat.append(time.perf_counter() - t0)
            codes[status] += 1
            if on_body is not None and status == 200:
                on_body(data)
        if conn is not None:
            conn.writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conns)))
    took = time.perf_counter() - t0
    if client == "httpx":
        await hx.aclose()
    lat.sort()
    q = (lambda p: round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 1)) if lat else (lambda p: None)
    return {
        "requests": len(lat),
        "seconds": round(took, 2),
        "rps": round(len(lat) / took, 1),
        "p50_ms": q(0.5),
        "p99_ms": q(0.99),
        "codes": dict(codes),
    }


def _serve(cmd: list[str], env: dict, port: int, log: Path) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    for _ in range(1200):
        if proc.poll() is not None:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise TimeoutError(f"not ready; see {log}")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _workspace(work: Path, policy: Path, traced: bool) -> tuple[dict, str]:
    import yaml

    from service.auth import create_token
    from service.store import FeedbackStore

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["serve"] = {
        **params.get("serve", {}),
        "access_log": False,
        "max_best_of": 1,
        "chat_rate": {"per_s": 1e6, "burst": 10**6},
        "feedback_rate": {"per_s": 1e6, "burst": 10**6},
        "tracing": {**params["serve"]["tracing"], "enabled": traced},
    }
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    store = FeedbackStore(f"sqlite:///{work / 'feedback.db'}")
    token, _ = create_token(store, "admin", "bench")
    store.close()
    env = {**os.environ, "FLYWHEEL_ROOT": str(work), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return env, token


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=8.0, help="per feedback and batch measurement")
    ap.add_argument("--chat-seconds", type=float, default=15.0)
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--batch-events", type=int, default=500)
    ap.add_argument("--batch-conns", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--real", action="store_true", help="serve models/base/policy instead of the tiny model")
    ap.add_argument("--policy", type=Path, help="serve this policy folder")
    ap.add_argument("--client", choices=["raw", "httpx"], default="raw")
    ap.add_argument("--only", default="feedback,batch,chat")
    ap.add_argument("--json", type=Path)
    ap.add_argument(
        "--tracing", choices=["off", "on", "both"], default="both", help="serve.tracing (both: off, then on)"
    )
    args = ap.parse_args()
    parts, out = set(args.only.split(",")), {}
    work = Path(tempfile.mkdtemp(prefix="bench-service-"))
    policy = args.policy or (ROOT / "models" / "base" / "policy" if args.real else None)
    if policy is None:
        sys.path.insert(0, str(ROOT / "tests" / "model"))
        from conftest import build_policy  # the tiny random model of the tests

        policy = build_policy(work / "tiny-policy")
    print(f"load average before: {os.getloadavg()}; work folder {work}", flush=True)
    feedback_body = lambda n: json.dumps(_event(n)).encode()  # noqa: E731
    if "feedback" in parts:
        port = _port()
        env = {**os.environ, "BENCH_DB": str(work / "bare.db")}
        proc = _serve(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "bench_service:bare_app",
                "--factory",
                "--port",
                str(port),
                "--no-access-log",
                "--log-level",
                "warning",
                "--app-dir",
                str(ROOT / "benchmarks"),
            ],
            env,
            port,
            work / "bare.log",
        )
        try:
            out["feedback_bare"] = asyncio.run(
                _load(port, "/v1/feedback", feedback_body, args.conns, args.seconds, client=args.client)
            )
        finally:
            _stop(proc)
        print("bare FastAPI + SQLite WAL:", out["feedback_bare"], flush=True)
    for traced in {"off": [False], "on": [True], "both": [False, True]}[args.tracing]:
        _service(args, parts, out, work, policy, traced, "_traced" if traced and args.tracing == "both" else "")
        if traced and args.tracing == "both":
            for leg in ("feedback_service", "batch_service", "chat_1", "chat_8"):
                if leg in out:  # throughput with tracing on / off, each alone in turn
                    key = "tokens_per_s" if leg.startswith("chat") else "rps"
                    out[f"tracing_ratio_{leg}"] = round(out[f"{leg}_traced"][key] / out[leg][key], 2)
    if {"feedback", "batch"} & parts:  # every acknowledged event is in the store, once (all ids are unique)
        from service.store import FeedbackStore

        acked = sum(
            r.get("codes", {}).get(200, 0) * (args.batch_events if key.startswith("batch") else 1)
            for key, r in out.items()
            if key.startswith(("feedback_service", "batch_service"))
        )
        store = FeedbackStore(f"sqlite:///{work / 'feedback.db'}")
        out["acknowledged_events"], out["stored_events"] = acked, store.count()
        store.close()
        print(
            f"acknowledged events: {acked}, in the store: {out['stored_events']}"
            + ("" if acked == out["stored_events"] else "  <-- MISMATCH"),
            flush=True,
        )
    out["policy"] = str(policy)
    out["load_average_after"] = os.getloadavg()
    print(json.dumps({k: v for k, v in out.items() if "ratio" in k or "speedup" in k}))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


def _answers(port: int, token: str, n: int) -> list[tuple[str, str]]:
    """``n`` answers to give feedback on: (answer id, model version)."""
    import httpx

    got = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"}) as c:
        for i in range(n):
            chat = {"messages": [{"role": "user", "content": f"tip {i}?"}], "max_tokens": 2, "temperature": 0}
            r = c.post("/v1/chat/completions", json=chat, timeout=60).json()
            got.append((r["id"], r["model_version"]))
    return got


def _settle(port: int, token: str, timeout: float = 300) -> float:
    """Wait until the service's MLflow writer has caught up (flywheel_traces_queued 0); the seconds waited."""
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {token}"}).text
        queued = [ln for ln in text.splitlines() if ln.startswith("flywheel_traces_queued")]
        if not queued or float(queued[0].split()[-1]) <= 0:
            break
        time.sleep(0.5)
    return round(time.monotonic() - t0, 1)


def _service(args, parts: set[str], out: dict, work: Path, policy: Path, traced: bool, suffix: str) -> None:
    """The feedback, batch and chat legs against ``flywheel serve`` (tracing to MLflow on or off)."""
    env, token = _workspace(work, policy, traced)
    port = _port()
    proc = _serve(
        [
            str(Path(sys.executable).with_name("flywheel")),
            "serve",
            "--no-registry",
            "--model-dir",
            str(policy),
            "--port",
            str(port),
        ],
        env,
        port,
        work / "service.log",
    )
    base = (4 if traced else 3) * 10**9  # event ids never repeat across runs (the store is shared)
    try:
        if "feedback" in parts:  # feedback names answers: with tracing on, each becomes an assessment on one
            answers = _answers(port, token, 64)

            def feedback_body(n: int) -> bytes:
                answer_id, version = answers[n % len(answers)]
                return json.dumps({**_event(base + n), "answer_id": answer_id, "model_version": version}).encode()

            out["feedback_service" + suffix] = asyncio.run(
                _load(
                    port,
                    "/v1/feedback",
                    feedback_body,
                    args.conns,
                    args.seconds,
                    token,
                    args.client,
                )
            )
            print(f"flywheel serve /v1/feedback{suffix}:", out["feedback_service" + suffix], flush=True)
            if not suffix:
                out["feedback_ratio"] = round(out["feedback_service"]["rps"] / out["feedback_bare"]["rps"], 2)
        if traced:  # each leg measured from an idle writer: the previous leg's backlog is not this one's cost
            out["tracing_catch_up_s" + suffix] = _settle(port, token)
        if "batch" in parts:
            k = args.batch_events
            body = lambda n: json.dumps({"events": [_event(base + 10**8 + n * k + i) for i in range(k)]}).encode()  # noqa: E731
            r = asyncio.run(_load(port, "/v1/feedback/batch", body, args.batch_conns, args.seconds, token, args.client))
            r["events_per_s"] = round(r["rps"] * k, 1)
            out["batch_service" + suffix] = r
            print(f"flywheel serve /v1/feedback/batch{suffix} ({k} events a request):", r, flush=True)
        if "chat" in parts:
            for conns in (1, 8):
                if traced:
                    out[f"tracing_catch_up_s_before_chat_{conns}"] = _settle(port, token)
                tokens = []
                chat = {
                    "messages": [{"role": "user", "content": "Give me one tip for sleeping well."}],
                    "max_tokens": args.max_tokens,
                    "temperature": 0,
                }
                r = asyncio.run(
                    _load(
                        port,
                        "/v1/chat/completions",
                        lambda n: json.dumps(chat).encode(),
                        conns,
                        args.chat_seconds,
                        token,
                        args.client,
                        on_body=lambda b: tokens.append(json.loads(b)["usage"]["completion_tokens"]),
                    )
                )
                r["tokens_per_s"] = round(sum(tokens) / r["seconds"], 1)
                out[f"chat_{conns}{suffix}"] = r
                print(f"chat{suffix}, {conns} concurrent:", r, flush=True)
            if not suffix:
                out["chat_speedup_8_vs_1"] = round(out["chat_8"]["tokens_per_s"] / out["chat_1"]["tokens_per_s"], 2)
    finally:
        _stop(proc)


if __name__ == "__main__":
    main()
