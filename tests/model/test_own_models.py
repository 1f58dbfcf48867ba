"""The user's own models: decoders of several families, their chat templates, LoRA adapters, sequence-classification
reward models, and the settings that name them (models.policy / models.reward)."""

from __future__ import annotations

import copy
import json

import pytest
from shipped import shipped

from flywheel.evaluation.policy_eval import implicit_margins
from flywheel.evaluation.stats import correct_from_margin
from flywheel.models.dpo import attach_lora, train_dpo
from flywheel.models.policy import (
    UnsupportedModel,
    check_split,
    decoder_layers,
    encode,
    end_token,
    generate,
    is_adapter,
    load_policy,
)
from flywheel.models.reward import RewardModel, pairwise_correct, train_reward
from flywheel.models.sources import ModelSourceError, resolve
from tests.model.conftest import synthetic_pairs
from tests.model.families import FAMILIES, TEMPLATES, build_family, build_seqcls_reward

DPO = dict(
    frozen_layers=2, steps=12, batch_size=4, lr=5e-3, warmup_steps=1, beta=0.5, sft_weight=0.0, frozen_bf16=False
)
EVAL = shipped("evaluate", max_prompt_tokens=32, max_answer_tokens=8, batch_size=8, frozen_layers=2, bf16=False)


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: build_family(root / f, f) for f in FAMILIES}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_splits_exactly_and_ends_turns_by_its_template(family_dir, family):
    model, tok = load_policy(family_dir[family])
    expected_end = TEMPLATES[FAMILIES[family][2]][2]
    assert tok.convert_ids_to_tokens(end_token(tok)) == expected_end
    for k in range(len(decoder_layers(model)[1])):
        check_split(model, tok, k)  # raises unless trunk + top == the whole forward
    answers = generate(model, tok, [[{"role": "user", "content": "yes"}]] * 2, max_new_tokens=3, batch_size=2)
    assert len(answers) == 2


@pytest.mark.parametrize("family", ["qwen2", "gemma", "phi3", "gpt_neox"])
def test_dpo_learns_the_planted_preference_on_each_family(family_dir, family):
    model, tok = load_policy(family_dir[family])
    ref = copy.deepcopy(model)
    train_dpo(model, encode(tok, synthetic_pairs(16), 32, 8), [], tok.pad_token_id, shipped("train_policy", **DPO))
    m = implicit_margins(ref, {"good": model}, tok, synthetic_pairs(8, start=100), EVAL)
    assert sum(correct_from_margin(m["good"])) / 8 == 1.0


def test_an_architecture_the_split_cannot_reproduce_is_refused(tmp_path):
    """Granite scales its embeddings inside the decoder and its logits in the head: the cached-trunk split would
    compute something else, so it is refused by name, not trained wrongly."""
    FAMILIES["granite"] = ("GraniteConfig", {"embedding_multiplier": 12.0, "logits_scaling": 8.0}, "chatml")
    try:
        model, tok = load_policy(build_family(tmp_path / "granite", "granite"))
    finally:
        del FAMILIES["granite"]
    with pytest.raises(UnsupportedModel, match="'granite'.*does not reproduce"):
        check_split(model, tok, 1)


def test_a_tokenizer_without_chat_template_is_refused_naming_the_setting(family_dir, tmp_path):
    model, tok = load_policy(family_dir["qwen2"])
    tok.chat_template = None
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(UnsupportedModel, match="models.policy.chat_template"):
        load_policy(tmp_path / "m")


def test_frozen_layers_beyond_the_models_depth_names_the_setting(family_dir):
    model, tok = load_policy(family_dir["qwen2"])
    with pytest.raises(
        ValueError, match=r"train_policy.frozen_layers is 4, but the policy has 4 layers: set it to 0\.\.3"
    ):
        train_dpo(
            model,
            encode(tok, synthetic_pairs(4), 32, 8),
            [],
            tok.pad_token_id,
            shipped("train_policy", **{**DPO, "frozen_layers": 4}),
        )


# ---- LoRA adapters ------------------------------------------------------------------------------------------


def _lora(**over):
    return shipped("train_policy", **{**DPO, "adapter": "lora", "lr": 2e-2, "lora": {"r": 8, "alpha": 16}, **over})


@pytest.mark.parametrize("family", ["qwen2", "phi3"])
def test_lora_on_the_top_layers_learns_and_swapped_labels_unlearn(family_dir, family):
    test = synthetic_pairs(8, start=100)
    out = {}
    for name, swap in (("good", False), ("bad", True)):
        base, tok = load_policy(family_dir[family])
        ref = copy.deepcopy(base)
        model = attach_lora(base, _lora())
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trained and all("lora_" in n for n in trained)
        assert all(int(n.split("layers.")[1].split(".")[0]) >= 2 for n in trained)  # only the layers above the trunk
        train_dpo(model, encode(tok, synthetic_pairs(16, swap=swap), 32, 8), [], tok.pad_token_id, _lora())
        out[name] = model.merge_and_unload()
    m = implicit_margins(ref, out, tok, test, EVAL)
    assert sum(correct_from_margin(m["good"])) / 8 == 1.0
    assert sum(correct_from_margin(m["bad"])) / 8 == 0.0


