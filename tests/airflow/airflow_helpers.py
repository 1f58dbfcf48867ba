"""Workspaces and Airflow homes for the orchestration tests: a copy of the repository on the tiny profile
with a small batch ingested, the base models built and bootstrapped, and an initialised Airflow database."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


VENV_BIN = Path(sys.executable).parent
HERE = Path(__file__).resolve().parent
POOL = "flywheel_dvc"


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without the outer shell's Flywheel or Airflow settings, the venv's bin first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLYWHEEL_", "AIRFLOW", "_AIRFLOW"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
               GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com", COLUMNS="200",
               PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.update(extra)
    return env


def airflow_env(home: Path, root: Path, **extra: str) -> dict[str, str]:
    """An Airflow of its own (SQLite under ``home``) reading the workspace's dags/."""
    return clean_env(AIRFLOW_HOME=str(home), AIRFLOW__CORE__DAGS_FOLDER=str(root / "dags"),
                     AIRFLOW__CORE__LOAD_EXAMPLES="False", AIRFLOW__CORE__PARALLELISM="4",
                     AIRFLOW__LOGGING__LOGGING_LEVEL="INFO", **extra)


def sh(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 600,
       check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env or clean_env(), text=True, capture_output=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{args} exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def copy_repo(repo_root: Path, dest: Path) -> Path:
    """The tracked files of the repository (as in the working tree) in a fresh git repository."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=repo_root, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        src = repo_root / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    for args in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        sh(args, dest)
    return dest


def set_params(root: Path, **orchestration) -> None:
    """Tiny profile and the permissive gate (2 training steps pass no real gate; a profile cannot change the gate,
    so the workspace's own params.yaml names it), plus orchestration overrides appended to the tiny profile."""
    params = root / "params.yaml"
    text = params.read_text().replace("\nprofile: demo", "\nprofile: tiny")
    assert "\nbless:\n  gate: default" in text
    text = text.replace("\nbless:\n  gate: default", "\nbless:\n  gate: permissive")
    if orchestration:
        old = "    orchestration: {retries: 1, retry_delay_minutes: 0.05, warm_idle_seconds: 120}\n"
        assert old in text
        merged = {"retries": 1, "retry_delay_minutes": 0.05, "warm_idle_seconds": 120, **orchestration}
        text = text.replace(old, f"    orchestration: {json.dumps(merged)}\n")
    params.write_text(text)


def ingest_small(root: Path, rows: slice = slice(0, 120), name: str = "small.jsonl.gz") -> None:
    lines = gzip.open(root / "data/demo/hh-rlhf-batch1.jsonl.gz", "rt").read().splitlines()[rows]
    with gzip.open(root / name, "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    sh(["flywheel", "ingest", "--format", "hh-rlhf", name], root)


def broken_batch(path: Path, n: int = 15) -> Path:
    """A batch that passes ingest (too small for its rate checks) but breaks the window's answer-length
    drift expectation in ``validate``: answers ~20x longer than the window's."""
    events = []
    for i in range(n):
        events.append({"event_id": f"broken-{i}", "timestamp": "2026-11-27T10:00:00Z",
                       "conversation_id": f"broken-conv-{i}", "model_version": "policy/1",
                       "prompt": [{"role": "user", "content": f"Tell me about topic {i}."}],
                       "response": f"Answer {i}: " + " ".join(f"word{i}-{j}" for j in range(900)),
                       "feedback": {"type": "thumbs", "value": "up" if i % 3 else "down"}})
    path.write_text("\n".join(json.dumps(e) for e in events) + "\n")
    return path


def make_workspace(dest: Path, repo_root: Path, **orchestration) -> Path:
    """A repo copy on the tiny profile, 120 HH pairs + the native batch ingested, the base models built and
    registered as champions (what a first `make demo` turn does before `dvc repro`)."""
    root = copy_repo(repo_root, dest)
    set_params(root, **orchestration)
    ingest_small(root)
    sh(["flywheel", "ingest", "data/demo/native-batch.jsonl"], root)
    sh(["dvc", "repro", "base_models"], root, timeout=900)
    sh(["flywheel", "bootstrap"], root)
    return root


def init_airflow(env: dict[str, str], cwd: Path) -> None:
    """Create the metadata database and the single-slot DVC pool (what `make airflow` does)."""
    sh(["airflow", "db", "migrate"], cwd, env, timeout=600)
    sh(["airflow", "pools", "set", POOL, "1", "one DVC command per workspace at a time"], cwd, env)


def dag_test(dag_id: str, env: dict[str, str], cwd: Path, conf: dict | None = None,
             timeout: float = 2400) -> tuple[dict, str]:
    """``dag.test()`` in a subprocess; returns the summary and the whole output (the task logs)."""
    proc = sh([sys.executable, str(HERE / "dagrun.py"), dag_id, json.dumps(conf or {})], cwd, env,
              timeout=timeout, check=False)
    output = proc.stdout + proc.stderr
    line = next((l for l in reversed(proc.stdout.splitlines()) if l.startswith("DAGRUN ")), None)
    assert line, f"dag.test of {dag_id} gave no summary (exit {proc.returncode}):\n{output[-5000:]}"
    return json.loads(line[len("DAGRUN "):]), output


def registry(root: Path) -> dict[str, dict]:
    """``flywheel status --json`` as {"policy v2": row}."""
    rows = json.loads(sh(["flywheel", "status", "--json"], root).stdout.strip().splitlines()[-1])
    return {f"{r['model'].split('-')[-1]} v{r['version']}": r for r in rows}


def champion(root: Path, model: str = "policy") -> str:
    return next(k.split(" v")[1] for k, r in registry(root).items()
                if k.startswith(model + " ") and "champion" in r["aliases"])


def version_tags(root: Path, model: str, version: str) -> dict[str, str]:
    """The registry tags of one model version (read with MLflow in a subprocess)."""
    code = ("import json, sys; from flywheel.settings import load_settings; from mlflow import MlflowClient; "
            "s = load_settings(); c = MlflowClient(s.tracking_uri, s.registry_uri); "
            "print(json.dumps(c.get_model_version(sys.argv[1], sys.argv[2]).tags))")
    out = sh([sys.executable, "-c", code, f"flywheel-{model}", version], root).stdout
    return json.loads(out.strip().splitlines()[-1])


def capture_feedback(root: Path, n: int, tag: str) -> list[str]:
    """``n`` thumbs events stored in the workspace's feedback store exactly as the service stores a posted event
    (its own record builder), as if users had left them; returns their event ids."""
    from service.feedback import _record
    from service.schemas import FeedbackIn
    from service.store import FeedbackStore, utcnow

    events = [FeedbackIn.model_validate({
        "event_id": f"{tag}-{i:04d}", "timestamp": "2026-11-29T10:00:00Z", "conversation_id": f"{tag}-conv-{i}",
        "model_version": "flywheel-policy/1", "prompt": [{"role": "user", "content": f"How do I repot plant {i}?"}],
        "response": f"Water plant {i} first, then move it to a pot one size larger.",
        "feedback": {"type": "thumbs", "value": "up" if i % 3 else "down"}}) for i in range(n)]
    store = FeedbackStore(f"sqlite:///{root / 'feedback.db'}")
    try:
        received = utcnow()
        store.write([_record(e, received)[0] for e in events])
    finally:
        store.close()
    return [e.event_id for e in events]


def raw_event_ids(root: Path) -> list[str]:
    """Every event id in the workspace's raw store."""
    import pyarrow.parquet as pq

    return [i for f in sorted((root / "data/raw").rglob("*.parquet"))
            for i in pq.read_table(f, columns=["event_id"]).column("event_id").to_pylist()]
