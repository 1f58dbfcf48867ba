"""Shared by the benchmarks: run one measurement in a fresh (spawned) child process and read its peak RSS.

The child times the measured call itself and reports its own peak RSS (``RUSAGE_SELF``) and the peak RSS
of the largest process it spawned and waited for (``RUSAGE_CHILDREN``: ingest's pool workers, which the
pool joins on shutdown). Measurements never share a process, so one cannot inflate another's peak.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import resource
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GiB = 2**30
MiB = 2**20
RSS_TARGET = 2 * GiB


def _cpu(who: int) -> float:
    ru = resource.getrusage(who)
    return ru.ru_utime + ru.ru_stime


def _child(module: str, func: str, kwargs: dict, preload: tuple[str, ...], conn) -> None:
    try:
        for name in preload:
            importlib.import_module(name)
        fn = getattr(importlib.import_module(module), func)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        cpu0 = _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        info = fn(**kwargs) or {}
        seconds = time.perf_counter() - t0
        self_ru, children_ru = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        out = {
            "ok": True,
            "seconds": seconds,
            "rss_before": rss_before,
            "rss_main": self_ru.ru_maxrss * 1024,  # KiB on Linux
            "rss_workers": children_ru.ru_maxrss * 1024,
            # CPU seconds of the call, this process and its (joined) workers: steadier than wall time
            # on a machine shared with other work
            "cpu_main": _cpu(resource.RUSAGE_SELF) - cpu0[0],
            "cpu_workers": _cpu(resource.RUSAGE_CHILDREN) - cpu0[1],
            "info": info,
        }
    except BaseException:  # noqa: BLE001 - reported to the parent, which prints it
        out = {"ok": False, "error": traceback.format_exc()}
    conn.send(out)
    conn.close()


def measure(module: str, func: str, preload: tuple[str, ...] = (), **kwargs) -> dict:
    """Run ``module.func(**kwargs)`` in a spawned child; returns seconds, RSS figures and what it returned.

    Only the call is timed: not the child's start-up, nor the modules named in ``preload`` (imported
    first, as a long-running caller would have them). What the call imports lazily (Great Expectations)
    is timed. Peak RSS covers the child's whole life, imports included.
    """
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(module, func, kwargs, tuple(preload), send))
    proc.start()
    send.close()
    try:
        out = recv.recv()
    except EOFError:
        out = {"ok": False, "error": "child died without a result (killed for memory?)"}
    proc.join()
    if proc.exitcode not in (0, None) and out.get("ok"):
        out = {"ok": False, "error": f"child exited with {proc.exitcode}"}
    if out.get("ok"):
        out["rss_max"] = max(out["rss_main"], out["rss_workers"])
        out["cpu"] = out["cpu_main"] + out["cpu_workers"]
    return out


def fmt_rss(n: int) -> str:
    return f"{n / MiB:,.0f} MiB" if n else "-"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def machine_line() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {load:.2f} at start"


def load_line() -> str:
    return "load average now: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())
