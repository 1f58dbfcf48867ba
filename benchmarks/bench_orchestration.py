"""Orchestration overhead on the tiny profile.

The same stages run four ways, each on its own copy of one prepared workspace (120 HH-RLHF pairs and the
native batch ingested, base models built and bootstrapped, so ``base_models`` is up to date everywhere):

- **baseline**: the stages' commands (as dvc.yaml resolves them) called one after the other in one Python
  process, through the CLI's own functions;
- **dvc repro**: one plain ``dvc repro`` as a user types it (DVC's hashing and dvc.lock; each stage's
  ``flywheel stage`` command is forked from the warm runner of the workspace and environment, flywheel/warm.py,
  which the first stage starts: its start and imports are included);
- **dvc repro, cold**: the same with ``FLYWHEEL_WARM=0``: every stage its own process, importing torch,
  MLflow and GX again (what ``dvc repro`` costs without the runner);
- **DAG run**: ``continuous_improvement`` with ``dag.test()`` (``force``, ``skip_release``): the threshold
  task, one task per stage each running ``dvc repro --single-item`` inside the task's own process tree (never
  the workspace's warm runner: a task's timeout and kill must reach the stage; each task starts a runner of its
  own, its child, that imports the stage's libraries while DVC starts: flywheel/orchestration.py
  ``stage_runner``), the watermark;
- **DAG run, no task runner**: the same with ``orchestration.warm_runner: false`` (every stage cold in its
  task), on a fifth copy with its own Airflow home.
- **DAG run, preloading worker**: the same in a ``dag.test()`` process that imported the stages' libraries
  first (``flywheel.warm_runner.preload_worker``, as flywheel/airflow_worker.py's workers do before they fork
  their tasks): each task forks its runner from itself, warm at once; on a sixth copy. The preload is paid once
  per worker and is printed apart, not in the run's wall time.

Overhead per stage = (wall time - baseline) / number of dvc.yaml stages; and, less exposed to the load of a
shared machine (training and generation move by tens of seconds), the median over the light stages
(``LIGHT``) of each stage's wall time (DVC's output lines; the task's duration in the DAG) minus its time in
the one-process baseline. Then, on the up-to-date workspaces, a no-op ``dvc repro`` (runner alive, as after any
run within ``warm_idle_seconds``; and with no runner alive, so the no-op starts one) and a no-op DAG run (every
stage skipped by DVC). Workspaces and Airflow homes come from devkit/ (shared with the tests).

    .venv/bin/python benchmarks/bench_orchestration.py [--workdir DIR] [--json FILE]

Heavy: six tiny training runs (about 6 minutes in all on 2 fast cores, 15 on a slow AVX2 EPYC). Run it alone on an idle machine; the
load average is printed beside the figures, and every figure is compared with the baseline measured in
the same invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devkit.airflow_home import airflow_env, dag_test, init_airflow  # noqa: E402
from devkit.workspaces import clean_env, make_workspace  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Stages whose work takes about a second: their wall time is mostly what the orchestration adds, and it does not
# drown in the training and generation time that a shared machine's load moves by tens of seconds.
LIGHT = ("resolve_champion", "validate", "prepare", "bless")

_INPROC = """
import json, os, shlex, sys, time
os.chdir(sys.argv[1])
from flywheel.cli import app
t0 = time.perf_counter()
times = {}
for name, cmd in json.loads(sys.argv[2]):
    t = time.perf_counter()
    app(shlex.split(cmd)[1:], standalone_mode=False)
    times[name] = round(time.perf_counter() - t, 2)
