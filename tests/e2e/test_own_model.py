"""A team's own models through the whole loop: a tiny Qwen2 / Gemma / Phi-3 chat model (its own chat template and
end-of-turn token) and a one-label sequence-classification reward model, named in params.yaml ``models``; LoRA
adapters (``train_policy.adapter: lora``). `dvc repro`, `flywheel release` (adapter-only version on the recorded
base), then `flywheel serve` answers with the new adapter version (``X-Model-Version``)."""

from __future__ import annotations

import json

import httpx
import pytest
import yaml

from tests.e2e.conftest import ingest_demo_rows
from tests.model.families import build_family, build_seqcls_reward
from tests.service.svc_helpers import Server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _own_models(repo, family: str) -> None:
    build_family(repo / "team-models" / "policy", family, layers=4)
    build_seqcls_reward(repo / "team-models" / "reward")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["profile"] = "tiny"
    params["bless"]["gate"] = "permissive"
    params["release"]["smoke"]["min_chars"] = 0  # random weights may answer with nothing: loading and running count
    params["models"]["policy"]["source"] = "team-models/policy"
    params["models"]["policy"]["dtype"] = "float32"
    params["models"]["reward"]["source"] = "team-models/reward"
    params["train_policy"].update(adapter="lora", frozen_layers=2, lora={**params["train_policy"]["lora"], "r": 4})
    params["serve"].update(reload_poll_s=1, max_best_of=1, chat_rate={"per_s": 1000, "burst": 1000})
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.parametrize("family", ["qwen2", "gemma", "phi3"])
def test_the_loop_improves_a_teams_own_model_with_lora_adapters(repo_copy, sh, family):
    _own_models(repo_copy, family)
    ingest_demo_rows(repo_copy, sh)

    repro = sh(["dvc", "repro"], repo_copy, timeout=1500)
    assert repro.returncode == 0, repro.stdout[-3000:] + repro.stderr[-3000:]
    readme = json.loads((repo_copy / "models/base/README.json").read_text())
    assert readme["policy"] == "team-models/policy" and readme["reward"] == "team-models/reward"
    assert (repo_copy / "models/challenger/policy/adapter_config.json").is_file()
    assert json.loads((repo_copy / "metrics/train_policy.json").read_text())["saved"] == "adapter"

    release = sh(["flywheel", "release", "--json"], repo_copy, timeout=900)
    assert release.returncode == 0, release.stdout + release.stderr
    rows = {r["model"]: r for r in json.loads(release.stdout.strip().splitlines()[-1])}
    assert rows["policy"]["promoted"] and rows["policy"]["version"] == "2", json.dumps(rows, indent=1)

    status = json.loads(sh(["flywheel", "status", "--json"], repo_copy).stdout)
    (v2,) = [r for r in status if r["model"] == "flywheel-policy" and r["version"] == "2"]
    assert "champion" in v2["aliases"]

    srv = Server(repo_copy, []).start(timeout=300)
    try:
        token = sh(["flywheel", "tokens", "create", "--scope", "chat", "--name", "e2e"], repo_copy).stdout.strip()
        with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
            r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert r.status_code == 200, r.text
        assert r.headers["x-model-version"] == "flywheel-policy/2"
    finally:
        srv.stop()
    assert "loaded once for the adapter versions" in srv.log
