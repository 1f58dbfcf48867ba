"""Where a model runs: the GPU when there is one (this process's own under ``accelerate launch``), else the CPU."""

from __future__ import annotations

import os

import torch


def best_device() -> str:
    """``cuda`` when a GPU is present (this process's own under ``accelerate launch``: ``cuda:LOCAL_RANK``), else
    ``cpu``."""
    if not torch.cuda.is_available():
        return "cpu"
    rank = os.environ.get("LOCAL_RANK")
    return f"cuda:{rank}" if rank is not None else "cuda"


def _cpu_flags() -> set[str]:
    try:
        text = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def bf16_fast(device: torch.device | str) -> bool:
    """Whether bf16 matrix products run fast on ``device``: a GPU that supports bf16, or a CPU with AVX512-BF16 or
    AMX. A CPU without them (AVX2 laptops, many AMD EPYCs) emulates bf16: measured 135x slower than fp32 on a
    1024x1024 matmul (2.65 s vs 19.7 ms, AVX2 AMD EPYC, 2 threads), so the bf16 settings (train_policy.frozen_bf16,
    bf16, evaluate.bf16) apply only where this is true."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


def bf16_autocast(device_type: str, enabled: bool) -> torch.autocast:
    """A bf16 autocast of what runs inside (the trained or scored top layers, the reward encoder), or none where
    ``enabled`` is false; callers enable it only where ``bf16_fast``."""
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=enabled)


def cpu_summary() -> str:
    """The CPU model and its bf16 support, for the demo's and the benchmarks' summaries: timings differ several
    times between CPUs with AMX, with AVX512-BF16 alone, and with neither."""
    name = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                name = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    flags = _cpu_flags()
    bf16 = (
        "AMX"
        if "amx_bf16" in flags
        else ("AVX512-BF16, no AMX" if "avx512_bf16" in flags else "no AMX, no AVX512-BF16")
    )
    return f"{name}, {os.cpu_count()} CPUs, {bf16}"
