"""The ``train_policy`` stage: DPO on preference pairs (+ SFT on corrections) from the current champion."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from flywheel.models.dpo import DPOParams, train_dpo
from flywheel.models.policy import best_device, encode, load_policy
from pipelines.prepare import read_set


@dataclass
class PolicyParams(DPOParams):
    max_prompt_tokens: int = 160
    max_answer_tokens: int = 64
    threads: int = 0  # 0: torch's default


def fit(champion: Path, pairs: list[dict], sft: list[dict], params: PolicyParams, log=print):
    """Load the champion, train its top layers; returns (model, tokenizer, history, seconds)."""
    if params.threads:
        torch.set_num_threads(params.threads)
    model, tok = load_policy(champion, device=best_device())
    enc_pairs = encode(tok, pairs, params.max_prompt_tokens, params.max_answer_tokens)
    enc_sft = encode(tok, sft, params.max_prompt_tokens, params.max_answer_tokens, fields=("completion",))
    t0 = time.perf_counter()

    def on_step(step: int, row: dict) -> None:
        took = time.perf_counter() - t0
        log(f"train_policy: step {step + 1}/{params.steps} loss {row['loss']:.4f} "
            f"acc {row.get('reward_accuracy', float('nan')):.2f} ({took / (step + 1):.1f} s/step)")

    history = train_dpo(model, enc_pairs, enc_sft, tok.pad_token_id, params, on_step)
    return model, tok, history, time.perf_counter() - t0


def save(model, tok, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.to("cpu", torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)


def main(settings, params: PolicyParams, champion: Path, champion_info: dict, prepared: Path, out: Path,
         metrics_file: Path) -> dict:
    import mlflow

    from flywheel import tracking

    pairs = read_set(prepared, "pairs", "train")
    sft = read_set(prepared, "sft", "train")
    with tracking.stage_run(settings, "train_policy") as run:
        mlflow.log_params({f"policy.{k}": v for k, v in asdict(params).items()})
        mlflow.log_params({"policy.champion_version": champion_info.get("version"), "policy.train_pairs": len(pairs),
                           "policy.sft_examples": len(sft)})
        model, tok, history, seconds = fit(champion, pairs, sft, params)
        for row in history:
            mlflow.log_metrics({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        plot = tracking.log_curve([r["loss"] for r in history], "policy: DPO loss", "loss",
                                  out.parent / "policy_loss.png")
        mlflow.log_artifact(str(plot))
        save(model, tok, out)
        summary = {"train_pairs": len(pairs), "sft_examples": len(sft), "steps": len(history),
                   "final_loss": history[-1]["loss"], "train_seconds": round(seconds, 1),
                   "seconds_per_step": round(seconds / max(1, len(history)), 2),
                   "champion_version": champion_info.get("version"), "mlflow_run_id": run.info.run_id}
        mlflow.log_metrics({"train_seconds": seconds, "seconds_per_step": summary["seconds_per_step"]})
    metrics_file.parent.mkdir(parents=True, exist_ok=True)
    metrics_file.write_text(json.dumps(summary, indent=2))
    return summary
