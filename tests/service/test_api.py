"""Each endpoint and each error code of the service, in-process with the tiny random models."""

from __future__ import annotations

import json
import time

import pytest
from svc_helpers import dumps, event, make_config, start_api, workspace

CHAT = "/v1/chat/completions"


def _chat(api, scope="chat", **body):
    return api.client.post(
        CHAT, json={"messages": [{"role": "user", "content": "hello"}], **body}, headers=api.h(scope)
    )


def test_health_ready_and_openapi(api):
    assert api.client.get("/healthz").json() == {"status": "ok"}
    ready = api.client.get("/readyz").json()
    assert ready["ready"] and ready["models"]["champion"].startswith("local/")
    spec = api.client.get("/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/feedback", "/v1/feedback/batch", "/healthz", "/readyz", "/metrics"} <= set(
        spec["paths"]
    )
    body = spec["paths"]["/v1/feedback"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/FeedbackIn"} and "FeedbackIn" in spec["components"]["schemas"]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_api_docs_need_no_outside_network(api, page):
    """/docs and /redoc load every script, style and icon from this server (FastAPI's defaults come from a CDN
    and render a blank page on a machine without internet): no external URL in the page, each asset served."""
    import re

    html = api.client.get(page).text
    assert not re.findall(r"https?://[^\s\"'<>]+", html), html
    assets = re.findall(r"(?:src|href)=[\"']([^\"']+)[\"']", html) + re.findall(r"url: ?'([^']+)'", html)
    assert any(a.endswith(".js") for a in assets), html
    for asset in assets:
        assert api.client.get(asset).status_code == 200, asset


def test_chat_answer_carries_id_and_model_version(api):
    r = _chat(api, max_tokens=3, temperature=0)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert (
        body["model_version"] == r.headers["x-model-version"] == api.client.get("/readyz").json()["models"]["champion"]
    )
    assert body["variant"] == "champion" and r.headers["x-answer-id"] == body["id"]
    assert body["usage"]["completion_tokens"] <= 3 and body["choices"][0]["finish_reason"] in ("stop", "length")
    greedy = _chat(api, max_tokens=3, temperature=0).json()["choices"][0]["message"]["content"]
    assert greedy == body["choices"][0]["message"]["content"]  # temperature 0 is deterministic


def test_chat_stream_is_server_sent_events(api):
    with api.client.stream(
        "POST",
        CHAT,
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True},
        headers=api.h("chat"),
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        version = r.headers["x-model-version"]
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model_version"] == version for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_best_of_n_reranks_with_the_reward_model(api, monkeypatch):
    """Three candidates are generated and scored by the reward model; the highest-scored one is returned (the
    spy scores a candidate unlike the first highest, so returning the first would fail)."""
    deadline = time.monotonic() + 60  # /readyz turns 200 with the champion; the reward model loads just after it
    while api.svc.models.slots["reward"] is None and time.monotonic() < deadline:
        time.sleep(0.05)
    reward = api.svc.models.slots["reward"].model
    real_score, calls = reward.score, []

    def spy(prompts, answers):
        real = real_score(prompts, answers)  # the reward model itself runs on every candidate
        assert len(real) == len(answers)
        calls.append(list(answers))
        return [0.0 if a == answers[0] else 1.0 + i for i, a in enumerate(answers)]

    monkeypatch.setattr(reward, "score", spy)
    for _ in range(5):  # a tiny random model may sample three equal candidates; then ask again
        r = _chat(api, max_tokens=6, best_of=3, temperature=1.0)
        assert r.status_code == 200, r.text
        if len(set(calls[-1])) > 1:
            break
    candidates = calls[-1]
    assert len(candidates) == 3 and len(set(candidates)) > 1
    best = max(range(3), key=lambda i: 0.0 if candidates[i] == candidates[0] else 1.0 + i)
    assert best != 0
    content = r.json()["choices"][0]["message"]["content"]
    assert (content or "(empty)") == candidates[best] != candidates[0]
    metrics = api.client.get("/metrics", headers=api.h()).text
    assert "flywheel_generate_batch_rows_bucket" in metrics


def test_concurrent_chat_requests_share_generate_calls(api):
    from concurrent.futures import ThreadPoolExecutor

    before = api.svc.batchers["champion"].batches
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda _: _chat(api, max_tokens=4).status_code, range(16)))
    assert codes == [200] * 16
    assert api.svc.batchers["champion"].batches - before < 16


