"""The ``train_reward`` stage: a reward model trained from the base reward model on the reward pairs."""

from __future__ import annotations

import json
import time
from pathlib import Path

from flywheel import distributed
from flywheel.models.device import best_device
from flywheel.models.reward import RewardModel, pairwise_correct, train_reward
from flywheel.params import TrainRewardParams
from flywheel.settings import Settings
from pipelines.prepare import read_set


def fit(
    base: Path, train: list[dict], val: list[dict], params: TrainRewardParams, log=print
) -> tuple[RewardModel, dict]:
    """Train from the base reward model (its encoder and a new head, or the whole sequence-classification model);
    returns the model and its figures."""
    trl = params.backend == "trl"
    model = RewardModel.from_base(base, params.max_length, params.context_turns, as_seqcls=trl)
    model.to(best_device())
    t0 = time.perf_counter()
    every = max(1, int(len(train) * params.epochs / params.batch_size) // 10)

    def on_step(step: int, loss: float) -> None:
        if step % every == 0:
            log(f"train_reward: step {step + 1}, loss {loss:.4f}")

    if trl:
        from flywheel.models import reward_trl

        losses = reward_trl.train_reward(model, train, params, on_step)
    else:
        losses = train_reward(model, train, params, on_step)
    seconds = time.perf_counter() - t0
    figures = {
        "backend": params.backend,
        "processes": distributed.processes(params.devices, params.backend),
        "train_pairs": len(train),
        "val_pairs": len(val),
        "steps": len(losses),
        "final_loss": losses[-1],
        "train_seconds": round(seconds, 1),
        "losses": losses,
    }
    if val:
        figures["val_pairwise_accuracy"] = sum(pairwise_correct(model, val)) / len(val)
    return model, figures


def main(settings, params: TrainRewardParams, base: Path, prepared: Path, out: Path, metrics_file: Path) -> dict:
    import mlflow

    from flywheel import tracking

    train = read_set(prepared, "reward_pairs", "train")
    val = read_set(prepared, "reward_pairs", "val")
    if distributed.launched() and distributed.rank() != 0:  # one of several processes: train, log nothing
        fit(base, train, val, params, log=lambda *a: None)
        return {}
    with tracking.stage_run(settings, "train_reward") as run:
        mlflow.log_params({f"reward.{k}": v for k, v in params.model_dump().items()})
        model, figures = fit(base, train, val, params)
        for i, loss in enumerate(figures["losses"]):
            mlflow.log_metric("reward_loss", loss, step=i)
        mlflow.log_metrics({k: v for k, v in figures.items() if isinstance(v, (int, float))})
        plot = tracking.log_curve(
            figures["losses"], "reward model: Bradley-Terry loss", "loss", out.parent / "reward_loss.png"
        )
        mlflow.log_artifact(str(plot))
        model.to("cpu").save(out)
        figures["mlflow_run_id"] = run.info.run_id
    summary = {k: v for k, v in figures.items() if k != "losses"}
    metrics_file.parent.mkdir(parents=True, exist_ok=True)
    metrics_file.write_text(json.dumps(summary, indent=2))
    return summary


def stage(
    settings: Settings, params: TrainRewardParams, *, base: Path, prepared: Path, out: Path, metrics: Path
) -> str:
    """Train the reward model from the base reward model (``base``) on the prepared reward pairs."""
    n = distributed.processes(params.devices, params.backend)
    if n > 1 and not distributed.launched():
        options = {"base": base, "prepared": prepared, "out": out, "metrics": metrics}
        metrics.unlink(missing_ok=True)
        distributed.run("train_reward", options, n, params.accelerate_config)
        return f"train_reward: {json.loads(metrics.read_text())}"
    return f"train_reward: {main(settings, params, base, prepared, out, metrics)}"
