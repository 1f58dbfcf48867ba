"""Registration keyed by content, promotion only when blessed and loadable, rollback, hand-set champions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from shipped import shipped

from flywheel.params import BlessParams
from flywheel.registry import CHALLENGER, CHAMPION, POLICY, PREVIOUS, REWARD, Registry, RegistryError, content_hash
from flywheel.release import GateMismatch, bootstrap, promote, release, rollback
from pipelines.resolve_champion import resolve

# the tiny random policy may well answer with nothing but whitespace: only loading and running are checked
SMOKE = shipped("release").smoke.updated(prompts=["hello"], max_new_tokens=2, timeout_s=60, min_chars=0)
GATES = {"default": "d" * 64}  # the gate in force: name -> rules' sha256 (what `flywheel release` passes)


def _challenger(ws_root: Path, tiny_base: Path, tag: str) -> Path:
    """A challenger folder: the tiny models with one byte of difference (a new content hash)."""
    out = ws_root / "models" / f"challenger-{tag}"
    shutil.copytree(tiny_base, out)
    (out / "policy" / "generation_config.json").write_text(json.dumps({"flywheel_tag": tag}))
    (out / "reward" / "note.txt").write_text(tag)
    return out


def _blessing(folder: Path, policy: bool = True, reward: bool = True, gate: str = "default") -> dict:
    return {
        "policy": {"blessed": policy, "reasons": [] if policy else ["pref_accuracy: not better beyond noise"]},
        "reward": {"blessed": reward, "reasons": [] if reward else ["pairwise_accuracy: worse"]},
        "candidates": {"policy": content_hash(folder / "policy"), "reward": content_hash(folder / "reward")},
        "gate": gate,
        "gate_sha256": gate[0] * 64,
        "judge": "none",
    }


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
    out = release(reg, ch, _blessing(ch), {"git_commit": "abc"}, SMOKE, log=lambda *_: None, gates=GATES)
    assert [o.promoted for o in out] == [True, True]
    assert reg.alias(POLICY, CHAMPION).version == "2" and reg.alias(POLICY, PREVIOUS).version == "1"
    tags = reg.get(POLICY, "2").tags
    assert tags["git_commit"] == "abc" and tags["gate"] == "default" and tags["gate_sha256"] == "d" * 64
    assert tags["judge"] == "none" and "refused" not in tags
    assert reg.alias(POLICY, CHALLENGER) is None  # promoted: no longer a challenger awaiting anything
    again = release(reg, ch, _blessing(ch), {}, SMOKE, log=lambda *_: None, gates=GATES)
    assert [o.created for o in again] == [False, False]
    assert len(reg.versions(POLICY)) == 2


def test_unblessed_or_unloadable_challenger_is_not_promoted(workspace, tiny_base):
    settings, reg = workspace
    bootstrap(reg, settings.models / "base")
    ch = _challenger(settings.root, tiny_base, "b")
    out = release(reg, ch, _blessing(ch, policy=False), {}, SMOKE, log=lambda *_: None, gates=GATES)
    assert not out[0].promoted and "not better beyond noise" in out[0].reasons[0]
    assert reg.alias(POLICY, CHAMPION).version == "1"
    # a refused version is tagged, never served as the challenger (serve.challenger_fraction)
    assert reg.alias(POLICY, CHALLENGER) is None
    assert "not better beyond noise" in reg.get(POLICY, "2").tags["refused"]
    broken = _challenger(settings.root, tiny_base, "c")
    (broken / "policy" / "model.safetensors").write_bytes(b"not a model")
    out = release(reg, broken, _blessing(broken), {}, SMOKE, log=lambda *_: None, gates=GATES)
    assert not out[0].promoted and out[0].blessed and not out[0].smoke_ok
    assert any("smoke check failed" in r for r in out[0].reasons)
    assert reg.alias(POLICY, CHAMPION).version == "1" and reg.alias(POLICY, CHALLENGER) is None
    with pytest.raises(RegistryError, match="never blessed"):
        promote(reg, "policy", "2")
    with pytest.raises(RegistryError, match="smoke check"):
        promote(reg, "policy", out[0].version)


def test_stale_blessing_is_refused(workspace, tiny_base):
    settings, reg = workspace
    bootstrap(reg, settings.models / "base")
    ch = _challenger(settings.root, tiny_base, "d")
    verdict = _blessing(ch)
    (ch / "policy" / "generation_config.json").write_text("{}")  # changed after evaluation
    out = release(reg, ch, verdict, {}, SMOKE, log=lambda *_: None, gates=GATES)
    assert not out[0].promoted and "another model" in out[0].reasons[0]


def test_rollback_resolves_champion_uri_to_the_previous_version(workspace, tiny_base):
    settings, reg = workspace
    bootstrap(reg, settings.models / "base")
    ch = _challenger(settings.root, tiny_base, "e")
    release(reg, ch, _blessing(ch), {}, SMOKE, log=lambda *_: None, gates=GATES)
    new, old = reg.rollback(POLICY)
    assert (new.version, old.version) == ("1", "2")
    from flywheel.models.logged import materialize

    local = materialize("models:/flywheel-policy@champion", settings.root / "rolled-back")
    assert content_hash(local) == content_hash(settings.models / "base" / "policy")
    with pytest.raises(RegistryError):
        reg.rollback(POLICY, "1")


def test_champion_moved_by_hand_is_honoured(workspace, tiny_base):
    settings, reg = workspace
    bootstrap(reg, settings.models / "base")
    ch = _challenger(settings.root, tiny_base, "f")
    release(reg, ch, _blessing(ch, policy=False), {}, SMOKE, log=lambda *_: None, gates=GATES)
    reg.client.set_registered_model_alias(POLICY, CHAMPION, "2")  # what the MLflow UI does
    assert resolve(reg, settings.models / "base")["policy"]["version"] == "2"


def test_a_release_from_another_run_leaves_a_versions_tags_and_lineage_as_they_were(workspace, tiny_base):
    """v3 was trained in loop turn 2 and refused; a later Airflow run that trained nothing releases the same
    folder again: the version's tags (its lineage above all) stay those of the run that produced it."""
    settings, reg = workspace
    bootstrap(reg, settings.models / "base")
    ch = _challenger(settings.root, tiny_base, "lineage")
    turn2 = {"git_commit": "abc", "airflow_run_id": "scheduled__turn2", "loop_run_id": "loop2", "feedback_window": "a"}
    first = release(reg, ch, _blessing(ch, policy=False), turn2, SMOKE, log=lambda *_: None, gates=GATES)
    before = reg.get(POLICY, first[0].version)
    assert before.description.startswith("refused") and "gate default" in before.description
    later = {"git_commit": "def", "airflow_run_id": "manual__nothing", "loop_run_id": "loop3", "feedback_window": "b"}
    again = release(reg, ch, _blessing(ch, policy=False), later, SMOKE, log=lambda *_: None, gates=GATES)
    assert again[0].version == first[0].version and not again[0].created
    after = reg.get(POLICY, first[0].version)
    assert after.tags == before.tags and after.tags["airflow_run_id"] == "scheduled__turn2"
    assert after.description == before.description
    # the champion's description is its verdict, the base model's says what it is
    assert reg.get(REWARD, first[1].version).description.startswith("promoted")
    assert reg.get(POLICY, "1").description.startswith("base model")


