"""Several training processes through ``accelerate launch`` (``train_*.devices: N``, backend ``trl``).

A stage asked for N > 1 processes re-runs its own command under ``accelerate launch`` (DDP by default, or the
accelerate config file ``train_*.accelerate_config`` names: infra/accelerate/ ships DDP and DeepSpeed ZeRO-2/3) and
waits for it; in the launched processes TRL's trainer shares the work, and only the main one (rank 0) logs to MLflow
and writes the challenger: one challenger, one MLflow run, as with one process. No home-made distribution: the
processes, their communication and the sharding are accelerate's and TRL's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch


def rank() -> int:
    """This process's rank under ``accelerate launch`` / torchrun (0 alone)."""
    return int(os.environ.get("RANK", "0"))


LAUNCHED = "FLYWHEEL_LAUNCHED"  # set in the launched processes: they train, never launch again


def launched() -> bool:
    """Whether this process was started by ``accelerate launch`` / torchrun (or by ``run``): it must not launch
    again, whatever its world size."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or os.environ.get(LAUNCHED) == "1"


def processes(devices: str | int, backend: str) -> int:
    """How many processes ``devices`` asks for: N as given; ``auto``: one per visible GPU with the trl back-end,
    else one."""
    if devices != "auto":
        return int(devices)
    return max(1, torch.cuda.device_count()) if backend == "trl" else 1


def command(stage: str, options: dict[str, Path], n: int, config: str = "") -> list[str]:
    """The ``accelerate launch`` command line that runs ``flywheel stage <stage>`` in ``n`` processes. Without a
    config file, accelerate's torchrun launcher (``--multi_gpu``): on a machine without a GPU the trainer's
    ``use_cpu`` makes it DDP over gloo on the CPU (accelerate's ``--cpu`` launcher starts several processes only
    through MPI)."""
    from flywheel.stages import flag

    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if launcher is None:
        raise RuntimeError("devices > 1 needs accelerate's launcher (pip install accelerate)")
    cmd = [launcher, "launch", "--num_processes", str(n), "--num_machines", "1"]
    if config:
        if not Path(config).is_file():
            raise FileNotFoundError(f"accelerate_config: no file {config}")
        cmd += ["--config_file", config]
    else:
        cmd += ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["-m", "flywheel.cli", "stage", stage]
    for name, value in options.items():
        cmd += [flag(name), str(value)]
    return cmd


def run(stage: str, options: dict[str, Path], n: int, config: str = "") -> None:
    """Run ``flywheel stage <stage>`` in ``n`` processes and wait; a RuntimeError with the exit status on failure
    (the processes' own output goes to this process's)."""
    env = dict(os.environ, FLYWHEEL_WARM="0", PYTHONUNBUFFERED="1", **{LAUNCHED: "1"})
    cmd = command(stage, options, n, config)
    print(f"{stage}: {n} processes: {' '.join(cmd[:8])} ...", flush=True)
    code = subprocess.call(cmd, env=env)
    if code != 0:
        raise RuntimeError(f"{stage}: accelerate launch of {n} processes failed (exit status {code})")