def test_feedback_is_stored_redacted_once_and_counted(api):
    ev = event(1, prompt=[{"role": "user", "content": "write to jane.doe@example.com or +44 20 7946 0958"}])
    first = api.client.post("/v1/feedback", content=dumps(ev), headers=api.h("feedback"))
    assert first.status_code == 200 and first.json() == {"event_id": "svc-1", "status": "stored", "pii_redacted": 2}
    again = api.client.post("/v1/feedback", content=dumps(ev), headers=api.h("feedback"))
    assert again.json()["status"] == "duplicate"
    with api.svc.store.engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT row FROM feedback_events").scalars().all()
    assert len(rows) == 1 and "jane.doe" not in rows[0] and "[EMAIL]" in rows[0] and "[PHONE]" in rows[0]
    metrics = api.client.get("/metrics", headers=api.h()).text
    assert 'flywheel_feedback_events_total{type="thumbs",model_version="other",outcome="stored"} 1' in metrics
    assert 'flywheel_requests_total{route="/v1/feedback",method="POST",code="200"} 2' in metrics


def test_feedback_naming_an_answer_must_carry_its_model_version(api):
    answer = _chat(api, max_tokens=2).json()
    ok = event(2, model_version=answer["model_version"], answer_id=answer["id"])
    assert api.client.post("/v1/feedback", content=dumps(ok), headers=api.h("feedback")).status_code == 200
    wrong = event(3, model_version="flywheel-policy/99", answer_id=answer["id"])
    r = api.client.post("/v1/feedback", content=dumps(wrong), headers=api.h("feedback"))
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "model_version"]
    unknown = event(4, answer_id="chatcmpl-nope")
    r = api.client.post("/v1/feedback", content=dumps(unknown), headers=api.h("feedback"))
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "answer_id"]
    metrics = api.client.get("/metrics", headers=api.h()).text
    assert f'model_version="{answer["model_version"]}",outcome="stored"}} 1' in metrics


def test_batch_is_all_or_nothing_and_idempotent(api):
    events = [event(i) for i in range(10, 15)]
    r = api.client.post(
        "/v1/feedback/batch", content=dumps({"events": events + [events[0]]}), headers=api.h("feedback")
    )
    assert r.status_code == 200 and (r.json()["stored"], r.json()["duplicates"]) == (5, 1)
    bad = [event(20), event(21, feedback={"type": "rating", "value": 9})]
    r = api.client.post("/v1/feedback/batch", content=dumps({"events": bad}), headers=api.h("feedback"))
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "events", 1, "feedback", "rating", "value"]
    assert api.svc.store.count() == 5  # nothing of the bad batch was stored


@pytest.mark.parametrize(
    "body, loc",
    [
        (b"{not json", ["body"]),
        (b"[]", ["body"]),
        (dumps(event(30, extra_field=1)), ["body", "extra_field"]),
        (dumps(event(31, feedback={"type": "thumbs", "value": "sideways"})), ["body", "feedback", "thumbs", "value"]),
        (dumps(event(32, timestamp="yesterday")), ["body", "timestamp"]),
        (dumps(event(33, prompt=[{"role": "assistant", "content": "hi"}])), ["body", "prompt"]),
        (dumps(event(34, response="x" * 16001)), ["body", "response"]),
    ],
)
def test_feedback_422_names_the_field(api, body, loc):
    r = api.client.post("/v1/feedback", content=body, headers=api.h("feedback"))
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == loc
    assert "input" not in r.json()["detail"][0]  # the input is never echoed


def test_chat_422(api):
    assert _chat(api, max_tokens=10_000).json()["detail"][0]["loc"] == ["body", "max_tokens"]
    assert _chat(api, best_of=99).json()["detail"][0]["loc"] == ["body", "best_of"]
    r = api.client.post(CHAT, json={"messages": [{"role": "user", "content": "x" * 16001}]}, headers=api.h("chat"))
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "messages", 0, "content"]
    r = api.client.post(CHAT, json={"messages": []}, headers=api.h("chat"))
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "messages"]


