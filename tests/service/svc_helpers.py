"""Helpers of the service tests: tiny models, configs, an in-process app, a real server process, events."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from shipped import shipped

from service.config import ServiceConfig

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("tiny_models", REPO / "tests" / "model" / "conftest.py")
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)
PG_ADMIN = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"


def make_config(
    tmp_path: Path, models: Path, store: str | None = None, registry=None, tracking_uri: str | None = None, **params
) -> ServiceConfig:
    defaults = {
        "max_new_tokens": 16,
        "default_max_tokens": 4,
        "batch_window_ms": 20,
        "chat_rate": {"per_s": 1000, "burst": 1000},
        "feedback_rate": {"per_s": 1000, "burst": 1000},
    }
    contract = shipped("contract")
    return ServiceConfig(
        params=shipped("serve", **{**defaults, **params}),
        feedback_store=store or f"sqlite:///{tmp_path / 'feedback.db'}",
        max_text_chars=contract.max_text_chars,
        max_turns=contract.max_turns,
        max_line_bytes=contract.max_line_bytes,
        fallback_policy=models / "policy",
        fallback_reward=models / "reward",
        registry=registry,
        tracking_uri=tracking_uri,
    )


@dataclass
class Api:
    client: object
    tokens: dict[str, str]
    app: object

    def h(self, scope: str = "admin") -> dict:
        return {"Authorization": f"Bearer {self.tokens[scope]}"}

    @property
    def svc(self):
        return self.app.state.svc


def wait_ready(get, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if get("/readyz").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError("the service did not become ready")


def start_api(config: ServiceConfig):
    """An app with a token per scope, served in-process (lifespan run); a context manager yielding ``Api``."""
    from contextlib import contextmanager

    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.auth import create_token

    @contextmanager
    def run():
        app = create_app(config)
        tokens = {s: create_token(app.state.svc.store, s)[0] for s in ("chat", "feedback", "admin")}
        with TestClient(app) as client:
            wait_ready(client.get)
            yield Api(client, tokens, app)

    return run()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workspace(tmp_path: Path, **serve) -> Path:
    """A workspace folder with the repository's params.yaml, the ``serve`` section overridden."""
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["serve"] = {**params.get("serve", {}), **serve}
    ws = tmp_path / "ws"
    ws.mkdir(exist_ok=True)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return ws


def cli_env(ws: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLYWHEEL_", "AIRFLOW"))}
    env.update(
        FLYWHEEL_ROOT=str(ws),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT="true",
    )
    return env


def flywheel(ws: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("flywheel")
    return subprocess.run([str(exe), *args], cwd=ws, env=cli_env(ws), text=True, capture_output=True, timeout=timeout)


@dataclass
class Server:
    """``flywheel serve`` in a child process; ``url``, ``log`` (its stdout and stderr so far)."""

    ws: Path
    args: list[str]
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120) -> Server:
        exe = Path(sys.executable).with_name("flywheel")
        self.logfile = open(self.ws / f"server-{self.port}.log", "ab")
        self.proc = subprocess.Popen(
            [str(exe), "serve", "--host", "127.0.0.1", "--port", str(self.port), *self.args],
            cwd=self.ws,
            env=cli_env(self.ws),
            stdout=self.logfile,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=2) as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"flywheel serve exited {self.proc.returncode}:\n{self.log[-3000:]}")
                try:
                    if c.get("/readyz").status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"flywheel serve not ready in {timeout} s:\n{self.log[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no flush."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        if getattr(self, "logfile", None):
            self.logfile.close()

    @property
    def log(self) -> str:
        files = sorted(self.ws.glob("server-*.log"))
        return "".join(f.read_text(errors="replace") for f in files)


def event(n: int, **over) -> dict:
    """A valid contract-v1 event with id ``svc-<n>``."""
    e = {
        "event_id": f"svc-{n}",
        "timestamp": "2026-11-27T10:00:00Z",
        "conversation_id": f"conv-{n % 17}",
        "model_version": "policy/1",
        "prompt": [{"role": "user", "content": f"question {n}: how do I water a fern?"}],
        "response": f"answer {n}: when the soil is dry.",
        "user_id": f"user-{n % 5}",
        "feedback": {"type": "thumbs", "value": "up" if n % 3 else "down"},
    }
    e.update(over)
    return e


def dumps(obj) -> bytes:
    return json.dumps(obj).encode()


def chat_through_a_switch(url: str, token: str, switch, new: str, threads: int = 4, each_side: int = 20):
    """Chat from ``threads`` clients without pause; after ``each_side`` answers call ``switch()`` (move an alias),
    wait until the answers carry ``new`` (their ``X-Model-Version``; 60 s at most), then ``each_side`` more.
    Returns ((status, version) per answer, the index from which every answer must be ``new``, seconds to switch)."""
    import threading

    results: list[tuple[int, str]] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
            while not stop.is_set():
                r = c.post(
                    "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
                )
                results.append((r.status_code, r.headers.get("x-model-version", "")))

    workers = [threading.Thread(target=client) for _ in range(threads)]
    for t in workers:
        t.start()
    try:
        while len(results) < each_side:
            time.sleep(0.05)
        switch()
        t0 = time.monotonic()
        while not any(v == new for _, v in results[-threads:]) and time.monotonic() - t0 < 60:
            time.sleep(0.05)
        took = time.monotonic() - t0
        mark = len(results)
        while len(results) < mark + each_side:
            time.sleep(0.05)
    finally:
        stop.set()
        for t in workers:
            t.join(60)
    return results, mark, took