def test_smoke_check_fails_an_empty_answer_and_a_slow_model(tiny_base):
    from flywheel.release import smoke_check

    ok, detail = smoke_check("policy", tiny_base / "policy", SMOKE.updated(timeout_s=120, min_chars=10_000))
    assert not ok and "empty answer" in detail
    ok, detail = smoke_check("policy", tiny_base / "policy", SMOKE.updated(timeout_s=1e-9))
    assert not ok and "over the bound" in detail
    ok, _ = smoke_check("reward", tiny_base / "reward", SMOKE)
    assert ok


def test_rejected_release_registers_and_tags_but_never_promotes(workspace, tiny_base):
    settings, reg = workspace
    bootstrap(reg, settings.models / "base")
    ch = _challenger(settings.root, tiny_base, "rejected")
    lineage = {"approval": "rejected", "approval_by": "alice", "airflow_run_id": "manual__1"}
    out = release(
        reg, ch, _blessing(ch), lineage, SMOKE, log=lambda *_: None, gates=GATES, reject="release rejected by alice"
    )
    assert [o.promoted for o in out] == [False, False] and all(o.blessed and o.smoke_ok for o in out)
    assert out[0].reasons == ["not promoted: release rejected by alice"]
    assert reg.alias(POLICY, CHAMPION).version == "1" and reg.alias(POLICY, CHALLENGER) is None
    tags = reg.get(POLICY, out[0].version).tags
    assert tags["approval"] == "rejected" and tags["approval_by"] == "alice" and tags["airflow_run_id"] == "manual__1"
    assert tags["refused"] == "not promoted: release rejected by alice"
    with pytest.raises(RegistryError, match="rejected by alice"):
        promote(reg, "policy", out[0].version)