def test_401_403_without_a_valid_token(api):
    r = api.client.post("/v1/feedback", content=dumps(event(40)))
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    r = api.client.post("/v1/feedback", content=dumps(event(40)), headers={"Authorization": "Bearer fw_forged"})
    assert r.status_code == 401
    assert api.client.post("/v1/feedback", content=dumps(event(40)), headers=api.h("chat")).status_code == 403
    assert _chat(api, scope="feedback").status_code == 403
    assert api.client.get("/metrics").status_code == 401
    assert api.client.get("/metrics", headers=api.h("feedback")).status_code == 403
    assert api.client.post("/v1/feedback", content=dumps(event(40)), headers=api.h("admin")).status_code == 200


def test_a_revoked_token_is_refused_once_the_book_is_older_than_its_max_age(api):
    token = api.tokens["feedback"]
    assert api.client.post("/v1/feedback", content=dumps(event(41)), headers=api.h("feedback")).status_code == 200
    token_id = next(t["token_id"] for t in api.svc.store.list_tokens() if t["scope"] == "feedback")
    assert api.svc.store.revoke_token(token_id) and not api.svc.store.revoke_token(token_id)
    api.svc.tokens.max_age_s = api.svc.tokens.refresh_s = 0.0  # the service defaults: 5 s and 1 s
    r = api.client.post("/v1/feedback", content=dumps(event(42)), headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 401
    assert all(t["token_id"] != token_id for t in api.svc.store.list_tokens())


def test_413_for_oversize_bodies(api):
    big = dumps(event(50, response="y" * 300_000))
    r = api.client.post("/v1/feedback", content=big, headers=api.h("feedback"))
    assert r.status_code == 413
    # no Content-Length (chunked): refused as soon as the limit is passed
    r = api.client.post("/v1/feedback", content=iter([big[:200_000], big[200_000:]]), headers=api.h("feedback"))
    assert r.status_code == 413
    r = api.client.post(CHAT, content=b"{" + b" " * 2_000_000 + b"}", headers=api.h("chat"))
    assert r.status_code == 413


def test_429_past_the_rate_limit(tmp_path, tiny_models):
    config = make_config(tmp_path, tiny_models, feedback_rate={"per_s": 0.5, "burst": 3}, max_best_of=1)
    with start_api(config) as api:
        codes = [
            api.client.post("/v1/feedback", content=dumps(event(60 + i)), headers=api.h("feedback")) for i in range(5)
        ]
        assert [c.status_code for c in codes] == [200, 200, 200, 429, 429]
        assert int(codes[-1].headers["retry-after"]) >= 1
        # another token has its own bucket
        assert api.client.post("/v1/feedback", content=dumps(event(70)), headers=api.h("admin")).status_code == 200


def test_503_before_a_model_is_loaded(tmp_path, tiny_models):
    config = make_config(tmp_path, tiny_models, max_best_of=1)
    config = type(config)(**{**config.__dict__, "fallback_policy": tmp_path / "missing"})
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.auth import create_token

    app = create_app(config)
    token, _ = create_token(app.state.svc.store, "chat")
    with TestClient(app) as client:
        assert client.get("/readyz").status_code == 503
        r = client.post(
            CHAT, json={"messages": [{"role": "user", "content": "hi"}]}, headers={"Authorization": f"Bearer {token}"}
        )
        assert r.status_code == 503 and r.headers["retry-after"]


def test_challenger_split_tags_each_answer(tmp_path, tiny_models):
    class FakeRegistry:
        def alias(self, name, alias):
            from flywheel.registry import Version

            folder = {"champion": "policy", "challenger": "policy2"}[alias]
            return Version(name, {"champion": "1", "challenger": "2"}[alias], str(tiny_models / folder), {}, [alias])

        def local_dir(self, version):
            return version.source

    config = make_config(tmp_path, tiny_models, registry=FakeRegistry(), challenger_fraction=0.5, max_best_of=1)
    with start_api(config) as api:
        seen = {}
        for i in range(24):
            r = _chat(api, max_tokens=2, user=f"user-{i}")
            seen.setdefault(r.json()["variant"], set()).add(r.headers["x-model-version"])
        assert seen == {"champion": {"flywheel-policy/1"}, "challenger": {"flywheel-policy/2"}}
        sticky = {_chat(api, max_tokens=1, user="same-user").json()["variant"] for _ in range(4)}
        assert len(sticky) == 1


def test_prompt_and_answer_are_cut_to_the_models_positions(tmp_path, tiny_models):
    config = make_config(tmp_path, tiny_models, max_new_tokens=256, max_prompt_tokens=512, max_best_of=1)
    with start_api(config) as api:
        long = " ".join(["please help me with my garden"] * 120)  # far over the tiny model's 256 positions
        r = _chat(api, max_tokens=250, temperature=0, messages=[{"role": "user", "content": long}])
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] <= 256


