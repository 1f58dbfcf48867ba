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

Two rules keep anything accepted from being lost or brought back by a sync:

- a sync never overwrites **unpublished local changes**: each workspace records what it last pulled or
  published (``.dvc/tmp/flywheel-synced.json``); a state file (or the raw store's data behind its pointer) that
  differs from that record and from what the sync brings was changed here and never published, and ``sync_in``
  fails naming the files and the fix (``flywheel publish`` to keep them, ``flywheel restore --force`` to drop
  them). Only changes left by a task or command that stopped before publishing (its push failed) are kept, when
  the remote still holds the state it started from, and published by the next task.
  Commands run by hand that change the raw store (ingest, export, erase) publish like a task does;
- ``latest.json`` moves by **merge**: a task publishes only the files it changed (against the state it started
  from) over the current latest, so a task handed an older state (through XCom) cannot roll back a raw store
  another task published meanwhile; a file both changed fails loudly.

A state names only ``dvc.lock``, ``.dvc`` pointers of data (their outputs inside the workspace, never a file git
tracks) and the training watermark: a state from S3 or XCom cannot overwrite code or ``dvc.yaml``.

Without ``dvc_remote`` nothing of this runs: one workspace, as with ``dvc repro`` by hand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

REMOTE = "flywheel"
STATE_PREFIX = "flywheel-state"
RECORD = Path(".dvc") / "tmp" / "flywheel-synced.json"  # what this workspace last pulled or published


class RemoteError(RuntimeError):
    pass


class UnpublishedChanges(RemoteError):
    """The workspace holds changes never published to the remote; the sync would have overwritten them."""


def _dvc(args: list[str], root: Path, env: dict[str, str], what: str) -> str:
    exe = Path(sys.executable).with_name("dvc")
    proc = subprocess.run(
        [str(exe) if exe.exists() else "dvc", *args], cwd=root, env=env, text=True, capture_output=True
    )
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


def _rels(root: Path, extra: Iterable[Path | str]) -> set[str]:
    return {os.path.relpath(Path(e).resolve(), root.resolve()) if Path(e).is_absolute() else str(e) for e in extra}


def _git_tracked(root: Path, rel: str) -> bool:
    proc = subprocess.run(["git", "ls-files", "-z", "--", rel], cwd=root, capture_output=True, text=True)
    return proc.returncode == 0 and bool(proc.stdout.strip("\0"))


def _inside(root: Path, rel: str, what: str) -> Path:
    """``root / rel`` for a plain relative path inside the workspace: no absolute path, no ``..``, no component
    that is a symbolic link, nothing under .git or .dvc."""
    pure = PurePosixPath(rel) if isinstance(rel, str) and rel and "\\" not in rel else None
    if pure is None or pure.is_absolute() or any(p in ("..", ".", ".git", ".dvc") for p in pure.parts) or "://" in rel:
        raise RemoteError(
            f"workspace state: {what} {rel!r} is outside the workspace or not a plain relative "
            "path (absolute, '..', under .git or .dvc); refused"
        )
    base = root.resolve()
    path = base.joinpath(*pure.parts)
    if path.resolve() != path:  # a symlink on the way could lead anywhere, code included
        raise RemoteError(
            f"workspace state: {what} {rel!r} goes through a symbolic link (to {path.resolve()}); refused"
        )
    return path


def _check_pointer(root: Path, rel: str, text: str) -> None:
    """A ``.dvc`` pointer of data (what ``dvc add`` writes): ``outs`` only, each inside the workspace and never
    a file or folder git tracks (code, dvc.yaml, params.yaml)."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RemoteError(f"workspace state: {rel} is not valid YAML: {exc}") from None
    if not isinstance(data, dict) or set(data) - {"outs"} or not isinstance(data.get("outs"), list):
        raise RemoteError(
            f"workspace state: {rel} is not a data pointer (expected only 'outs', as `dvc add` "
            f"writes; found {sorted(data) if isinstance(data, dict) else type(data).__name__})"
        )
    folder = str(PurePosixPath(rel).parent)
    for out in data["outs"]:
        if not isinstance(out, dict) or not isinstance(out.get("path"), str):
            raise RemoteError(f"workspace state: {rel}: an output without a path")
        target = os.path.normpath(os.path.join(folder, out["path"])) if "://" not in out["path"] else out["path"]
        _inside(root, target, f"{rel} output")
        if _git_tracked(root, target):
            raise RemoteError(
                f"workspace state: {rel} points at {target!r}, which git tracks (code or "
                f"configuration); a data pointer may not overwrite it"
            )


def check_state(root: Path, state: dict[str, str], extra: Iterable[Path | str] = ()) -> None:
    """Refuse a state that names anything but ``dvc.lock``, ``.dvc`` data pointers inside the workspace and
    the ``extra`` files (the training watermark): a state read from the remote or from XCom must never be able
    to write code, ``dvc.yaml`` or ``params.yaml`` on a worker."""
    allowed = _rels(root, extra)
    for rel, text in state.items():
        _inside(root, rel, "file")
        name = PurePosixPath(rel).name
        if not isinstance(text, str):
            raise RemoteError(f"workspace state: {rel!r} has no text content")
        if rel in allowed or rel == "dvc.lock":
            continue
        if name.endswith(".dvc") and len(name) > 4:
            _check_pointer(root, rel, text)
            continue
        raise RemoteError(
            f"workspace state names {rel!r}: only dvc.lock, .dvc data pointers and "
            f"{', '.join(sorted(allowed)) or 'no other file'} may be written by a sync"
        )


def write_state(root: Path, state: dict[str, str], extra: Iterable[Path | str] = ()) -> list[str]:
    """Write the files of ``state`` into the workspace (all checked first, see ``check_state``); returns
    those that changed."""
    check_state(root, state, extra)
    changed = []
    for rel, text in state.items():
        path = root.resolve() / rel
        if path.is_file() and path.read_text() == text:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".sync-tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        changed.append(rel)
    return changed


# ---- what this workspace last synced, and what it changed since ---------------------------------------------------


def _load_record(root: Path) -> dict | None:
    try:
        return json.loads((root / RECORD).read_text())
    except (OSError, ValueError):
        return None


def _save_record(root: Path, files: dict[str, str], in_flight: str | None) -> None:
    path = root / RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"files": files, "in_flight": in_flight}, indent=1))
    os.replace(tmp, path)


def _git_head(root: Path, rel: str) -> str | None:
    proc = subprocess.run(["git", "show", f"HEAD:{rel}"], cwd=root, capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


def baseline(root: Path, rels: Iterable[str]) -> dict[str, str | None]:
    """What each file was when this workspace last synced: the record, else (never synced) the committed file."""
    record = _load_record(root)
    if record is not None:
        return {rel: record["files"].get(rel) for rel in rels}
    return {rel: _git_head(root, rel) for rel in rels}


def _published_anywhere(url: str, env: dict[str, str], rel: str, text: str) -> bool:
    """Whether any state on the remote has ``rel`` as ``text`` (a workspace synced before records existed)."""
    fs, base = _fs(url, env)
    for path in fs.glob(f"{base}/{STATE_PREFIX}/runs/*/_last.json"):
        try:
            with fs.open(path, "r") as fh:
                if json.load(fh)["files"].get(rel) == text:
                    return True
        except (OSError, ValueError, KeyError):
            continue
    return False


def _modified_data(root: Path, env: dict[str, str], pointers: list[str]) -> list[str]:
    """The pointers whose data in the workspace differs from what they record (e.g. a batch written, not added)."""
    present = [p for p in pointers if (root / p).is_file()]
    if not present:
        return []
    out = _dvc(["status", "--json", *present], root, env, "dvc status")
    status = json.loads(out or "{}")
    return sorted(
        p
        for p, changes in status.items()
        if any("modified" in (c.get("changed outs") or {}).values() for c in changes if isinstance(c, dict))
    )


def unpublished(root: Path, state: dict[str, str], env: dict[str, str], url: str | None = None) -> list[str]:
    """The files ``state`` would overwrite (or whose data a pull would reset) that were changed in this workspace
    since it last synced and never published: a differing local ``dvc.lock``/pointer/watermark, or raw-store data
    that differs from its pointer."""
    local = {rel: (root / rel).read_text() if (root / rel).is_file() else None for rel in state}
    differs = [rel for rel, text in local.items() if text is not None and text != state[rel]]
    base = baseline(root, differs)
    found = [rel for rel in differs if local[rel] != base[rel]]
    if found and url and _load_record(root) is None:
        found = [rel for rel in found if not _published_anywhere(url, env, rel, local[rel])]
    pointers = [rel for rel in state if rel.endswith(".dvc") and rel not in found]
    found += [
        f"{rel} (its data: changed in the workspace since it was written)"
        for rel in _modified_data(root, env, pointers)
    ]
    return found


def _unpublished_message(files: list[str], url: str) -> str:
    return (
        f"refusing to sync with the DVC remote {url}: this workspace has changes that were never published "
        f"there, and the sync would overwrite them: {', '.join(files)}. Keep them: `flywheel publish` (pushes "
        "the data and publishes this workspace's state; `dvc add` a changed data folder first). Drop them: "
        "`flywheel restore --force` (the remote's latest state and data). Commands that change the raw store "
        "(ingest, export, erase) publish by themselves when dvc_remote is set."
    )


def merge_latest(
    current: dict[str, str] | None, state: dict[str, str], base: dict[str, str | None] | None
) -> tuple[dict[str, str], list[str]]:
    """The remote's new latest state: ``current`` with the files ``state`` changed against ``base`` (the state
    its task started from); the files both changed (conflicts) are listed and keep ``current``'s version."""
    if current is None or base is None:
        return dict(state), []
    merged, conflicts = dict(current), []
    for rel in sorted(set(state) | set(base)):
        new, old = state.get(rel), base.get(rel)
        if new == old or current.get(rel) == new:
            continue  # this task left it as it was: the remote's latest stands
        if current.get(rel) != old:
            conflicts.append(rel)
        elif new is None:
            merged.pop(rel, None)
        else:
            merged[rel] = new
    return merged, conflicts