print("INPROC " + json.dumps({"seconds": time.perf_counter() - t0, "stages": times}))
"""


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _timed(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=cwd, env=env, text=True, capture_output=True)
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return took, proc.stdout


def _timed_stages(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, str, dict[str, float]]:
    """Like ``_timed``, plus each stage's wall time as DVC runs it: from its "Running stage" line to the next
    one (or DVC's exit), DVC's own work on it included."""
    marks: list[tuple[str, float]] = []
    out: list[str] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(args, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=err)
        for line in proc.stdout:
            out.append(line)
            if line.startswith("Running stage '"):
                marks.append((line.split("'")[1], time.perf_counter()))
        proc.wait()
        end = time.perf_counter()
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{args} failed:\n{''.join(out)[-3000:]}\n{err.read()[-3000:]}")
    walls = {name: round((marks[i + 1][1] if i + 1 < len(marks) else end) - t, 2) for i, (name, t) in enumerate(marks)}
    return end - t0, "".join(out), walls


def _overhead(walls: dict[str, float], baseline: dict[str, float]) -> float:
    """The median over the light stages (little work, so little noise) of wall time minus in-process time."""
    return round(statistics.median(walls[s] - baseline[s] for s in LIGHT), 2)


def _stop_runners(root: Path) -> None:
    """Stop the warm runners serving ``root`` and wait until they are gone."""
    from flywheel import warm

    warm.stop_workspace(root)
    deadline = time.monotonic() + 60
    while warm.runners(root) and time.monotonic() < deadline:
        time.sleep(0.05)


def stage_commands(root: Path) -> list[tuple[str, str]]:
    """Each stage's command with dvc.yaml's ${...} resolved, in dvc.yaml order."""
    code = (
        "import json, yaml; from dvc.repo import Repo; r = Repo('.'); "
        "cmds = {s.name: s.cmd for s in r.index.stages if hasattr(s, 'name')}; "
        "print(json.dumps([(n, cmds[n]) for n in yaml.safe_load(open('dvc.yaml'))['stages']]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=clean_env(), text=True, capture_output=True, check=True
    ).stdout
    return [tuple(x) for x in json.loads(out.strip().splitlines()[-1])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / "out" / "orchestration")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    work = args.workdir
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    print(f"load average before: {_load()}")
    base = make_workspace(work / "base", ROOT)
    _stop_runners(base)  # the one its `dvc repro base_models` started
    commands = stage_commands(base)
    n_stages = len(commands)
    to_run = [(name, cmd) for name, cmd in commands if name != "base_models"]  # up to date everywhere
    spaces = {k: work / k for k in ("inproc", "dvc", "cold", "dag", "dag_cold", "dag_pre")}
    for dest in spaces.values():
        shutil.copytree(base, dest, symlinks=True)
    tiny = "    orchestration: {retries: 1, retry_delay_minutes: 0.05, warm_idle_seconds: 120}\n"
    params = spaces["dag_cold"] / "params.yaml"
    assert tiny in params.read_text()
    params.write_text(params.read_text().replace(tiny, tiny.replace("}", ", warm_runner: false}")))

    env = clean_env(FLYWHEEL_ROOT=str(spaces["inproc"]))
    took, out = _timed(
        [sys.executable, "-c", _INPROC, str(spaces["inproc"]), json.dumps(to_run)], spaces["inproc"], env
    )
    baseline = json.loads(next(line for line in out.splitlines() if line.startswith("INPROC "))[7:])
    print(f"baseline (one process): {baseline['seconds']:.1f} s  {baseline['stages']}  load {_load()}")

    dvc_s, out, dvc_walls = _timed_stages(["dvc", "repro"], spaces["dvc"], clean_env())  # starts the runner
    assert out.count("Running stage") == len(to_run), out
    print(f"dvc repro: {dvc_s:.1f} s  {dvc_walls}  load {_load()}")
    noop_dvc = statistics.median(_timed(["dvc", "repro"], spaces["dvc"], clean_env())[0] for _ in range(3))
    print(f"dvc repro, nothing changed: {noop_dvc:.1f} s (median of 3)")
    noop_fresh = []
    for _ in range(3):
        _stop_runners(spaces["dvc"])
        noop_fresh.append(_timed(["dvc", "repro"], spaces["dvc"], clean_env())[0])
    noop_fresh_s = statistics.median(noop_fresh)
    print(f"dvc repro, nothing changed, no runner alive (it starts one): {noop_fresh_s:.1f} s (median of 3)")
    _stop_runners(spaces["dvc"])

    cold_s, out, cold_walls = _timed_stages(["dvc", "repro"], spaces["cold"], clean_env(FLYWHEEL_WARM="0"))
    assert out.count("Running stage") == len(to_run), out
    print(f"dvc repro, cold (FLYWHEEL_WARM=0, a process per stage): {cold_s:.1f} s  {cold_walls}  load {_load()}")
    noop_cold = statistics.median(
        _timed(["dvc", "repro"], spaces["cold"], clean_env(FLYWHEEL_WARM="0"))[0] for _ in range(3)
    )
    print(f"dvc repro, cold, nothing changed: {noop_cold:.1f} s (median of 3)")

    home = work / "airflow-home"
    aenv = airflow_env(home, spaces["dag"])
    init_airflow(aenv, spaces["dag"])
    t0 = time.perf_counter()
    run, out = dag_test("continuous_improvement", aenv, spaces["dag"], {"force": True, "skip_release": True})
    dag_wall = time.perf_counter() - t0
    assert run["state"] == "success", out[-4000:]
    dag_walls = {name: round(float(run["durations"][name]), 2) for name, _ in to_run}
    print(f"DAG run: {run['seconds']:.1f} s (dag.test process {dag_wall:.1f} s)  {dag_walls}  load {_load()}")
    noop_run, _ = dag_test("continuous_improvement", aenv, spaces["dag"], {"force": True, "skip_release": True})
    print(f"DAG run, nothing changed: {noop_run['seconds']:.1f} s")
    cenv = airflow_env(work / "airflow-home-cold", spaces["dag_cold"])
    init_airflow(cenv, spaces["dag_cold"])
    crun, out = dag_test("continuous_improvement", cenv, spaces["dag_cold"], {"force": True, "skip_release": True})
    assert crun["state"] == "success", out[-4000:]
    cold_dag_walls = {name: round(float(crun["durations"][name]), 2) for name, _ in to_run}
    print(f"DAG run, no task runner: {crun['seconds']:.1f} s  {cold_dag_walls}  load {_load()}")

    penv = airflow_env(work / "airflow-home-pre", spaces["dag_pre"], FLYWHEEL_DAGRUN_PRELOAD="1")
    init_airflow(penv, spaces["dag_pre"])
    t0 = time.perf_counter()
    prun, out = dag_test("continuous_improvement", penv, spaces["dag_pre"], {"force": True, "skip_release": True})
    pre_wall = time.perf_counter() - t0
    assert prun["state"] == "success", out[-4000:]
    assert "forked from its worker's preloaded libraries" in out, out[-4000:]
    pre_walls = {name: round(float(prun["durations"][name]), 2) for name, _ in to_run}
    preload_s = next((float(ln.split(" in ")[1].split()[0]) for ln in out.splitlines() if "preloaded the" in ln), 0.0)
    print(f"DAG run, preloading worker: {prun['seconds']:.1f} s (preload {preload_s:.1f} s, dag.test process")
    print(f"  {pre_wall:.1f} s)  {pre_walls}  load {_load()}")
    noop_pre, _ = dag_test("continuous_improvement", penv, spaces["dag_pre"], {"force": True, "skip_release": True})
    print(f"DAG run, preloading worker, nothing changed: {noop_pre['seconds']:.1f} s")

    base_s = baseline["seconds"]
    result = {
        "dag_preloaded_s": round(prun["seconds"], 2),
        "dag_preloaded_overhead_per_stage_s": round((prun["seconds"] - base_s) / n_stages, 2),
        "dag_preloaded_overhead_light_stage_s": _overhead(pre_walls, baseline["stages"]),
        "dag_preloaded_task_s": pre_walls,
        "dag_preload_s": preload_s,
        "noop_dag_preloaded_s": round(noop_pre["seconds"], 2),
        "stages": n_stages,
        "stages_run": len(to_run),
        "baseline_s": round(base_s, 2),
        "dvc_repro_s": round(dvc_s, 2),
        "dag_run_s": round(run["seconds"], 2),
        "dag_test_process_s": round(dag_wall, 2),
        "dvc_overhead_per_stage_s": round((dvc_s - base_s) / n_stages, 2),
        "dag_overhead_per_stage_s": round((run["seconds"] - base_s) / n_stages, 2),
        "cold_repro_s": round(cold_s, 2),
        "cold_overhead_per_stage_s": round((cold_s - base_s) / n_stages, 2),
        "noop_dvc_repro_s": round(noop_dvc, 2),
        "noop_dvc_repro_no_runner_s": round(noop_fresh_s, 2),
        "noop_cold_repro_s": round(noop_cold, 2),
        "noop_dag_run_s": round(noop_run["seconds"], 2),
        "dag_no_task_runner_s": round(crun["seconds"], 2),
        "dag_no_task_runner_overhead_per_stage_s": round((crun["seconds"] - base_s) / n_stages, 2),
        "dag_no_task_runner_overhead_light_stage_s": _overhead(cold_dag_walls, baseline["stages"]),
        "dag_no_task_runner_task_s": cold_dag_walls,
        "noop_dag_per_stage_s": round(noop_run["seconds"] / n_stages, 2),
        "light_stages": list(LIGHT),
        "dvc_overhead_light_stage_s": _overhead(dvc_walls, baseline["stages"]),
        "cold_overhead_light_stage_s": _overhead(cold_walls, baseline["stages"]),
        "dag_overhead_light_stage_s": _overhead(dag_walls, baseline["stages"]),
        "baseline_stage_s": baseline["stages"],
        "dvc_stage_s": dvc_walls,
        "cold_stage_s": cold_walls,
        "dag_task_s": dag_walls,
        "load_after": _load(),
    }
    _stop_runners(spaces["dag"])  # none expected: a task's own runner goes with its task
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