def test_serve_params_fail_naming_the_key(tmp_path):
    from flywheel.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match=r"params.yaml serve.bogus: unknown key"):
        load_settings(workspace(tmp_path, bogus=1), env={})
    with pytest.raises(SettingsError, match=r"params.yaml serve.reload_poll_s: Input should be less than"):
        load_settings(workspace(tmp_path, reload_poll_s=60), env={})


# ---- the security review: poison ids, no echo, per-event rate limit, several scopes, pseudonymised ids ------------
SECRET = "s3cr3t-Zq8X-do-not-echo"


@pytest.mark.parametrize("field", ["event_id", "user_id", "model_version", "conversation_id", "answer_id"])
def test_a_nul_in_an_identifier_is_a_clear_422_and_never_reaches_the_store(api, field):
    r = api.client.post(
        "/v1/feedback", content=dumps(event(80, **{field: SECRET + "\u0000"})), headers=api.h("feedback")
    )
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", field] and "control character (U+0000)" in error["msg"]
    assert SECRET not in r.text
    assert api.svc.store.count() == 0


def _known_answer(api) -> dict:
    return _chat(api, max_tokens=2).json()


@pytest.mark.parametrize(
    "case",
    [
        "event_id",
        "conversation_id",
        "user_id",
        "model_version",
        "answer_id",
        "answer_id_known_model_version",
        "timestamp",
        "role",
        "content",
        "response",
        "feedback_type",
        "thumbs_value",
        "rating_value",
        "rejected",
        "correction",
        "schema_version",
        "prompt",
    ],
)
def test_a_422_never_echoes_the_input(api, case):
    """Each field in turn holds a distinctive secret and is invalid; the body names the field, never the secret."""
    e = event(90)
    if case in ("event_id", "conversation_id", "user_id", "model_version"):
        e[case] = SECRET * 10  # over 128 characters
    elif case == "answer_id":
        e[case] = SECRET  # no such answer
    elif case == "answer_id_known_model_version":
        answer = _known_answer(api)
        e.update(answer_id=answer["id"], model_version=SECRET)  # not the version that gave the answer
    elif case == "timestamp":
        e[case] = SECRET
    elif case == "role":
        e["prompt"] = [{"role": SECRET, "content": "hi"}]
    elif case == "content":
        e["prompt"] = [{"role": "user", "content": SECRET * 2000}]  # over max_text_chars
    elif case == "response":
        e[case] = SECRET * 2000
    elif case == "feedback_type":
        e["feedback"] = {"type": SECRET, "value": "up"}
    elif case == "thumbs_value":
        e["feedback"] = {"type": "thumbs", "value": SECRET}
    elif case == "rating_value":
        e["feedback"] = {"type": "rating", "value": SECRET}
    elif case == "rejected":
        e["feedback"] = {"type": "preference", "rejected": e["response"]}
        e["response"] = e["response"] + " " + SECRET
        e["feedback"]["rejected"] = e["response"]  # equal to the response: refused
    elif case == "correction":
        e["feedback"] = {"type": "correction", "text": SECRET * 2000}
    elif case == "schema_version":
        e[case] = SECRET
    elif case == "prompt":
        e[case] = SECRET
    for path, body in (("/v1/feedback", e), ("/v1/feedback/batch", {"events": [e]})):
        r = api.client.post(path, content=dumps(body), headers=api.h("feedback"))
        assert r.status_code == 422, (path, r.text)
        assert SECRET not in r.text and SECRET[:12] not in r.text, r.text
        assert all(set(d) == {"loc", "msg", "type"} and d["loc"] and d["msg"] for d in r.json()["detail"])


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [{"role": SECRET, "content": "hi"}]},
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": SECRET},
        {"messages": [{"role": "user", "content": "hi"}], "best_of": SECRET},
        {"messages": [{"role": "user", "content": "hi"}], "temperature": SECRET},
        {"messages": [{"role": "user", "content": "hi"}], "user": SECRET * 10},
        {"messages": SECRET},
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 987654},
    ],
)
def test_a_chat_422_never_echoes_the_input(api, body):
    r = api.client.post(CHAT, json=body, headers=api.h("chat"))
    assert r.status_code == 422, r.text
    assert SECRET[:12] not in r.text and "987654" not in r.text
    assert all(set(d) == {"loc", "msg", "type"} for d in r.json()["detail"])


