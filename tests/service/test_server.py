"""``flywheel serve`` as a real process on a loopback port: acknowledged feedback survives SIGKILL (once), the
champion alias moves under load without a failed request, logs carry no personal data; ``flywheel tokens
create`` and ``flywheel export`` end to end."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pyarrow.parquet as pq
import pytest
from svc_helpers import chat_through_a_switch, event, flywheel, workspace

from flywheel.data import rawstore
from service.store import FeedbackStore

pytestmark = pytest.mark.slow
RATES = {"chat_rate": {"per_s": 1000, "burst": 1000}, "feedback_rate": {"per_s": 100000, "burst": 100000}}
EMAIL, PHONE = "mary.major@example.org", "+1 415 555 0132"


def _token(ws, scope: str) -> str:
    proc = flywheel(ws, "tokens", "create", "--scope", scope, "--name", "tests")
    assert proc.returncode == 0, proc.stderr
    token = proc.stdout.strip()
    assert token.startswith("fw_") and "shown only now" in proc.stderr
    return token


def test_tokens_create_rejects_an_unknown_scope(tmp_path):
    ws = workspace(tmp_path)
    proc = flywheel(ws, "tokens", "create", "--scope", "root")
    assert proc.returncode == 2 and "unknown scope" in proc.stderr


def test_acknowledged_feedback_survives_sigkill_once_and_exports_once(tmp_path, tiny_models, servers):
    ws = workspace(tmp_path, max_best_of=1, **RATES)
    token = _token(ws, "feedback")
    headers = {"Authorization": f"Bearer {token}"}
    srv = servers(ws, ["--no-registry", "--model-dir", str(tiny_models / "policy")])
    acked: list[str] = []
    sent: dict[str, dict] = {}
    stop = threading.Event()

    def client(worker: int) -> None:
        with httpx.Client(base_url=srv.url, headers=headers, timeout=10) as c:
            n = 0
            while not stop.is_set():
                n += 1
                base = worker * 100000 + n * 10
                batch = [
                    event(base + i, prompt=[{"role": "user", "content": f"mail {EMAIL} or call {PHONE}"}])
                    for i in range(3 if n % 2 else 1)
                ]
                for e in batch:
                    sent[e["event_id"]] = e
                try:
                    if len(batch) == 1:
                        r = c.post("/v1/feedback", json=batch[0])
                    else:
                        r = c.post("/v1/feedback/batch", json={"events": batch})
                except httpx.HTTPError:
                    return  # the server is gone: whatever was in flight was never acknowledged
                if r.status_code == 200:
                    acked.extend(e["event_id"] for e in batch)

    threads = [threading.Thread(target=client, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    while len(acked) < 300:
        time.sleep(0.05)
    srv.kill()  # SIGKILL while the clients are still sending
    stop.set()
    for t in threads:
        t.join(15)
    assert len(acked) >= 300

    srv2 = servers(ws, ["--no-registry", "--model-dir", str(tiny_models / "policy")])
    store = FeedbackStore(f"sqlite:///{ws / 'feedback.db'}")
    stored = store.event_ids()
    assert set(acked) <= set(stored) and len(stored) == len(set(stored))
    with httpx.Client(base_url=srv2.url, headers=headers, timeout=30) as c:  # a client retrying everything
        events = [sent[i] for i in acked]
        for k in range(0, len(events), 500):
            r = c.post("/v1/feedback/batch", json={"events": events[k : k + 500]})
            assert r.status_code == 200 and r.json()["stored"] == 0
    assert store.count() == len(stored)
    with store.engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT row FROM feedback_events").scalars().all()
    assert not any(EMAIL in r or PHONE in r for r in rows)

    out = flywheel(ws, "export", "--json", "--no-track")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["exported"] == len(stored)
    again = flywheel(ws, "export", "--json", "--no-track")
    assert json.loads(again.stdout)["exported"] == 0
    files = rawstore.batch_files(ws / "data" / "raw")
    exported = [i for f in files for i in pq.read_table(f, columns=["event_id"]).column("event_id").to_pylist()]
    assert sorted(exported) == sorted(stored)
    srv2.stop()
    log = srv2.log
    assert EMAIL not in log and PHONE not in log and "user-" not in log
    access = [line for line in log.splitlines() if '"POST /v1/feedback' in line]
    assert access and not any("127.0.0.1:" in line for line in access)  # no client address in access logs


def test_hot_reload_switches_versions_without_a_failed_request(tmp_path, tiny_models, servers):
    from flywheel.registry import CHAMPION, POLICY, Registry
    from flywheel.settings import load_settings

    ws = workspace(tmp_path, max_best_of=1, reload_poll_s=1, **RATES)
    registry = Registry(load_settings(ws, env={}))
    v1, _ = registry.register(POLICY, tiny_models / "policy")
    registry.set_alias(POLICY, CHAMPION, v1.version)
    token = _token(ws, "chat")
    srv = servers(ws, [])
    v2, _ = registry.register(POLICY, tiny_models / "policy2")
    new = f"{POLICY}/{v2.version}"
    results, mark, switched_after = chat_through_a_switch(
        srv.url, token, lambda: registry.promote(POLICY, v2.version), new
    )
    assert [code for code, _ in results] == [200] * len(results)
    versions = [v for _, v in results]
    first_new = versions.index(new)
    assert set(versions[:first_new]) == {f"{POLICY}/{v1.version}"}
    assert set(versions[mark:]) == {new}
    assert switched_after < 10, f"the switch took {switched_after:.1f} s"


def test_cli_erase_reaches_the_feedback_store(tmp_path, tiny_models, servers):
    """...and the service's MLflow traces: the user's conversation and the feedback they gave on another's."""
    ws = workspace(tmp_path, **RATES)
    token = _token(ws, "admin")
    srv = servers(ws, ["--no-registry", "--model-dir", str(tiny_models / "policy")])
    with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as c:
        chats = [
            c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "user": u}).json()
            for u in ("user-gone", "user-stay")
        ]
        named = [{"answer_id": a["id"], "model_version": a["model_version"]} for a in chats]
        r = c.post(
            "/v1/feedback/batch",
            json={
                "events": [event(i, user_id="user-gone" if i % 2 else "user-stay", **named[i % 2]) for i in range(6)]
            },
        )
        assert r.status_code == 200 and r.json()["stored"] == 6
    srv.stop()  # its trace writer wrote what was queued
    proc = flywheel(ws, "erase", "--user-id", "user-gone")
    assert proc.returncode == 0, proc.stderr
    import re

    assert re.search(r"feedback_store_events_removed\W+3\b", proc.stdout), proc.stdout
    # their trace (with the 3 thumbs user-stay gave it), and the 3 they gave user-stay's answer
    assert re.search(r"mlflow_traces_removed\W+1\b", proc.stdout), proc.stdout
    assert re.search(r"mlflow_assessments_removed\W+3\b", proc.stdout), proc.stdout
    store = FeedbackStore(f"sqlite:///{ws / 'feedback.db'}")
    assert sorted(store.event_ids()) == ["svc-0", "svc-2", "svc-4"]


def test_cli_tokens_list_and_revoke(tmp_path):
    ws = workspace(tmp_path)
    token = _token(ws, "chat")
    rows = json.loads(flywheel(ws, "tokens", "list", "--json").stdout)
    assert [(r["scope"], r["name"]) for r in rows] == [("chat", "tests")]
    assert token not in json.dumps(rows) and len(rows[0]["token_id"]) == 12
    proc = flywheel(ws, "tokens", "revoke", rows[0]["token_id"])
    assert proc.returncode == 0 and "revoked" in proc.stderr  # messages go to stderr, data to stdout
    assert json.loads(flywheel(ws, "tokens", "list", "--json").stdout) == []
    again = flywheel(ws, "tokens", "revoke", rows[0]["token_id"])
    assert again.returncode != 0 and "no token with id" in again.stderr