def publish_state(
    url: str,
    state: dict[str, str],
    run_id: str,
    task_id: str,
    env: dict[str, str],
    base: dict[str, str | None] | None = None,
) -> dict[str, str]:
    """Write ``state`` as the run's (and task's) state and merge it into the latest (see ``merge_latest``; with
    no ``base`` it replaces the latest). Returns the new latest; raises naming the files both changed."""
    fs, base_path = _fs(url, env)
    safe_run = run_id.replace("/", "_")

    def write(rel: str, files: dict[str, str]) -> None:
        path = f"{base_path}/{STATE_PREFIX}/{rel}"
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(path, "w") as fh:
            fh.write(json.dumps({"run_id": run_id, "task_id": task_id, "files": files}, indent=1))

    for rel in (f"runs/{safe_run}/{task_id}.json", f"runs/{safe_run}/_last.json"):
        write(rel, state)
    latest, conflicts = merge_latest(fetch_state(url, env) if base is not None else None, state, base)
    if conflicts:
        raise RemoteError(
            f"cannot publish {', '.join(conflicts)} as the latest state on {url}: the latest changed "
            "it too since this workspace synced (both sides changed it; publishing would drop the "
            "remote's change). This task's state is kept as run "
            f"{run_id!r} task {task_id!r}. Bring the remote's state in with `flywheel restore --force` "
            "after copying aside what must be kept (new raw-store batches are files under the raw "
            "store's date=*/ folders), put it back, then `flywheel ingest` or `dvc add` it and "
            "`flywheel publish`."
        )
    write("latest.json", latest)
    return latest


