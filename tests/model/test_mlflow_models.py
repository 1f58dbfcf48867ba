"""Registered versions are MLflow Models: a plain Python session loads the champions by URI with MLflow's own
loaders (transformers flavor for the policy, full or LoRA adapter-only; pyfunc for both models)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

from shipped import shipped

from flywheel.registry import CHAMPION, POLICY, REWARD, content_hash
from flywheel.release import bootstrap, release
from tests.model.conftest import synthetic_pairs
from tests.model.families import tiny_lora

SMOKE = shipped("release").smoke.updated(prompts=["hello"], max_new_tokens=2, timeout_s=60, min_chars=0)
GATES = {"default": "d" * 64}
LORA = tiny_lora(steps=3)


def _blessing(folder):
    return {
        "policy": {"blessed": True, "reasons": []},
        "reward": {"blessed": True, "reasons": []},
        "candidates": {"policy": content_hash(folder / "policy"), "reward": content_hash(folder / "reward")},
        "gate": "default",
        "gate_sha256": "d" * 64,
        "judge": "none",
    }


LOADER = textwrap.dedent(
    """
    import json, sys
    import mlflow, pandas as pd
    out = {}
    pipe = mlflow.transformers.load_model("models:/flywheel-policy@champion")
    out["transformers"] = type(pipe).__name__
    chat = mlflow.pyfunc.load_model("models:/flywheel-policy@champion")
    answer = chat.predict({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 3})
    out["chat_object"] = answer[0]["object"] if isinstance(answer, list) else answer["object"]
    reward = mlflow.pyfunc.load_model("models:/flywheel-reward@champion")
    scores = reward.predict(pd.DataFrame({"prompt": ["hi", '[{"role": "user", "content": "hi"}]'],
                                          "answer": ["good answer", "bad answer"]}))
    out["rewards"] = [float(x) for x in scores["reward"]]
    print("RESULT " + json.dumps(out))
    """
)


def _load_in_a_fresh_process(settings, cwd) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "FLYWHEEL_"))}
    env.update(MLFLOW_TRACKING_URI=settings.tracking_uri, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", LOADER], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def test_full_and_lora_champions_load_with_mlflows_own_loaders_in_a_fresh_process(workspace, tmp_path):
    from pipelines.train_policy import fit, save

    settings, reg = workspace
    base = settings.models / "base"
    bootstrap(reg, base)
    v1 = reg.get(POLICY, "1")
    assert v1.source.startswith("models:/") and v1.tags["weights"] == "full"
    full = _load_in_a_fresh_process(settings, tmp_path.parent)
    assert full["transformers"] == "TextGenerationPipeline" and full["chat_object"] == "chat.completion"
    assert len(full["rewards"]) == 2

    # a LoRA challenger: adapter-only in the registry, the base recorded by folder and content hash
    model, tok, _, _ = fit(base / "policy", synthetic_pairs(8), [], LORA, base / "policy", log=lambda *_: None)
    ch = settings.models / "challenger"
    shutil.copytree(base / "reward", ch / "reward")
    (ch / "reward" / "note.txt").write_text("v2")
    assert save(model, tok, ch / "policy", base / "policy", adapter_only=True) == "adapter"
    out = release(reg, ch, _blessing(ch), {}, SMOKE, log=lambda *_: None, gates=GATES, base=base)
    assert [o.promoted for o in out] == [True, True], out
    v2 = reg.alias(POLICY, CHAMPION)
    assert v2.version == "2" and v2.tags["weights"] == "lora adapter"
    assert v2.tags["base_content_hash"] == content_hash(base / "policy")
    assert v2.tags["base_model_path"] == str((base / "policy").resolve())

    import mlflow

    def files(uri):
        root = mlflow.artifacts.download_artifacts(uri)
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs if "safetensors" in f)

    assert files(v2.source) < 0.5 * files(v1.source)  # adapter weights only
    lora = _load_in_a_fresh_process(settings, tmp_path.parent)
    assert lora["transformers"] == "TextGenerationPipeline" and lora["chat_object"] == "chat.completion"
    assert reg.alias(REWARD, CHAMPION).version == "2" and len(lora["rewards"]) == 2

    # Flywheel's own loaders read the version back as a folder: adapter-only, loading on the base
    local = reg.local_dir(v2)
    assert (local / "adapter_config.json").is_file() and (local / "flywheel_adapter.json").is_file()
    from safetensors.torch import load_file

    from flywheel.models.policy import load_policy

    saved, rebuilt = (
        load_file(ch / "policy" / "adapter_model.safetensors"),
        load_file(local / "adapter_model.safetensors"),
    )
    assert saved.keys() == rebuilt.keys() and all((saved[k] == rebuilt[k]).all() for k in saved)
    load_policy(local, base=base / "policy")
