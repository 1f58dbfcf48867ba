"""LoRA versions in the service: the base model is loaded once, champion and challenger are adapters on it, and a
hot reload swaps the adapter (no base reload) with no failed request; ``X-Model-Version`` names the adapter version."""

from __future__ import annotations

import re

import pytest
from svc_helpers import chat_through_a_switch, flywheel, workspace

from tests.model.families import tiny_lora

pytestmark = pytest.mark.slow
RATES = {"chat_rate": {"per_s": 1000, "burst": 1000}, "feedback_rate": {"per_s": 100000, "burst": 100000}}
LORA = tiny_lora()


def _adapters(ws, family: str):
    """The workspace's base policy (a tiny ``family`` model) and two adapter versions registered on it."""
    from flywheel.registry import CHAMPION, POLICY, Registry, content_hash
    from flywheel.settings import load_settings
    from pipelines.train_policy import fit, save
    from tests.model.conftest import synthetic_pairs
    from tests.model.families import build_family

    base = ws / "models" / "base"
    build_family(base / "policy", family)
    (base / "policy.sha256").write_text(content_hash(base / "policy"))
    registry = Registry(load_settings(ws, env={}))
    versions = []
    for i, swap in enumerate((False, True)):
        model, tok, _, _ = fit(
            base / "policy", synthetic_pairs(8, swap=swap), [], LORA, base / "policy", log=lambda *_: None
        )
        out = ws / f"adapter-{i}"
        assert save(model, tok, out, base / "policy", adapter_only=True) == "adapter"
        versions.append(registry.register(POLICY, out, base=base)[0])
    registry.set_alias(POLICY, CHAMPION, versions[0].version)
    return registry, versions


@pytest.mark.parametrize("family", ["qwen2", "gemma"])
def test_a_hot_reload_swaps_the_adapter_on_one_base_without_a_failed_request(tmp_path, servers, family):
    from flywheel.registry import POLICY

    ws = workspace(tmp_path, max_best_of=1, reload_poll_s=1, **RATES)
    registry, (v1, v2) = _adapters(ws, family)
    assert v1.tags["weights"] == v2.tags["weights"] == "lora adapter"
    proc = flywheel(ws, "tokens", "create", "--scope", "chat", "--name", "tests")
    token = proc.stdout.strip()
    srv = servers(ws, [])
    new = f"{POLICY}/{v2.version}"
    results, mark, _ = chat_through_a_switch(
        srv.url, token, lambda: registry.promote(POLICY, v2.version), new, threads=3, each_side=15
    )
    assert [code for code, _ in results] == [200] * len(results)
    versions = [v for _, v in results]
    assert set(versions[: versions.index(new)]) == {f"{POLICY}/{v1.version}"}
    assert set(versions[mark:]) == {new}
    srv.stop()
    log = srv.log
    assert len(re.findall(r"base model .* loaded once for the adapter versions", log)) == 1, log[-3000:]
    assert re.search(rf"adapter of {POLICY}/{v2.version} added to the shared base model", log), log[-3000:]