def fetch_state(
    url: str, env: dict[str, str], run_id: str | None = None, task_id: str | None = None
) -> dict[str, str] | None:
    """The latest published state (or one run's, the last task's unless ``task_id``); None when none."""
    fs, base = _fs(url, env)
    if run_id is None:
        path = f"{base}/{STATE_PREFIX}/latest.json"
    else:
        folder = f"{base}/{STATE_PREFIX}/runs/{run_id.replace('/', '_')}"
        path = f"{folder}/{task_id or '_last'}.json"  # _last: what the run's last task published
    try:
        with fs.open(path, "r") as fh:
            return json.load(fh)["files"]
    except FileNotFoundError:
        return None


def sync_in(
    root: Path,
    url: str,
    env: dict[str, str],
    state: dict[str, str] | None,
    log=print,
    extra: Iterable[Path | str] = (),
    task: str | None = None,
    force: bool = False,
) -> dict[str, str] | None:
    """Before a task: the remote configured, ``state`` (or the latest published) written, its data pulled.
    Unpublished local changes are never overwritten (``UnpublishedChanges``) unless ``force``; those left by a
    task or command that stopped before publishing (``task`` is recorded as in flight until ``sync_out``) are
    kept when the state handed over is still the one it started from, and published by this task's
    ``sync_out``."""
    configure(root, url, env)
    if state is None:
        state = fetch_state(url, env)
    state = state or {}
    check_state(root, state, extra)
    keep: list[str] = []
    pending = [] if force else unpublished(root, state, env, url)
    if pending:
        # an interrupted task or command (its push failed) left them, and the remote still holds what it
        # started from: nothing to overwrite them with, so they are kept and this task publishes them
        record = _load_record(root) or {}
        interrupted = record.get("in_flight")
        if not (interrupted and all(rel in state and state[rel] == record["files"].get(rel) for rel in pending)):
            raise UnpublishedChanges(_unpublished_message(pending, url))
        keep = pending
        log(
            f"keeping {', '.join(keep)}: left by {interrupted}, which stopped before publishing; published "
            "after this task"
        )
    before = baseline(root, read_state(root, extra))
    if state:
        changed = write_state(root, {k: v for k, v in state.items() if k not in keep}, extra)
        log(f"workspace state: {len(state)} files, {len(changed)} changed ({', '.join(changed) or 'none'})")
    out = _dvc(["pull", "--allow-missing", "--force"], root, env, "dvc pull")
    log("dvc pull: " + (out.strip().splitlines() or ["nothing to pull"])[-1])
    # the new baseline: what the remote handed over; files it did not name keep theirs (unpublished stays so)
    _save_record(root, {**{k: v for k, v in before.items() if v is not None}, **state}, task)
    return state or None


def end_task(root: Path) -> None:
    """A task that publishes nothing is over: what it changed (nothing, normally) stays unpublished."""
    record = _load_record(root)
    if record is not None:
        _save_record(root, record["files"], None)


def sync_out(
    root: Path,
    url: str,
    env: dict[str, str],
    run_id: str,
    task_id: str,
    targets: list[str] | None = None,
    extra: list[Path] = (),
    log=print,
) -> dict[str, str]:
    """After a task: what it produced pushed, the new workspace state published (merged into the latest
    against the state the task started from) and returned."""
    if targets is None or targets:  # [] = nothing of its own to push (the state only)
        out = _dvc(["push", *(targets or [])], root, env, "dvc push")
        log("dvc push: " + (out.strip().splitlines() or ["nothing to push"])[-1])
    state = read_state(root, extra)
    publish_state(url, state, run_id, task_id, env, base=baseline(root, state))
    _save_record(root, state, None)
    return state
