"""A worker that preloads the stages' libraries before it forks its tasks (flywheel/airflow_worker.py): a task
forks its stage runner from itself, so the stage finds the libraries imported, runs in the task's tree and
group, and holds none of the task's descriptors; where the stage's environment differs in what a library reads
at import, the runner is a fresh interpreter as before."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# the "library" the worker preloads: it records each time it is imported
_LIBRARY = "import os\nwith open(os.environ['IMPORTS_LOG'], 'a') as fh:\n    fh.write(f'{os.getpid()} ')\n"
# what the runner's child calls: records what it sees, as a stage would run
_ENTRY = """
import json, os, sys
import psutil


def _target(n):
    try:
        return os.readlink(f"/proc/self/fd/{n}")
    except OSError:  # the listing's own descriptor, closed since
        return ""


def main():
    seen = {"preloaded": "heavy_lib" in sys.modules, "pid": os.getpid(), "pgid": os.getpgid(0),
            "ancestors": [p.pid for p in psutil.Process().parents()],
            "fds": [_target(n) for n in os.listdir("/proc/self/fd")]}
    import heavy_lib  # noqa: F401
    import logging
    logging.getLogger("stage").warning("a stage's warning")
    json.dump(seen, open(sys.argv[-1], "w"))
"""
_CLIENT = """
import sys
from flywheel.warm import run_stage
code = run_stage(["flywheel", "stage", "x", sys.argv[1]], entry="stage_entry:main")
sys.exit(3 if code is None else code)
"""
# the task: a process forked from a worker that preloaded (here the worker and the task are one process, as in
# `airflow dags test`); it holds a connection of its own (as Airflow's task holds its supervisor's) and a logging
# handler writing to it
_TASK = """
import json, logging, os, socket, sys
from pathlib import Path
from flywheel import orchestration as orch, warm_runner
if sys.argv[3] == "preload":
    warm_runner.preload_worker(("heavy_lib",))
held, other = socket.socketpair()
logging.root.addHandler(logging.StreamHandler(held.makefile("w")))
Path(sys.argv[2]).write_text(os.readlink("/proc/self/fd/%d" % held.fileno()))
orch.stage_command = lambda stage: [sys.executable, "-c", {client!r}, {seen!r}]
env = {{**orch.command_env(Path.cwd()), "XDG_RUNTIME_DIR": sys.argv[1]}}
env.update(json.loads(sys.argv[4]))
orch.run_stage(Path.cwd(), "train", env, print, entry="stage_entry:main")
other.setblocking(False)
try:
    got = other.recv(65536).decode()
except BlockingIOError:
    got = ""
