"""The DVC remote as the one place workers exchange data (the production topology, settings ``dvc_remote``).

Each worker has its own workspace (a clone of the repository). What a task needs to see what the previous one
produced is small and textual, the **workspace state**: ``dvc.lock``, the ``.dvc`` pointer files (the raw store)
and the training watermark. The data behind it (content-addressed) lives in the DVC remote. So a task that
touches DVC does:

1. ``sync_in``: point the workspace at the remote (``.dvc/config.local``), write the state it was handed (the
   previous task's, through XCom) or else the latest one published on the remote, then ``dvc pull`` what that
   state references;
2. its work (``dvc repro --single-item STAGE``, ``flywheel export``, ...);
3. ``sync_out``: ``dvc push`` what it produced and publish the new state: returned (for XCom) and written to the
   remote as ``flywheel-state/latest.json`` and ``flywheel-state/runs/<run id>/<task>.json`` (the lineage: with
   the Airflow run id a model version is tagged with, ``flywheel restore --run-id RUN_ID`` on a fresh clone
   writes that run's state and pulls the exact data behind the version).

Without ``dvc_remote`` nothing of this runs: one workspace, as with ``dvc repro`` by hand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REMOTE = "flywheel"
STATE_PREFIX = "flywheel-state"


class RemoteError(RuntimeError):
    pass


def _dvc(args: list[str], root: Path, env: dict[str, str], what: str) -> str:
    exe = Path(sys.executable).with_name("dvc")
    proc = subprocess.run([str(exe) if exe.exists() else "dvc", *args], cwd=root, env=env, text=True,
                          capture_output=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise RemoteError(f"{what} failed (exit {proc.returncode}): {tail}")
    return proc.stdout


def _fs(url: str, env: dict[str, str]):
    """An fsspec filesystem and the root path for the remote ``url`` (s3://... or a local folder)."""
    import fsspec

    if "://" not in url:
        return fsspec.filesystem("file"), url.rstrip("/")
    protocol, _, path = url.partition("://")
    kwargs = {}
    if protocol == "s3":
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        kwargs = {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
        kwargs["skip_instance_cache"] = True
    return fsspec.filesystem(protocol, **kwargs), path.rstrip("/")


def configure(root: Path, url: str, env: dict[str, str]) -> None:
    """Make ``url`` the workspace's default DVC remote (in .dvc/config.local: per machine, never committed)."""
    _dvc(["remote", "add", "--local", "--force", "--default", REMOTE, url], root, env, f"dvc remote add {url}")
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if url.startswith("s3://") and endpoint:
        _dvc(["remote", "modify", "--local", REMOTE, "endpointurl", endpoint], root, env, "dvc remote modify")


def read_state(root: Path, extra: list[Path] = ()) -> dict[str, str]:
    """The workspace state: dvc.lock, every .dvc pointer file and ``extra`` (the training watermark), by
    path relative to ``root``."""
    files = [root / "dvc.lock", *extra]
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("node_modules", "__pycache__")]
        files += [Path(folder) / n for n in names if n.endswith(".dvc")]
    return {str(p.relative_to(root)): p.read_text() for p in sorted(set(files)) if p.is_file()}


def write_state(root: Path, state: dict[str, str]) -> list[str]:
    """Write the files of ``state`` into the workspace; returns those that changed."""
    changed = []
    for rel, text in state.items():
        path = (root / rel).resolve()
        if root.resolve() not in path.parents:
            raise RemoteError(f"workspace state names a path outside the workspace: {rel!r}")
        if path.is_file() and path.read_text() == text:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".sync-tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        changed.append(rel)
    return changed


def publish_state(url: str, state: dict[str, str], run_id: str, task_id: str, env: dict[str, str]) -> None:
    fs, base = _fs(url, env)
    body = json.dumps({"run_id": run_id, "task_id": task_id, "files": state}, indent=1)
    safe_run = run_id.replace("/", "_")
    for rel in (f"runs/{safe_run}/{task_id}.json", f"runs/{safe_run}/_last.json", "latest.json"):
        path = f"{base}/{STATE_PREFIX}/{rel}"
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(path, "w") as fh:
            fh.write(body)


def fetch_state(url: str, env: dict[str, str], run_id: str | None = None, task_id: str | None = None
                ) -> dict[str, str] | None:
    """The latest published state (or one run's, the last task's unless ``task_id``); None when none."""
    fs, base = _fs(url, env)
    if run_id is None:
        path = f"{base}/{STATE_PREFIX}/latest.json"
    else:
        folder = f"{base}/{STATE_PREFIX}/runs/{run_id.replace('/', '_')}"
        path = f"{folder}/{task_id or '_last'}.json"          # _last: what the run's last task published
    try:
        with fs.open(path, "r") as fh:
            return json.load(fh)["files"]
    except FileNotFoundError:
        return None


def sync_in(root: Path, url: str, env: dict[str, str], state: dict[str, str] | None,
            log=print) -> dict[str, str] | None:
    """Before a task: the remote configured, ``state`` (or the latest published) written, its data pulled."""
    configure(root, url, env)
    if state is None:
        state = fetch_state(url, env)
    if state:
        changed = write_state(root, state)
        log(f"workspace state: {len(state)} files, {len(changed)} changed ({', '.join(changed) or 'none'})")
    out = _dvc(["pull", "--allow-missing", "--force"], root, env, "dvc pull")
    log("dvc pull: " + (out.strip().splitlines() or ["nothing to pull"])[-1])
    return state


def sync_out(root: Path, url: str, env: dict[str, str], run_id: str, task_id: str,
             targets: list[str] | None = None, extra: list[Path] = (), log=print) -> dict[str, str]:
    """After a task: what it produced pushed, the new workspace state published and returned."""
    if targets is None or targets:                   # [] = nothing of its own to push (the state only)
        out = _dvc(["push", *(targets or [])], root, env, "dvc push")
        log("dvc push: " + (out.strip().splitlines() or ["nothing to push"])[-1])
    state = read_state(root, extra)
    publish_state(url, state, run_id, task_id, env)
    return state