def test_a_blessing_from_another_gate_is_refused_before_anything_is_registered(workspace, tiny_base):
    settings, reg = workspace
    bootstrap(reg, settings.models / "base")
    ch = _challenger(settings.root, tiny_base, "g")
    with pytest.raises(GateMismatch, match="'permissive' gate, but params.yaml bless.gate is 'default'"):
        release(reg, ch, _blessing(ch, gate="permissive"), {}, SMOKE, log=lambda *_: None, gates=GATES)
    stale = {**_blessing(ch), "gate_sha256": "0" * 64}  # the default gate's rules changed since
    with pytest.raises(GateMismatch, match="other rules"):
        release(reg, ch, stale, {}, SMOKE, log=lambda *_: None, gates=GATES)
    assert len(reg.versions(POLICY)) == 1
    # --allow-gate (tests only): accepted, and the version says which gate blessed it
    out = release(
        reg,
        ch,
        _blessing(ch, gate="permissive"),
        {"gate_override": "--allow-gate permissive"},
        SMOKE,
        log=lambda *_: None,
        gates={**GATES, "permissive": "p" * 64},
    )
    assert out[0].promoted
    tags = reg.get(POLICY, out[0].version).tags
    assert tags["gate"] == "permissive" and tags["gate_override"] == "--allow-gate permissive"
    # by hand, a version of another gate is refused unless that gate is allowed explicitly
    reg.rollback(POLICY, "1")
    with pytest.raises(RegistryError, match="'permissive' gate"):
        promote(reg, "policy", out[0].version, gate="default")
    promote(reg, "policy", out[0].version, gate="default", allow_gate="permissive")


def test_held_release_makes_a_challenger_a_refused_one_never_and_a_stale_alias_is_removed(workspace, tiny_base):
    settings, reg = workspace
    bootstrap(reg, settings.models / "base")
    bad = _challenger(settings.root, tiny_base, "h1")
    release(reg, bad, _blessing(bad, policy=False), {}, SMOKE, log=lambda *_: None, gates=GATES)
    reg.set_alias(POLICY, CHALLENGER, "2")  # what the old release did to every candidate
    good = _challenger(settings.root, tiny_base, "h2")
    out = release(reg, good, _blessing(good), {}, SMOKE, log=lambda *_: None, gates=GATES, hold="A/B first")
    assert not out[0].promoted and out[0].reasons == ["not promoted: A/B first; `challenger` until `flywheel promote`"]
    assert reg.alias(POLICY, CHALLENGER).version == out[0].version == "3"  # blessed, checked, awaiting
    assert reg.alias(POLICY, CHAMPION).version == "1"
    # a later refused candidate takes nothing from it; the stale alias on v2 was removed on the way
    worse = _challenger(settings.root, tiny_base, "h3")
    release(reg, worse, _blessing(worse, policy=False), {}, SMOKE, log=lambda *_: None, gates=GATES)
    assert reg.alias(POLICY, CHALLENGER).version == "3"
    promote(reg, "policy", "3")
    assert reg.alias(POLICY, CHAMPION).version == "3" and reg.alias(POLICY, CHALLENGER) is None
    reg.set_alias(POLICY, CHALLENGER, "4")  # a refused version, by hand: the next release removes it
    release(reg, good, _blessing(good), {}, SMOKE, log=lambda *_: None, gates=GATES)
    assert reg.alias(POLICY, CHALLENGER) is None


def test_rollback_only_to_a_blessed_checked_version_or_the_base_and_no_silent_repromotion(workspace, tiny_base):
    settings, reg = workspace
    bootstrap(reg, settings.models / "base")
    unblessed = _challenger(settings.root, tiny_base, "r1")
    release(reg, unblessed, _blessing(unblessed, policy=False), {}, SMOKE, log=lambda *_: None, gates=GATES)
    broken = _challenger(settings.root, tiny_base, "r2")
    (broken / "policy" / "model.safetensors").write_bytes(b"not a model")
    release(reg, broken, _blessing(broken), {}, SMOKE, log=lambda *_: None, gates=GATES)
    good = _challenger(settings.root, tiny_base, "r3")
    assert release(reg, good, _blessing(good), {}, SMOKE, log=lambda *_: None, gates=GATES)[0].promoted
    assert reg.alias(POLICY, CHAMPION).version == "4"
    with pytest.raises(RegistryError, match="v2 was never blessed"):
        rollback(reg, "policy", "2", gate="default")
    with pytest.raises(RegistryError, match="v3 has not passed its smoke check"):
        rollback(reg, "policy", "3", gate="default")
    assert reg.alias(POLICY, CHAMPION).version == "4"
    new, old, notes = rollback(reg, "policy", "1", gate="default")
    assert (new.version, old.version) == ("1", "4") and "base model (bootstrap)" in notes[0]
    assert "champion moved back to v1" in reg.get(POLICY, "4").tags["rolled_back"]
    # the next release finds its candidate was rolled back from: not promoted again, and it says so
    out = release(reg, good, _blessing(good), {}, SMOKE, log=lambda *_: None, gates=GATES)
    assert not out[0].promoted and out[0].version == "4"
    assert any("was rolled back from" in r and "flywheel promote 4" in r for r in out[0].reasons), out[0].reasons
    assert reg.alias(POLICY, CHAMPION).version == "1" and reg.alias(POLICY, CHALLENGER) is None
    notes = promote(reg, "policy", "4")  # by hand, deliberately: allowed, and said
    assert "rolled back from" in notes[0] and reg.alias(POLICY, CHAMPION).version == "4"