print("TASK CONNECTION GOT: " + repr(got))
"""


def _run_task(tmp_path: Path, mode: str, stage_env: dict | None = None) -> tuple[dict, str]:
    (tmp_path / "heavy_lib.py").write_text(_LIBRARY)
    (tmp_path / "stage_entry.py").write_text(_ENTRY)
    run = tmp_path / "run"
    run.mkdir(mode=0o700, exist_ok=True)
    seen, held = tmp_path / "seen.json", tmp_path / "held"
    task = _TASK.format(client=_CLIENT, seen=str(seen))
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "IMPORTS_LOG": str(tmp_path / "imports")}
    env.pop("FLYWHEEL_WARM_SOCKET", None)
    args = [sys.executable, "-c", task, str(run), str(held), mode, json.dumps(stage_env or {})]
    proc = subprocess.run(
        args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, start_new_session=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert seen.exists(), proc.stdout + proc.stderr
    found = json.loads(seen.read_text())
    found["held"] = held.read_text()
    found["imports"] = (tmp_path / "imports").read_text().split()
    return found, proc.stdout + proc.stderr


def test_a_preloaded_task_forks_a_warm_runner_in_its_tree_without_its_descriptors(tmp_path):
    seen, out = _run_task(tmp_path, "preload")
    assert "forked from its worker's preloaded libraries" in out
    assert seen["preloaded"], "the stage imported the library again"
    assert len(seen["imports"]) == 1, f"imported {len(seen['imports'])} times: {seen['imports']}"
    runner, task = seen["ancestors"][0], seen["ancestors"][1]
    assert seen["imports"] == [str(task)], "the library was not imported by the task (the worker) before the fork"
    assert runner != task and seen["pgid"] == task, "the stage is not in the task's process group"
    assert seen["held"] not in seen["fds"], "the stage holds the task's connection"
    assert "TASK CONNECTION GOT: ''" in out, "the stage's logging wrote to the task's connection"
    assert "a stage's warning" in out and "Logging error" not in out, "the stage logged through the task's handlers"


def test_a_task_without_a_preloading_worker_starts_its_runner_afresh(tmp_path):
    seen, out = _run_task(tmp_path, "cold")
    assert "forked from its worker" not in out
    assert not seen["preloaded"] and len(seen["imports"]) == 1 and seen["imports"] == [str(seen["pid"])]


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "TRANSFORMERS_CACHE", "PYTHONHASHSEED"])
def test_a_stage_environment_that_libraries_read_at_import_gets_a_fresh_runner(tmp_path, variable):
    """The libraries were imported under the worker's environment: a stage whose environment changes what a library
    reads at import (offline mode, a cache folder, hashing) must not inherit them."""
    other = "2" if os.environ.get(variable) == "1" else "1"  # `make test` exports HF_HUB_OFFLINE=1
    seen, out = _run_task(tmp_path, "preload", {variable: other})
    assert "forked from its worker" not in out and f"under other values of {variable}" in out
    assert not seen["preloaded"], "the stage inherited libraries imported under another environment"


def test_a_stage_environment_that_only_changes_what_is_read_when_used_shares_the_libraries(tmp_path):
    """MLflow reads its variables when called (the tracking URI a task sets for its stage): still shared."""
    seen, out = _run_task(tmp_path, "preload", {"MLFLOW_TRACKING_URI": "sqlite:///elsewhere.db", "FLYWHEEL_X": "1"})
    assert "forked from its worker's preloaded libraries" in out and seen["preloaded"]


def _run_custom(tmp_path: Path, entry: str, prelude: str, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """A task process that runs ``prelude`` (its preload and state), then its stage, whose runner's child calls
    ``entry``'s ``main``; the task's completed process and what the stage wrote."""
    (tmp_path / "heavy_lib.py").write_text(_LIBRARY)
    (tmp_path / "stage_entry.py").write_text(entry)
    (tmp_path / "run").mkdir(mode=0o700)
    seen = tmp_path / "seen.json"
    task = (
        "import sys; from pathlib import Path; from flywheel import orchestration as orch, warm_runner\n"
        + prelude
        + f"orch.stage_command = lambda stage: [sys.executable, '-c', {_CLIENT!r}, {str(seen)!r}]\n"
        "env = {**orch.command_env(Path.cwd()), 'XDG_RUNTIME_DIR': sys.argv[1]}\n"
        "orch.run_stage(Path.cwd(), 'train', env, print, entry='stage_entry:main')\n"
        "if 'after' in globals(): after()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "IMPORTS_LOG": str(tmp_path / "imports")}
    env.pop("FLYWHEEL_WARM_SOCKET", None)
    proc = subprocess.run(
        [sys.executable, "-c", task, str(tmp_path / "run"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and "forked from its worker" in proc.stdout, proc.stdout + proc.stderr
    return proc, json.loads(seen.read_text())


def test_the_stage_imports_the_projects_modules_afresh(tmp_path):
    """What the task imported of the project (and any state an earlier task of the same process left in it) is
    not what the stage runs: it imports the project's modules again, as a fresh process would."""
    entry = (
        "import json, sys\n\ndef main():\n"
        "    json.dump({'settings': 'flywheel.settings' in sys.modules, 'tag': getattr(sys.modules.get("
        "'flywheel.params'), 'LEFT_BY_A_TASK', None)}, open(sys.argv[-1], 'w'))\n"
    )
    prelude = (
        "from flywheel import params\nwarm_runner.preload_worker(('heavy_lib',)); params.LEFT_BY_A_TASK = 'stale'\n"
    )
    _, seen = _run_custom(tmp_path, entry, prelude)
    assert seen == {"settings": False, "tag": None}


def test_a_database_engine_the_task_used_opens_its_own_connection_in_the_stage(tmp_path):
    """A library's cached engine (MLflow keeps one per store URI) with a connection the task opened: the stage
    using it gets a connection of its own, not the task's (whose descriptor the runner no longer holds)."""
    entry = (
        "import json, sys\nimport sqlalchemy\n\ndef main():\n"
        "    with sqlalchemy._cached_engine.connect() as c:\n"
        "        n = c.execute(sqlalchemy.text('select count(*) from t')).scalar()\n"
        "    json.dump({'rows': n}, open(sys.argv[-1], 'w'))\n"
    )
    prelude = (
        "import sqlalchemy\nwarm_runner.preload_worker(('heavy_lib', 'sqlalchemy'))\n"
        "engine = sqlalchemy._cached_engine = sqlalchemy.create_engine('sqlite:///' + sys.argv[2])\n"
        "with engine.begin() as c:\n"
        "    c.execute(sqlalchemy.text('create table t (x int)'))\n"
        "    c.execute(sqlalchemy.text('insert into t values (1), (2)'))\n"
        "def after():\n"
        "    with engine.connect() as c:\n"
        "        print('TASK ROWS', c.execute(sqlalchemy.text('select count(*) from t')).scalar())\n"
    )
    proc, seen = _run_custom(tmp_path, entry, prelude, str(tmp_path / "db.sqlite"))
    assert seen == {"rows": 2}
    assert "TASK ROWS 2" in proc.stdout, "the task's own connection broke"
