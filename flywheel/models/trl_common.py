"""What TRL's trainers share in Flywheel's trl back-end (policy: trl_backend.py; reward model: reward_trl.py): their
config from Flywheel's params, one fast-loop history row per logged step, no raw log printing."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from flywheel.models.device import bf16_fast

KEYS = {  # TRL's logged names -> the fast loop's history keys
    "loss": "loss",
    "grad_norm": "grad_norm",
    "learning_rate": "lr",
    "rewards/accuracies": "reward_accuracy",
    "rewards/margins": "reward_margin",
    "kl": "kl",
    "accuracy": "reward_accuracy",
    "margin": "reward_margin",
}


def distributed() -> tuple[int, int]:
    """(rank, world size) of this process under ``accelerate launch`` / torchrun; (0, 1) alone."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _history_callback(rows: list[dict], on_step: Callable[[int, dict], None] | None):
    from transformers import TrainerCallback

    class History(TrainerCallback):
        """Each logged step as a fast-loop history row (``logging_steps: 1``)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            row = {"step": state.global_step - 1}
            for key, value in logs.items():
                name = KEYS.get(key)
                if name is not None and isinstance(value, (int, float)):
                    row[name] = float(value)
            if "reward_margin" in row and "rewards/margins" in logs:  # TRL's margin is beta * log-ratio already
                row["reward_margin"] = float(logs["rewards/margins"])
            rows.append(row)
            if on_step is not None and state.is_world_process_zero:
                on_step(row["step"], row)

    return History()


def _args(config_cls, params, steps: int, batch_size: int, out: str, cpu_bf16: bool = False, **extra):
    """A TRL config from Flywheel's params: the same optimizer, schedule, clipping and seed as the fast loop."""
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # one bar per dataset pass in the stage's log otherwise: its own steps are logged
    cuda = torch.cuda.is_available()
    return config_cls(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=params.lr,
        lr_scheduler_type="linear",
        max_grad_norm=getattr(params, "max_grad_norm", 1.0),
        weight_decay=getattr(params, "weight_decay", 0.0),
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=params.seed,
        data_seed=params.seed,
        use_cpu=not cuda,
        # ``cpu_bf16``: a bf16 autocast on a CPU, only where bf16 runs fast (AMX / AVX512-BF16): emulated, it is
        # many times slower
        bf16=cuda and torch.cuda.is_bf16_supported() or (not cuda and cpu_bf16 and bf16_fast("cpu")),
        fp16=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        **extra,
    )


def _quiet(trainer) -> None:
    """No raw log dicts printed per step (the trainer's printer without a progress bar): the stage logs its own
    line per step."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
