"""The ``train_reward`` stage: a reward model trained on the reward pairs, from the champion reward model (continued)
or from the base reward model (``train_reward.start_from``)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from flywheel import distributed
from flywheel.models.device import best_device
from flywheel.models.reward import CONFIG, RewardModel, pairwise_correct, train_reward
from flywheel.params import TrainRewardParams
from flywheel.registry import is_base_version
from flywheel.settings import Settings
from pipelines.prepare import read_set
from pipelines.resolve_champion import load

# What this step's functions import, imported ahead by a DAG task's warm runner while DVC starts
# (flywheel/orchestration.py stage_runner): a module missing here is imported by the stage itself.
PRELOAD = (
    "mlflow",
    "models",
    "transformers.models.bert.modeling_bert",
    "matplotlib.pyplot",
)


def start_point(params: TrainRewardParams, entry: dict, base: Path) -> tuple[Path | None, str]:
    """(the champion reward folder training continues, or None: the base; the start, said in a few words). The
    champion is continued (``start_from: champion``) once it is a trained version: not the base model nor its
    registered copy, and of the form the backend trains (TRL: a sequence-classification model)."""
    if params.start_from == "base":
        return None, "base"
    folder, version = Path(entry["path"]), entry.get("version")
    if is_base_version(folder, entry, base):
        return None, "base (the champion is the base model)"
    kind = json.loads((folder / CONFIG).read_text()).get("kind") if (folder / CONFIG).is_file() else None
    if params.backend == "trl" and kind != "seqcls":
        return None, f"base (champion v{version} is an encoder and a head; backend trl trains a classifier)"
    return folder, f"champion v{version}"


def fit(
    base: Path,
    train: list[dict],
    val: list[dict],
    params: TrainRewardParams,
    log=print,
    start: Path | None = None,
) -> tuple[RewardModel, dict]:
    """Train the champion reward model ``start`` for ``champion_epochs``, or, without one, the base reward model
    (its encoder and a new head, or the whole sequence-classification model) for ``epochs``; returns the model
    and its figures."""
    trl = params.backend == "trl"
    if start is not None:
        model = RewardModel.load(start)
        params = params.model_copy(update={"epochs": params.champion_epochs})
    else:
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
        "epochs": params.epochs,
        "steps": len(losses),
        "final_loss": losses[-1],
        "train_seconds": round(seconds, 1),
        "losses": losses,
    }
    if val:
        figures["val_pairwise_accuracy"] = sum(pairwise_correct(model, val)) / len(val)
    return model, figures


def main(
    settings,
    params: TrainRewardParams,
    base: Path,
    prepared: Path,
    out: Path,
    metrics_file: Path,
    champion: Path | None = None,
) -> dict:
    """``champion``: champion.json (resolve_champion's output); without it, training starts from the base."""
    import mlflow

    from flywheel import tracking

    train = read_set(prepared, "reward_pairs", "train")
    val = read_set(prepared, "reward_pairs", "val")
    start, said = None, "base"
    if champion is not None:
        start, said = start_point(params, load(champion, settings)["reward"], base)
    if distributed.launched() and distributed.rank() != 0:  # one of several processes: train, log nothing
        fit(base, train, val, params, log=lambda *a: None, start=start)
        return {}
    with tracking.stage_run(settings, "train_reward") as run:
        mlflow.log_params({**{f"reward.{k}": v for k, v in params.model_dump().items()}, "reward.started_from": said})
        print(f"train_reward: from {said}, {len(train)} pairs", flush=True)
        model, figures = fit(base, train, val, params, start=start)
        figures["start_from"] = said
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
    settings: Settings,
    params: TrainRewardParams,
    *,
    champion: Path,
    base: Path,
    prepared: Path,
    out: Path,
    metrics: Path,
) -> str:
    """Train the reward model on the prepared reward pairs: the champion's (``champion``: champion.json) continued,
    or the base reward model's (``base``), as ``train_reward.start_from`` says."""
    n = distributed.processes(params.devices, params.backend)
    if n > 1 and not distributed.launched():
        options = {"champion": champion, "base": base, "prepared": prepared, "out": out, "metrics": metrics}
        metrics.unlink(missing_ok=True)
        distributed.run("train_reward", options, n, params.accelerate_config)
        return f"train_reward: {json.loads(metrics.read_text())}"
    return f"train_reward: {main(settings, params, base, prepared, out, metrics, champion)}"
