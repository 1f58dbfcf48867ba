"""Registration keyed by content, promotion only when blessed and loadable, rollback, hand-set champions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from flywheel.registry import CHAMPION, POLICY, PREVIOUS, REWARD, Registry, RegistryError, content_hash
from flywheel.release import SmokeParams, bootstrap, promote, release
from flywheel.settings import load_settings
from pipelines.resolve_champion import resolve

# the tiny random policy may well answer with nothing but whitespace: only loading and running are checked
SMOKE = SmokeParams(prompts=["hello"], max_new_tokens=2, timeout_s=60, min_chars=0)


@pytest.fixture
def workspace(tmp_path, repo_root, tiny_base):
    shutil.copy(repo_root / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(tiny_base, tmp_path / "models" / "base")
    settings = load_settings(tmp_path, env={})
    return settings, Registry(settings)


def _challenger(ws_root: Path, tiny_base: Path, tag: str) -> Path:
    """A challenger folder: the tiny models with one byte of difference (a new content hash)."""
    out = ws_root / "models" / f"challenger-{tag}"
    shutil.copytree(tiny_base, out)
    (out / "policy" / "generation_config.json").write_text(json.dumps({"flywheel_tag": tag}))
    (out / "reward" / "note.txt").write_text(tag)
    return out


def _blessing(folder: Path, policy: bool = True, reward: bool = True) -> dict:
    return {"policy": {"blessed": policy, "reasons": [] if policy else ["pref_accuracy: not better beyond noise"]},
            "reward": {"blessed": reward, "reasons": [] if reward else ["pairwise_accuracy: worse"]},
            "candidates": {"policy": content_hash(folder / "policy"), "reward": content_hash(folder / "reward")}}


def test_bootstrap_makes_the_base_models_champion_once(workspace):
    settings, reg = workspace
    base = settings.models / "base"
    assert len(bootstrap(reg, base)) == 2
    assert bootstrap(reg, base) == []
    assert reg.alias(POLICY, CHAMPION).version == "1" and reg.alias(REWARD, CHAMPION).version == "1"
    info = resolve(reg, base)
    assert info["policy"]["version"] == "1"
    assert content_hash(Path(info["policy"]["path"])) == content_hash(base / "policy")


def test_blessed_release_promotes_and_a_second_release_makes_no_new_version(workspace, tiny_base):
    settings, reg = workspace
    bootstrap(reg, settings.models / "base")
    ch = _challenger(settings.root, tiny_base, "a")
    out = release(reg, ch, _blessing(ch), {"git_commit": "abc"}, SMOKE, log=lambda *_: None)
    assert [o.promoted for o in out] == [True, True]
    assert reg.alias(POLICY, CHAMPION).version == "2" and reg.alias(POLICY, PREVIOUS).version == "1"
    assert reg.get(POLICY, "2").tags["git_commit"] == "abc"
    again = release(reg, ch, _blessing(ch), {}, SMOKE, log=lambda *_: None)
    assert [o.created for o in again] == [False, False]
    assert len(reg.versions(POLICY)) == 2


def test_unblessed_or_unloadable_challenger_is_not_promoted(workspace, tiny_base):
    settings, reg = workspace
    bootstrap(reg, settings.models / "base")
    ch = _challenger(settings.root, tiny_base, "b")
    out = release(reg, ch, _blessing(ch, policy=False), {}, SMOKE, log=lambda *_: None)
    assert not out[0].promoted and "not better beyond noise" in out[0].reasons[0]
    assert reg.alias(POLICY, CHAMPION).version == "1"
    assert reg.alias(POLICY, "challenger").version == "2"
    broken = _challenger(settings.root, tiny_base, "c")
    (broken / "policy" / "model.safetensors").write_bytes(b"not a model")
    out = release(reg, broken, _blessing(broken), {}, SMOKE, log=lambda *_: None)
    assert not out[0].promoted and out[0].blessed and not out[0].smoke_ok
    assert any("smoke check failed" in r for r in out[0].reasons)
    assert reg.alias(POLICY, CHAMPION).version == "1"
    with pytest.raises(RegistryError, match="not blessed"):
        promote(reg, "policy", "2")
    with pytest.raises(RegistryError, match="smoke check"):
        promote(reg, "policy", out[0].version)


def test_stale_blessing_is_refused(workspace, tiny_base):
    settings, reg = workspace
    bootstrap(reg, settings.models / "base")
    ch = _challenger(settings.root, tiny_base, "d")
    verdict = _blessing(ch)
    (ch / "policy" / "generation_config.json").write_text("{}")   # changed after evaluation
    out = release(reg, ch, verdict, {}, SMOKE, log=lambda *_: None)
    assert not out[0].promoted and "another model" in out[0].reasons[0]


def test_rollback_resolves_champion_uri_to_the_previous_version(workspace, tiny_base):
    import mlflow

    settings, reg = workspace
    bootstrap(reg, settings.models / "base")
    ch = _challenger(settings.root, tiny_base, "e")
    release(reg, ch, _blessing(ch), {}, SMOKE, log=lambda *_: None)
    new, old = reg.rollback(POLICY)
    assert (new.version, old.version) == ("1", "2")
    local = Path(mlflow.artifacts.download_artifacts("models:/flywheel-policy@champion"))
    assert content_hash(local) == content_hash(settings.models / "base" / "policy")
    with pytest.raises(RegistryError):
        reg.rollback(POLICY, "1")


def test_champion_moved_by_hand_is_honoured(workspace, tiny_base):
    settings, reg = workspace
    bootstrap(reg, settings.models / "base")
    ch = _challenger(settings.root, tiny_base, "f")
    release(reg, ch, _blessing(ch, policy=False), {}, SMOKE, log=lambda *_: None)
    reg.client.set_registered_model_alias(POLICY, CHAMPION, "2")   # what the MLflow UI does
    assert resolve(reg, settings.models / "base")["policy"]["version"] == "2"


def test_smoke_check_fails_an_empty_answer_and_a_slow_model(tiny_base):
    from flywheel.release import smoke_check

    ok, detail = smoke_check("policy", tiny_base / "policy", SmokeParams(prompts=["hello"], max_new_tokens=2,
                                                                          min_chars=10_000))
    assert not ok and "empty answer" in detail
    ok, detail = smoke_check("policy", tiny_base / "policy", SmokeParams(prompts=["hello"], max_new_tokens=2,
                                                                          timeout_s=0.0, min_chars=0))
    assert not ok and "over the bound" in detail
    ok, _ = smoke_check("reward", tiny_base / "reward", SMOKE)
    assert ok


def test_rejected_release_registers_and_tags_but_never_promotes(workspace, tiny_base):
    settings, reg = workspace
    bootstrap(reg, settings.models / "base")
    ch = _challenger(settings.root, tiny_base, "rejected")
    lineage = {"approval": "rejected", "approval_by": "alice", "airflow_run_id": "manual__1"}
    out = release(reg, ch, _blessing(ch), lineage, SMOKE, log=lambda *_: None, hold="release rejected by alice")
    assert [o.promoted for o in out] == [False, False] and all(o.blessed and o.smoke_ok for o in out)
    assert out[0].reasons == ["not promoted: release rejected by alice"]
    assert reg.alias(POLICY, CHAMPION).version == "1"
    tags = reg.get(POLICY, out[0].version).tags
    assert tags["approval"] == "rejected" and tags["approval_by"] == "alice" and tags["airflow_run_id"] == "manual__1"
