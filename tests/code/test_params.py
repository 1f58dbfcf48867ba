"""flywheel/params.py: every params.yaml section typed once, checked at load, with no second default in code."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from flywheel.params import SECTION_OF, SECTIONS, MetricRule, ModelGate, Params
from flywheel.settings import SettingsError, load_params, load_settings

SHIPPED = Path(__file__).resolve().parents[2] / "params.yaml"


def _raw() -> dict:
    return yaml.safe_load(SHIPPED.read_text())


def _write(tmp_path: Path, raw: dict) -> Path:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return tmp_path / "params.yaml"


def _set(raw: dict, dotted: str, value) -> dict:
    node = raw
    *path, last = dotted.split(".")
    for part in path:
        node = node[part]
    node[last] = value
    return raw


# ---- the shipped file ----------------------------------------------------------------------------------------


def test_every_top_level_key_of_params_yaml_is_a_typed_section():
    assert set(_raw()) - {"profile", "profiles"} == set(SECTIONS)
    assert set(SECTION_OF) == {typing.get_type_hints(Params)[f] for f in Params.model_fields if f != "profile"}


@pytest.mark.parametrize("profile", [None, *sorted(_raw()["profiles"])])
@pytest.mark.parametrize("cls", list(SECTION_OF), ids=lambda c: SECTION_OF[c])
def test_every_section_of_the_shipped_params_yaml_loads_into_its_model(cls, profile):
    params = load_params(SHIPPED, profile)
    section = params.section(SECTION_OF[cls])
    assert type(section) is cls
    assert params.section("validate") is params.validate_


def test_an_unknown_section_name_is_a_key_error():
    with pytest.raises(KeyError, match="no section 'nope'"):
        load_params(SHIPPED).section("nope")


# ---- a wrong key or type, in every section, fails at load naming the dotted key ------------------------------

UNKNOWN = {  # a misspelt key per section, at the top of the section and, where it has one, inside a nested mapping
    "settings": ["raw_stor"],
    "contract": ["max_turnz"],
    "ingest": ["chunk_event", "checks.max_pii"],
    "validate": ["min_rowz"],
    "prepare": ["shingles", "split.tst_pct"],
    "golden": ["pth"],
    "score_cache": ["max_gib"],
    "models": ["polcy", "policy.sourse"],
    "train_reward": ["epoch"],
    "train_policy": ["learning_rate", "lora.rank"],
    "evaluate": ["bootstraps"],
    "bless": [
        "gate_name",
        "gates.default.policy.primary_min",
        "gates.default.policy.metrics.heldout_pref_accuracy.min_val",
    ],
    "release": ["smok", "smoke.prompt"],
    "review": ["max_ratings"],
    "serve": ["prot", "chat_rate.per_second"],
    "orchestration": ["retry"],
}
WRONG = {  # a value of the wrong type (or out of range) per section
    "settings": ("raw_store", ["a"]),
    "contract": ("max_turns", "many"),
    "ingest": ("checks.max_pii_rate", 2),
    "validate": ("min_rows", "ten"),
    "prepare": ("split.test_pct", 101),
    "golden": ("format", "csv"),
    "score_cache": ("max_gb", -1),
    "models": ("policy.dtype", "float8"),
    "train_reward": ("frozen_encoder", "maybe"),
    "train_policy": ("lr", "fast"),
    "evaluate": ("slices", ["feedback_typ"]),
    "bless": ("gates.default.policy.metrics.heldout_pref_accuracy.direction", "up"),
    "release": ("smoke.timeout_s", "soon"),
    "review": ("max_rating", 9),
    "serve": ("chat_rate.burst", "lots"),
    "orchestration": ("retries", -1),
}


def test_the_tables_below_cover_every_section():
    assert set(UNKNOWN) == set(WRONG) == set(SECTIONS)


@pytest.mark.parametrize("dotted", [f"{s}.{k}" for s, keys in UNKNOWN.items() for k in keys])
def test_an_unknown_key_fails_naming_it_and_what_is_expected(tmp_path, dotted):
    with pytest.raises(SettingsError) as err:
        load_params(_write(tmp_path, _set(_raw(), dotted, 1)))
    assert f"params.yaml {dotted}: unknown key; expected one of " in str(err.value)


@pytest.mark.parametrize("section", sorted(WRONG))
def test_a_wrong_type_fails_naming_the_key(tmp_path, section):
    key, value = WRONG[section]
    with pytest.raises(SettingsError) as err:
        load_params(_write(tmp_path, _set(_raw(), f"{section}.{key}", value)))
    assert f"params.yaml {section}.{key}" in str(err.value)


@pytest.mark.parametrize("section", SECTIONS)
def test_a_missing_section_fails_naming_it(tmp_path, section):
    raw = _raw()
    del raw[section]
    with pytest.raises(SettingsError, match=rf"params.yaml {section}: missing: params.yaml must set it"):
        load_params(_write(tmp_path, raw))


def test_a_missing_key_fails_naming_it(tmp_path):
    raw = _raw()
    del raw["train_policy"]["lr"]
    with pytest.raises(SettingsError, match=r"params.yaml train_policy.lr: missing"):
        load_params(_write(tmp_path, raw))


def test_the_gate_in_force_must_be_defined(tmp_path):
    with pytest.raises(SettingsError, match=r"params.yaml bless.gate: unknown gate 'strict'; defined: default, "):
        load_params(_write(tmp_path, _set(_raw(), "bless.gate", "strict")))


def test_a_profile_that_is_not_chosen_is_checked_too(tmp_path):
    """A profile is one FLYWHEEL_PROFILE or trigger param away from being chosen: its mistakes fail at load."""
    raw = _raw()
    raw["profiles"]["tiny"]["train_policy"]["step"] = 2
    with pytest.raises(SettingsError, match=r"params.yaml profiles.tiny.train_policy.step: unknown key"):
        load_params(_write(tmp_path, raw), "demo")
    raw = _set(_raw(), "profiles.tiny.evaluate.bootstrap", "many")
    with pytest.raises(SettingsError, match=r"params.yaml profiles.tiny.evaluate.bootstrap: "):
        load_params(_write(tmp_path, raw))


def test_updated_copies_are_checked_like_params_yaml():
    policy = load_params(SHIPPED).train_policy
    assert policy.updated(steps=3).steps == 3 and policy.steps == 40
    with pytest.raises(ValidationError):
        policy.updated(lr="fast")
    with pytest.raises(ValidationError):
        policy.updated(learning_rate=1.0)


# ---- no second default ---------------------------------------------------------------------------------------


def _models(cls: type[BaseModel], seen: dict[type[BaseModel], None] | None = None) -> list[type[BaseModel]]:
    """``cls`` and every model reachable from its fields."""
    seen = {} if seen is None else seen
    if cls in seen:
        return list(seen)
    seen[cls] = None
    for field in cls.model_fields.values():
        stack = [field.annotation]
        while stack:
            ann = stack.pop()
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                _models(ann, seen)
            stack.extend(typing.get_args(ann))
    return list(seen)


# the keys a params.yaml may leave out by design: the checks a gate's rule does not apply, a gate's slice rule
LEFT_OUT_BY_DESIGN = {(MetricRule, f) for f in MetricRule.model_fields} | {
    (ModelGate, "slice_rule"),
    (ModelGate, "fallback_primary"),  # left out: no fallback (an unmeasured primary is never blessed)
}


def test_only_keys_left_out_by_design_have_a_default():
    """Every other key of params.yaml must be set there: its value has one home."""
    with_default = {
        (cls, name) for cls in _models(Params) for name, f in cls.model_fields.items() if not f.is_required()
    }
    assert with_default == LEFT_OUT_BY_DESIGN, "a field has a code default: params.yaml is the one home of a value"


def test_a_key_left_out_applies_no_check():
    """So a default can never contradict params.yaml: leaving a rule's key out means no such check, and the
    shipped gates set every check they apply (a rule's keys there are its thresholds, not a second default)."""
    from pipelines.bless import check_rule, judge_model

    for m in ({"challenger": 0.0, "champion": 1.0, "n": 1}, {"challenger": 1.0, "champion": 0.0, "n": 10**6}):
        assert check_rule("anything", m, MetricRule()) == []
    gate = load_params(SHIPPED).bless.gates["permissive"].policy  # no slice_rule in params.yaml
    assert gate.slice_rule is None
    metric = {
        "challenger": 0.6,
        "champion": 0.5,
        "diff": 0.1,
        "ci": [0.05, 0.15],
        "n": 100,
        "slices": {"turns=multi": {"challenger": 0.0, "champion": 1.0, "n": 1000}},
    }
    assert judge_model({"pref_accuracy": metric}, gate)["blessed"]


def test_code_defaults_never_contradict_params_yaml():
    """The defaults that remain mean "no such check" (None, 0, False; a rule's direction: higher is better): none is
    a threshold or size that params.yaml also sets, so none can differ from it."""
    for cls, name in LEFT_OUT_BY_DESIGN:
        default = cls.model_fields[name].get_default(call_default_factory=True)
        assert default in (None, 0, False) or (cls, name, default) == (MetricRule, "direction", "higher"), name


def test_the_old_contradicting_defaults_are_gone():
    """train_policy.lr, train_reward.max_length and frozen_layers each have one value: params.yaml's."""
    import flywheel.models.dpo as dpo
    import flywheel.models.reward as reward
    import pipelines.evaluate as evaluate
    import pipelines.train_policy as train_policy

    for module, name in (
        (dpo, "DPOParams"),
        (reward, "RewardTrainParams"),
        (evaluate, "EvalParams"),
        (train_policy, "PolicyParams"),
    ):
        assert not hasattr(module, name), f"{module.__name__}.{name} is a second home of params.yaml values"
    s = load_settings(SHIPPED.parent, env={})
    raw = _raw()
    assert s.params.train_policy.lr == raw["train_policy"]["lr"]
    assert s.params.train_reward.max_length == raw["train_reward"]["max_length"]
    assert s.params.train_policy.frozen_layers == raw["train_policy"]["frozen_layers"]


# ---- profiles merged once, at load ---------------------------------------------------------------------------


def test_a_profile_is_merged_once_at_load_and_the_steps_get_the_merged_section():
    raw = _raw()
    s = load_settings(SHIPPED.parent, env={"FLYWHEEL_PROFILE": "tiny"})
    tiny = raw["profiles"]["tiny"]["train_policy"]
    assert s.profile == s.params.profile == "tiny"
    section = s.params.section("train_policy")
    assert section is s.params.train_policy  # no re-parse, no second merge
    assert section.steps == tiny["steps"] and section.lr == raw["train_policy"]["lr"]  # siblings kept
    assert "profiles" not in Params.model_fields  # the overrides themselves are not kept
    assert load_settings(SHIPPED.parent, env={}).params.train_policy.steps == raw["train_policy"]["steps"]