def test_cli_release_refuses_another_gates_blessing_unless_allowed_out_loud(workspace, tiny_base, monkeypatch):
    import yaml
    from typer.testing import CliRunner

    from flywheel.cli import app
    from pipelines.bless import gate_in_force

    settings, reg = workspace
    monkeypatch.setenv("FLYWHEEL_ROOT", str(settings.root))
    monkeypatch.chdir(settings.root)
    params = yaml.safe_load((settings.root / "params.yaml").read_text())
    params["release"]["smoke"].update(min_chars=0, max_new_tokens=2)  # the tiny random policy may answer nothing
    (settings.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    permissive = gate_in_force(BlessParams.model_validate(params["bless"]), "permissive")
    ch = _challenger(settings.root, tiny_base, "cli")
    shutil.copytree(ch, settings.root / "models" / "challenger")
    blessing = {**_blessing(ch), "gate": "permissive", "gate_sha256": permissive.sha256}
    (settings.root / "reports").mkdir()
    (settings.root / "reports" / "blessing.json").write_text(json.dumps(blessing))
    runner = CliRunner()
    refused = runner.invoke(app, ["release", "--json"])
    assert refused.exit_code == 2 and "release refused" in refused.output, refused.output
    assert "bless.gate is 'default'" in refused.output
    assert reg.alias(POLICY, CHAMPION).version == "1" and len(reg.versions(POLICY)) == 1  # bootstrapped only
    allowed = runner.invoke(app, ["release", "--json", "--allow-gate", "permissive"])
    assert allowed.exit_code == 0, allowed.output
    assert "--allow-gate permissive" in allowed.output  # said out loud ...
    tags = reg.get(POLICY, reg.alias(POLICY, CHAMPION).version).tags  # ... and kept on the version
    assert tags["gate"] == "permissive" and "--allow-gate permissive" in tags["gate_override"]
    # by hand: a version the permissive gate blessed is no rollback or promote target under the default gate
    assert runner.invoke(app, ["rollback", "--to", "1"]).exit_code == 0
    again = runner.invoke(app, ["promote", "2"])
    assert again.exit_code == 2 and "'permissive' gate" in again.output, again.output
    status = runner.invoke(app, ["status", "--json"])
    rows = {r["version"]: r for r in json.loads(status.output.strip().splitlines()[-1]) if r["model"] == POLICY}
    assert rows["2"]["gate"] == "permissive" and rows["2"]["rolled_back"] and rows["1"]["aliases"] == ["champion"]
    assert runner.invoke(app, ["status"]).exit_code == 0


def test_a_release_nests_under_its_loop_run_which_carries_the_verdicts_and_figures(workspace, tiny_base):
    """One run tree per loop turn: the register runs sit under the loop run, and the loop run holds the
    release's verdicts, the evaluation's headline figures and the data stages' figures (the MLflow run list's
    columns), in an experiment the MLflow UI opens in model-training mode."""
    import mlflow

    from flywheel import tracking
    from flywheel.cli.models import _log_to_loop
    from flywheel.release import lineage
    from flywheel.settings import load_settings

    settings, _ = workspace
    loop = tracking.start_loop_run(settings, "loop turn 1")
    s = load_settings(settings.root, env={"FLYWHEEL_PARENT_RUN_ID": loop})
    reg = Registry(s)
    bootstrap(reg, s.models / "base")
    (s.root / "metrics").mkdir()
    (s.root / "metrics" / "data_quality.json").write_text(json.dumps({"rows": 120, "by_feedback_type": {"x": 1}}))
    ch = _challenger(s.root, tiny_base, "tree")
    out = release(reg, ch, _blessing(ch, reward=False), lineage(s), SMOKE, log=lambda *_: None, gates=GATES)
    rows = [
        {"model": o.kind, "version": o.version, "promoted": o.promoted, "verdict": "promoted" if o.promoted else "x"}
        for o in out
    ]
    _log_to_loop(s, rows, "default")
    client = mlflow.MlflowClient(s.tracking_uri)
    run = client.get_run(loop)
    assert run.data.tags["verdict_policy"] == f"v{out[0].version} promoted"
    assert run.data.metrics["policy.promoted"] == 1.0 and run.data.metrics["reward.promoted"] == 0.0
    assert run.data.metrics["data.rows"] == 120 and "Release (default gate)" in run.data.tags["mlflow.note.content"]
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{loop}'")
    assert {c.info.run_name for c in children} >= {"register-flywheel-policy", "register-flywheel-reward"}
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