def test_a_lora_challenger_is_adapter_only_and_loads_on_its_base(family_dir, tmp_path):
    from flywheel.registry import content_hash
    from pipelines.train_policy import fit, save

    base_dir = tmp_path / "base"
    base_dir.mkdir()
    base = base_dir / "policy"
    import shutil

    shutil.copytree(family_dir["qwen2"], base)
    (base_dir / "policy.sha256").write_text(content_hash(base))
    model, tok, history, _ = fit(base, synthetic_pairs(16), [], _lora(), base, log=lambda *_: None)
    assert save(model, tok, tmp_path / "v2", base, adapter_only=True) == "adapter"
    assert is_adapter(tmp_path / "v2")
    info = json.loads((tmp_path / "v2" / "flywheel_adapter.json").read_text())
    assert info["base_hash"] == content_hash(base)
    size = lambda d: sum(f.stat().st_size for f in d.rglob("*.safetensors"))  # noqa: E731
    assert size(tmp_path / "v2") < 0.5 * size(base)

    # the next turn continues the champion's adapter; the reference is the champion (its margins start at zero)
    again, tok2, hist2, _ = fit(tmp_path / "v2", synthetic_pairs(16, start=40), [], _lora(steps=2), base, log=print)
    assert hasattr(again, "peft_config") and abs(hist2[0]["reward_margin"]) < 1e-4
    merged, _ = load_policy(tmp_path / "v2", base=base)
    assert not hasattr(merged, "peft_config")
    with pytest.raises(UnsupportedModel, match="pass the base folder"):
        load_policy(tmp_path / "v2")
    other = tmp_path / "other"
    build_family(other, "qwen2", seed=1)
    with pytest.raises(UnsupportedModel, match="holds another model"):
        load_policy(tmp_path / "v2", base=other)


# ---- sequence-classification reward models ------------------------------------------------------------------


def test_a_sequence_classification_reward_model_learns_and_round_trips(tmp_path):
    base = build_seqcls_reward(tmp_path / "seqcls")
    params = shipped(
        "train_reward",
        frozen_encoder=False,
        epochs=10,
        batch_size=8,
        lr=3e-3,
        head_lr=1e-2,
        max_length=64,
        group_by_length=False,
    )
    model = RewardModel.from_seqcls(base, 64, 1)
    assert model.templated and "<|im_start|>assistant" in model.text([{"role": "user", "content": "hi"}], "yes")
    train_reward(model, synthetic_pairs(16), params)
    test = synthetic_pairs(8, start=50)
    assert sum(pairwise_correct(model, test)) / 8 > 0.9
    model.save(tmp_path / "trained")
    again = RewardModel.load(tmp_path / "trained")
    prompts, answers = [p["prompt"] for p in test], [p["chosen"] for p in test]
    assert again.score(prompts, answers) == pytest.approx(model.score(prompts, answers), abs=1e-5)


def test_a_reward_model_with_more_than_one_label_is_refused(tmp_path):
    build_seqcls_reward(tmp_path / "m", num_labels=3)
    with pytest.raises(ValueError, match="one label"):
        RewardModel.from_seqcls(tmp_path / "m")


# ---- models.<kind>.source ----------------------------------------------------------------------------------


def _spec(source: str):
    return shipped("models").policy.updated(source=source)


def test_source_errors_name_the_setting_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match=r"models.policy.source: the folder .*/nope/model does not exist"):
        resolve("policy", _spec("./nope/model"), tmp_path)
    with pytest.raises(ModelSourceError, match=r"hub id .*offline.*set models.policy.source to that folder"):
        resolve("policy", _spec("Qwen/Qwen2.5-0.5B-Instruct"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match="not a Hugging Face model folder"):
        resolve("policy", _spec("empty"), tmp_path)
    (tmp_path / "f.bin").write_text("x")
    with pytest.raises(ModelSourceError, match="is a file"):
        resolve("policy", _spec("f.bin"), tmp_path)
    from flywheel.models.sources import is_shipped

    with pytest.raises(ModelSourceError, match="'shipped:llama' is not a shipped model"):
        is_shipped("policy", _spec("shipped:llama"))


def test_a_folder_source_resolves_relative_to_the_workspace(family_dir, tmp_path):
    import shutil

    shutil.copytree(family_dir["gemma"], tmp_path / "my-model")
    assert resolve("policy", _spec("my-model"), tmp_path) == tmp_path / "my-model"
    assert resolve("policy", _spec(str(tmp_path / "my-model")), tmp_path / "elsewhere") == tmp_path / "my-model"


def test_a_turn_starts_from_the_champion_or_from_the_base_as_params_say(family_dir, tmp_path):
    """``train_policy.start_from``: continue the champion (saved full when it holds weights of its own), or train the
    base model on the whole window (an adapter on the base: saved adapter-only)."""
    import shutil

    from flywheel.registry import content_hash
    from pipelines.train_policy import start_point

    base = tmp_path / "base" / "policy"
    shutil.copytree(family_dir["qwen2"], base)
    (base.parent / "policy.sha256").write_text(content_hash(base))
    champion = tmp_path / "champion"
    build_family(champion, "qwen2", seed=3)  # full weights of its own
    info = {"version": "4", "content_hash": content_hash(champion)}
    assert start_point(shipped("train_policy", start_from="champion"), champion, info, base) == (champion, False)
    assert start_point(shipped("train_policy", start_from="base"), champion, info, base) == (base, True)
    on_its_base = {"version": "2", "content_hash": content_hash(base)}
    assert start_point(shipped("train_policy", start_from="champion"), base, on_its_base, base) == (base, True)