def test_the_feedback_rate_limit_counts_events_not_requests(tmp_path, tiny_models):
    config = make_config(tmp_path, tiny_models, feedback_rate={"per_s": 0.5, "burst": 10}, max_best_of=1)
    with start_api(config) as api:

        def post(events):
            return api.client.post("/v1/feedback/batch", content=dumps({"events": events}), headers=api.h("feedback"))

        assert post([event(100 + i) for i in range(8)]).status_code == 200  # 8 of 10 events spent
        r = post([event(200 + i) for i in range(5)])  # 5 > the 2 left
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and "events/s" in r.json()["detail"]
        assert api.svc.store.count() == 8
        r = post([event(300 + i) for i in range(11)])  # over the whole burst
        assert r.status_code == 429 and "burst of 10" in r.json()["detail"] and r.headers["retry-after"]
        # another token has its own bucket, and a batch within it passes
        r = api.client.post(
            "/v1/feedback/batch", content=dumps({"events": [event(400 + i) for i in range(10)]}), headers=api.h("admin")
        )
        assert r.status_code == 200 and r.json()["stored"] == 10


def test_a_token_with_several_scopes_may_call_each_of_them(api):
    from service.auth import create_token

    token, _ = create_token(api.svc.store, ["chat", "feedback"], "both")
    h = {"Authorization": f"Bearer {token}"}
    assert api.client.post("/v1/feedback", content=dumps(event(110)), headers=h).status_code == 200
    assert (
        api.client.post(
            CHAT, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, headers=h
        ).status_code
        == 200
    )
    r = api.client.get("/metrics", headers=h)
    assert r.status_code == 403 and "'chat,feedback'" in r.json()["detail"]


def test_ids_holding_personal_data_are_stored_pseudonymised_and_erasable(api, monkeypatch):
    from flywheel.redact import pseudonymise_id

    monkeypatch.setenv("FLYWHEEL_PSEUDONYM_KEY", "test-key-" + "x" * 32)
    ev = event(
        120,
        user_id="mary.major@example.org",
        event_id="evt-mary.major@example.org",
        conversation_id="conv-+14155550132",
    )
    r = api.client.post("/v1/feedback", content=dumps(ev), headers=api.h("feedback"))
    assert r.status_code == 200 and r.json()["event_id"] == ev["event_id"] and r.json()["pii_redacted"] == 3
    with api.svc.store.engine.connect() as conn:
        ((event_id, user_id, row),) = conn.exec_driver_sql("SELECT event_id, user_id, row FROM feedback_events").all()
    assert "example.org" not in event_id + user_id + row and "4155550132" not in row
    assert user_id == json.loads(row)["user_id"] == pseudonymise_id("mary.major@example.org")
    again = api.client.post("/v1/feedback", content=dumps(ev), headers=api.h("feedback"))
    assert again.json()["status"] == "duplicate"  # the same id, the same pseudonym
    assert api.svc.store.erase_user("mary.major@example.org") == 1  # erase by the raw id finds it
