"""The loop closes (tiny profile, real base models): users chat with the champion, leave feedback on its answers,
the feedback is exported into the DVC raw store and trained on, the challenger is released, and the next chat is
answered by the new version, without restarting the service."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.airflow.airflow_helpers import champion, make_workspace, sh
from tests.service.svc_helpers import Server, flywheel

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

QUESTIONS = [
    "How do I water a fern?",
    "What is a good name for a cat?",
    "How can I sleep better?",
    "Tell me a fun fact about the moon.",
    "How do I boil an egg?",
    "What should I pack for a hike?",
    "How do I make my tomatoes grow?",
    "Give me a tip for learning French.",
]


def _serve_params(root: Path) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["serve"].update(
        reload_poll_s=1,
        max_best_of=1,
        chat_rate={"per_s": 1000, "burst": 1000},
        feedback_rate={"per_s": 1000, "burst": 1000},
    )
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _chat(c: httpx.Client, question: str) -> httpx.Response:
    r = c.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": question}], "max_tokens": 8, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    return r


def test_chat_feedback_export_retrain_release_then_the_new_version_answers(tmp_path, repo_root):
    root = make_workspace(tmp_path / "repo", repo_root)
    _serve_params(root)
    tokens = {}
    for scope in ("chat", "feedback"):
        proc = flywheel(root, "tokens", "create", "--scope", scope, "--name", "loop-test")
        assert proc.returncode == 0, proc.stderr
        tokens[scope] = proc.stdout.strip()
    srv = Server(root, []).start(timeout=300)
    try:
        chat = httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {tokens['chat']}"}, timeout=120)
        fb = httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {tokens['feedback']}"}, timeout=60)
        # 1. users chat with the champion (v1, the bootstrapped base model) ...
        answers = []
        for q in QUESTIONS * 2:
            r = _chat(chat, q)
            body = r.json()
            assert body["model_version"] == r.headers["x-model-version"] == "flywheel-policy/1"
            answers.append((q, body["id"], body["choices"][0]["message"]["content"]))
        # 2. ... and leave feedback on those answers: a preferred rewrite and a thumb (mostly up: a batch much
        # more negative or much shorter than the window would be stopped by validate's drift checks)
        events = []
        for i, (q, answer_id, text) in enumerate(answers):
            base = {
                "timestamp": "2026-11-27T10:00:00Z",
                "conversation_id": f"loop-{i}",
                "answer_id": answer_id,
                "model_version": "flywheel-policy/1",
                "user_id": f"user-{i % 4}",
                "prompt": [{"role": "user", "content": q}],
                "response": text or "(empty)",
            }
            events.append(
                {
                    **base,
                    "event_id": f"loop-pref-{i}",
                    "response": f"Happy to help with that. {q} "
                    "Start small, keep it simple, and check back in a few days to see how it went.",
                    "feedback": {"type": "preference", "rejected": text or "(empty)"},
                }
            )
            events.append(
                {
                    **base,
                    "event_id": f"loop-thumb-{i}",
                    "feedback": {"type": "thumbs", "value": "down" if i % 4 == 0 else "up"},
                }
            )
        r = fb.post("/v1/feedback/batch", json={"events": events})
        assert r.status_code == 200 and r.json()["stored"] == len(events), r.text
        # 3. export to the DVC raw store (what the feedback_ingest DAG runs)
        out = flywheel(root, "export", "--json", timeout=300)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout.strip().splitlines()[-1])["exported"] == len(events)
        # 4. retrain and evaluate (dvc repro: validate ... bless), then release
        sh(["dvc", "repro"], root, timeout=1800)
        prepared = [
            json.loads(line)
            for f in (root / "data/prepared").glob("pairs-*.jsonl")
            for line in f.read_text().splitlines()
        ]
        used = {e for rec in prepared for e in rec["event_ids"]}
        # each question was asked twice and its rewrite is the same text: prepare keeps one copy of each
        trained = {e for e in used if e.startswith("loop-pref-")}
        assert {int(e.rsplit("-", 1)[1]) % len(QUESTIONS) for e in trained} == set(range(len(QUESTIONS))), trained
        rel = sh(["flywheel", "release"], root, timeout=900)
        assert champion(root) == "2", rel.stdout
        # 5. the running service switches to the new champion on its own (poll interval 1 s)
        deadline, seen = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            seen = _chat(chat, QUESTIONS[0]).headers["x-model-version"]
            if seen == "flywheel-policy/2":
                break
            time.sleep(0.5)
        assert seen == "flywheel-policy/2"
        body = _chat(chat, QUESTIONS[1]).json()
        assert body["model_version"] == "flywheel-policy/2"
        # feedback on the new version's answers is accepted and attributed to it
        r = fb.post(
            "/v1/feedback",
            json={
                "event_id": "loop-next",
                "timestamp": "2026-11-27T11:00:00Z",
                "conversation_id": "loop-next",
                "answer_id": body["id"],
                "model_version": "flywheel-policy/2",
                "prompt": [{"role": "user", "content": QUESTIONS[1]}],
                "response": body["choices"][0]["message"]["content"] or "(empty)",
                "feedback": {"type": "thumbs", "value": "up"},
            },
        )
        assert r.status_code == 200 and r.json()["status"] == "stored", r.text
    finally:
        srv.stop()
