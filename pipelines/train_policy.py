"""The ``train_policy`` stage: DPO on preference pairs, or KTO on unpaired examples (+ SFT on corrections), from the
current champion."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from flywheel import distributed
from flywheel.models.dpo import attach_lora, train_dpo, train_kto
from flywheel.models.policy import (
    ADAPTER_INFO,
    base_hash,
    best_device,
    check_split,
    encode,
    is_adapter,
    load_policy,
    retie_head,
)
from flywheel.models.scores import SCORE_CACHE, ScoreCache
from flywheel.models.trl_backend import GATHERED
from flywheel.params import ScoreCacheParams, TrainPolicyParams
from flywheel.registry import is_base_version
from flywheel.settings import Settings
from pipelines.prepare import read_set
from pipelines.resolve_champion import load

# What this step's functions import, imported ahead by a DAG task's warm runner while DVC starts
# (flywheel/orchestration.py stage_runner): a module missing here is imported by the stage itself.
PRELOAD = (
    "mlflow",
    "models",
    "transformers.models.llama.modeling_llama",
    "matplotlib.pyplot",
)


def on_base(champion: Path, info: dict, base: Path) -> bool:
    """Whether the champion's weights are the base model's: the base itself, its registered copy (the same content
    hash), or an adapter on it. Only then is a LoRA challenger saved adapter-only (an adapter records one base)."""
    return is_adapter(champion) or is_base_version(champion, info, base)


def start_point(params: TrainPolicyParams, champion: Path, info: dict, base: Path) -> tuple[Path, bool]:
    """(the folder training starts from, whether the challenger is saved adapter-only): the champion, continued
    (``train_policy.start_from: champion``), or the base model on the whole window (``base``)."""
    if params.start_from == "base":
        return base, True
    return champion, on_base(champion, info, base)


def fit(
    champion: Path,
    pairs: list[dict],
    sft: list[dict],
    params: TrainPolicyParams,
    base: Path,
    log=print,
    store: ScoreCache | None = None,
):
    """Load the champion, train its top layers (or a LoRA adapter on them, continuing the champion's adapter
    when it has one) by DPO on ``pairs`` or, with ``train_policy.method: kto``, by KTO on ``pairs`` = unpaired
    examples (prompt, answer, desirable), with the fast loop or TRL (``train_policy.backend``); returns (model,
    tokenizer, history, seconds). ``store``: trunk outputs kept across runs (the fast loop reads and adds)."""
    if params.threads:
        torch.set_num_threads(params.threads)
    adapter = params.adapter in ("lora", "qlora")
    model, tok = load_policy(
        champion, device=best_device(), base=base, trainable_adapter=adapter, four_bit=params.adapter == "qlora"
    )
    if adapter and not hasattr(model, "peft_config"):
        model = attach_lora(model, params)
    if params.backend == "fast":
        check_split(model, tok, params.frozen_layers)
    fields = ("answer",) if params.method == "kto" else ("chosen", "rejected")
    enc_pairs = encode(tok, pairs, params.max_prompt_tokens, params.max_answer_tokens, fields=fields)
    enc_sft = encode(tok, sft, params.max_prompt_tokens, params.max_answer_tokens, fields=("completion",))
    flags = [bool(r["desirable"]) for r in pairs] if params.method == "kto" else None
    t0 = time.perf_counter()

    def on_step(step: int, row: dict) -> None:
        took = time.perf_counter() - t0
        log(
            f"train_policy: step {step + 1}/{params.steps} loss {row['loss']:.4f} "
            f"acc {row.get('reward_accuracy', float('nan')):.2f} ({took / (step + 1):.1f} s/step)"
        )

    if params.backend == "trl":
        from flywheel.models import trl_backend

        history = trl_backend.train_policy(model, tok, enc_pairs, params, flags, on_step)
    elif params.method == "kto":
        history = train_kto(model, enc_pairs, flags, enc_sft, tok.pad_token_id, params, on_step, store)
    else:
        history = train_dpo(model, enc_pairs, enc_sft, tok.pad_token_id, params, on_step, store=store)
    return model, tok, history, time.perf_counter() - t0


def save(model, tok, out: Path, base: Path | None = None, adapter_only: bool = False) -> str:
    """The challenger: adapter-only (with the base it needs: source and content hash) when it is a LoRA adapter on
    the base, else full bf16 weights (a LoRA on other weights is merged first). Returns what was saved."""
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out)
    gathered = getattr(model, GATHERED, None)  # trained under ZeRO-3: the weights gathered from every process
    if gathered is not None:
        if hasattr(model, "peft_config") and not adapter_only:
            raise ValueError("under ZeRO-3 a LoRA challenger is written adapter-only: train it on the base model")
        model.save_pretrained(out, state_dict=gathered)
        if not hasattr(model, "peft_config"):
            return "full"
    if hasattr(model, "peft_config") and adapter_only and base is not None:
        if gathered is None:
            model.save_pretrained(out)  # adapter weights only (on any device: written from CPU copies)
        readme = base.parent / "README.json"
        source = json.loads(readme.read_text()).get(base.name, "unknown") if readme.is_file() else "unknown"
        info = {"base_source": source, "base_hash": base_hash(base), "base_path": base.name}
        (out / ADAPTER_INFO).write_text(json.dumps(info, indent=2))
        return "adapter"
    if hasattr(model, "peft_config"):
        model = model.merge_and_unload()
    model.to("cpu", torch.bfloat16)
    retie_head(model)
    model.save_pretrained(out)
    return "full"


def main(
    settings,
    params: TrainPolicyParams,
    champion: Path,
    champion_info: dict,
    prepared: Path,
    out: Path,
    metrics_file: Path,
    base: Path,
    store: ScoreCache | None = None,
) -> dict:
    import mlflow

    from flywheel import tracking

    pairs = read_set(prepared, "kto" if params.method == "kto" else "pairs", "train")
    sft = read_set(prepared, "sft", "train")
    start, adapter_only = start_point(params, champion, champion_info, base)
    if params.adapter == "qlora" and not adapter_only:
        raise ValueError(
            f"train_policy.adapter: qlora trains an adapter on the base model, but the champion "
            f"(version {champion_info.get('version')}) holds full weights of its own: use adapter: lora or none"
        )
    if distributed.launched() and distributed.rank() != 0:  # one of several processes: train, log nothing
        fit(start, pairs, sft, params, base, log=lambda *a: None)
        return {}
    with tracking.stage_run(settings, "train_policy") as run:
        mlflow.log_params({f"policy.{k}": v for k, v in params.model_dump().items()})
        mlflow.log_params(
            {
                "policy.champion_version": champion_info.get("version"),
                "policy.train_pairs": len(pairs),
                "policy.sft_examples": len(sft),
            }
        )
        model, tok, history, seconds = fit(start, pairs, sft, params, base, store=store)
        for row in history:
            mlflow.log_metrics({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        plot = tracking.log_curve(
            [r["loss"] for r in history],
            f"policy: {params.method.upper()} loss ({params.backend})",
            "loss",
            out.parent / "policy_loss.png",
        )
        mlflow.log_artifact(str(plot))
        saved = save(model, tok, out, base, adapter_only=adapter_only)
        mlflow.log_params({"policy.saved": saved})
        summary = {
            "saved": saved,
            "method": params.method,
            "backend": params.backend,
            "processes": distributed.processes(params.devices, params.backend),
            "train_pairs": len(pairs),  # KTO: unpaired examples
            "sft_examples": len(sft),
            "steps": len(history),
            "final_loss": history[-1]["loss"],
            "train_seconds": round(seconds, 1),
            "seconds_per_step": round(seconds / max(1, len(history)), 2),
            "champion_version": champion_info.get("version"),
            "start_from": params.start_from,
            "mlflow_run_id": run.info.run_id,
        }
        mlflow.log_metrics({"train_seconds": seconds, "seconds_per_step": summary["seconds_per_step"]})
    metrics_file.parent.mkdir(parents=True, exist_ok=True)
    metrics_file.write_text(json.dumps(summary, indent=2))
    return summary


def stage(
    settings: Settings,
    params: TrainPolicyParams,
    score_cache: ScoreCacheParams,
    *,
    champion: Path,
    base: Path,
    prepared: Path,
    out: Path,
    metrics: Path,
) -> str:
    """Fine-tune the champion policy named in ``champion`` (champion.json) on the prepared pairs (``base``: the base
    models' folder, which adapter versions load on)."""
    info = load(champion, settings)  # (materializes a registry champion once, before any launch)
    n = distributed.processes(params.devices, params.backend)
    if n > 1 and not distributed.launched():
        options = {"champion": champion, "base": base, "prepared": prepared, "out": out, "metrics": metrics}
        metrics.unlink(missing_ok=True)
        distributed.run("train_policy", options, n, params.accelerate_config)
        return f"train_policy: {json.loads(metrics.read_text())}"
    store = ScoreCache(settings.models / SCORE_CACHE, int(score_cache.max_gb * 2**30))
    try:
        summary = main(
            settings,
            params,
            Path(info["policy"]["path"]),
            info["policy"],
            prepared,
            out,
            metrics,
            base / "policy",
            store,
        )
    finally:
        store.close()
    return f"train_policy: {summary}"
