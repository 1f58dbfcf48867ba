"""Model versions as MLflow Models: what the registry holds, and back to the folders Flywheel's loaders read.

- policy: the transformers flavor (task ``llm/v1/chat``), so ``mlflow.transformers.load_model`` and
  ``mlflow.pyfunc.load_model`` work on ``models:/flywheel-policy@champion`` in a plain Python session. A LoRA
  version is adapter-only: MLflow records the base model's local folder (``base_model_path``; MLflow 3.17 loads
  it from there), and Flywheel its source and content hash (metadata and version tags).
- reward: a pyfunc model scoring (prompt, answer) rows -> reward (``flywheel.models.pyfunc.RewardScorer``; the
  reward folder is its artifact).

``to_folder`` turns a downloaded MLflow Model back into a Flywheel model folder (versions registered before
MLflow Models, a plain folder of files, need nothing: they still load as they are).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

from flywheel.models.policy import ADAPTER_INFO, base_hash, is_adapter

ADAPTER_META = "flywheel_adapter"  # MLmodel metadata key holding the adapter's flywheel_adapter.json


def _pip() -> list[str]:
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("mlflow", "torch", "transformers", "peft", "pandas")]


def log_policy(folder: Path, base: Path | None, metadata: dict):
    """Log the policy folder as a transformers-flavor MLflow Model in the active run; returns its ModelInfo."""
    import mlflow
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    extra = {}
    if is_adapter(folder):
        from peft import PeftModel

        from flywheel.models.policy import adapter_base

        root = adapter_base(folder, base).resolve()
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root, dtype=torch.bfloat16), str(folder))
        extra["base_model_path"] = str(root)
        metadata = {**metadata, ADAPTER_META: json.loads((Path(folder) / ADAPTER_INFO).read_text())}
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")  # as stored
    return mlflow.transformers.log_model(
        {"model": model, "tokenizer": tok},
        name="model",
        task="llm/v1/chat",
        torch_dtype=torch.float32,  # files stay bf16; a plain load gets fp32 (what CPUs run fastest without AMX)
        model_config={"do_sample": False, "max_new_tokens": 128},  # greedy, as Flywheel's evaluation
        pip_requirements=_pip(),
        metadata=metadata,
        **extra,
    )


def log_reward(folder: Path, metadata: dict):
    """Log the reward folder as a pyfunc MLflow Model (prompt, answer) -> reward in the active run."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import AnyType

    from flywheel.models.pyfunc import RewardScorer

    signature = ModelSignature(
        inputs=Schema([ColSpec(AnyType(), "prompt"), ColSpec("string", "answer")]),
        outputs=Schema([ColSpec("double", "reward")]),
        params=ParamSchema([ParamSpec("batch_size", "long", 32)]),
    )
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=RewardScorer(),
        artifacts={"reward": str(folder)},
        signature=signature,
        pip_requirements=_pip(),
        metadata=metadata,
    )


@contextmanager
def _quiet():
    """MLflow's advice while logging (no model card or licence on a hub for a local folder, no input example, the
    pickled scorer) says nothing about the user's model: kept out of the release's and the demo's log."""
    loggers = [logging.getLogger(n) for n in ("mlflow.pyfunc", "mlflow.transformers", "mlflow.models")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def log_version(kind: str, folder: Path, base: Path | None, metadata: dict):
    with _quiet():
        return log_policy(folder, base, metadata) if kind == "policy" else log_reward(folder, metadata)


def _move_children(src: Path, dest: Path) -> None:
    for item in src.iterdir():
        os.replace(item, dest / item.name)


def _drop_load_time_keys(path: Path) -> None:
    """MLflow saves the tokenizer as loaded, with two keys transformers adds at load time (``is_local``,
    ``local_files_only``); without them (written as transformers writes it) the folder is byte-identical to the
    one registered, so its content hash is the version's ``content_hash`` tag."""
    if not path.is_file():
        return
    cfg = json.loads(path.read_text())
    if "is_local" in cfg or "local_files_only" in cfg:
        cfg.pop("is_local", None)
        cfg.pop("local_files_only", None)
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def to_folder(model_dir: Path, dest: Path) -> Path:
    """Rebuild a Flywheel model folder at ``dest`` from a downloaded MLflow Model ``model_dir`` (its files are
    moved, not copied); a folder without an MLmodel file (a version registered before MLflow Models) is moved as
    it is."""
    from mlflow.models import Model

    model_dir, dest = Path(model_dir), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if not (model_dir / "MLmodel").is_file():
        _move_children(model_dir, dest)
        return dest
    mlmodel = Model.load(str(model_dir / "MLmodel"))
    flavor = mlmodel.flavors.get("transformers")
    if flavor is None:  # the reward pyfunc: its artifact is the folder
        _move_children(model_dir / "artifacts" / "reward", dest)
        return dest
    _move_children(model_dir / (flavor.get("peft_adaptor") or flavor.get("model_binary", "model")), dest)
    tokenizer = model_dir / "components" / "tokenizer"
    if tokenizer.is_dir():
        _move_children(tokenizer, dest)
        _drop_load_time_keys(dest / "tokenizer_config.json")
    adapter = (mlmodel.metadata or {}).get(ADAPTER_META)
    if adapter:
        (dest / ADAPTER_INFO).write_text(json.dumps(adapter, indent=2))
    return dest


def materialize(uri: str, dest: Path, tracking_uri: str | None = None) -> Path:
    """Download the model at ``uri`` and rebuild it as a Flywheel folder at ``dest`` (replaced atomically)."""
    import tempfile

    import mlflow

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        got = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp / "dl"), tracking_uri=tracking_uri)
        )
        built = to_folder(got, tmp / "folder")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(built, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def base_record(base: Path) -> dict:
    """What a version records of the base its adapter loads on."""
    return {"base_model_path": str(Path(base).resolve()), "base_content_hash": base_hash(base)}
