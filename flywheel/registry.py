"""The MLflow model registry: registration keyed by content hash, aliases, promotion and rollback.

Aliases, never stages: ``champion`` serves, ``challenger`` is the candidate under release,
``previous-champion`` is where a rollback goes. Registering the same model folder twice returns the
version it already has.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

POLICY = "flywheel-policy"
REWARD = "flywheel-reward"
MODELS = {"policy": POLICY, "reward": REWARD}
KIND_OF = {v: k for k, v in MODELS.items()}
CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous-champion"


class RegistryError(RuntimeError):
    pass


def content_hash(folder: Path) -> str:
    """SHA-256 over the relative names and bytes of every file in a model folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RegistryError(f"model folder {folder} does not exist")
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def base_hash(folder: Path) -> str:
    """The content hash of a base model folder, read from ``<folder>.sha256`` (written by base_models beside the
    folder) when present, else computed."""
    stamp = Path(folder).with_name(Path(folder).name + ".sha256")
    if stamp.is_file():
        return stamp.read_text().strip()
    return content_hash(folder)


def is_base_version(folder: Path, info: dict, base: Path) -> bool:
    """Whether a champion (its local ``folder`` and champion.json entry ``info``) is the base model ``base``: the
    base itself, or its registered copy (the same content hash)."""
    if info.get("version") == "base" or Path(folder).resolve() == Path(base).resolve():
        return True
    return info.get("content_hash") == base_hash(base)


@dataclass
class Version:
    name: str
    version: str
    source: str
    tags: dict
    aliases: list[str]
    description: str = ""


def _v(mv) -> Version:
    return Version(
        mv.name,
        str(mv.version),
        mv.source,
        dict(mv.tags or {}),
        list(getattr(mv, "aliases", []) or []),
        mv.description or "",
    )


class Registry:
    """A thin façade over ``MlflowClient`` for Flywheel's two registered models."""

    def __init__(self, settings):
        from mlflow import MlflowClient

        from flywheel import tracking

        self.settings = settings
        self.experiment_id = tracking.configure_from(settings)
        self.client = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.registry_uri)

    def _ensure(self, name: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
        except MlflowException:
            self.client.create_registered_model(name, description=f"Flywheel {name.split('-')[-1]} model")

    def alias(self, name: str, alias: str) -> Version | None:
        from mlflow.exceptions import MlflowException

        try:
            return _v(self.client.get_model_version_by_alias(name, alias))
        except MlflowException:
            return None

    def get(self, name: str, version: str) -> Version:
        from mlflow.exceptions import MlflowException

        try:
            return _v(self.client.get_model_version(name, str(version)))
        except MlflowException:
            raise RegistryError(f"{name} has no version {version}") from None

    def versions(self, name: str) -> list[Version]:
        from mlflow.exceptions import MlflowException

        try:
            found = self.client.search_model_versions(f"name='{name}'")
            aliases = self.client.get_registered_model(name).aliases or {}
        except MlflowException:
            return []
        versions = sorted((_v(m) for m in found), key=lambda v: int(v.version))
        for v in versions:
            v.aliases = sorted(a for a, num in aliases.items() if str(num) == v.version)
        return versions

    def find_by_hash(self, name: str, digest: str) -> Version | None:
        for v in self.versions(name):
            if v.tags.get("content_hash") == digest:
                return v
        return None

    def register(
        self,
        name: str,
        folder: Path,
        tags: dict | None = None,
        digest: str | None = None,
        run_id: str | None = None,
        base: Path | None = None,
    ) -> tuple[Version, bool]:
        """(version, created): the folder's version, registering it only if its content is new. The version is an
        MLflow Model (flywheel/models/logged.py); an adapter version records the base it loads on (``base``: the
        workspace's base policy folder)."""
        import mlflow

        from flywheel.models import logged
        from flywheel.models.policy import is_adapter

        digest = digest or content_hash(folder)
        existing = self.find_by_hash(name, digest)
        if existing is not None:
            return existing, False
        self._ensure(name)
        kind = KIND_OF[name]
        all_tags = {"content_hash": digest, **{k: str(v)[:5000] for k, v in (tags or {}).items()}}
        if kind == "policy" and is_adapter(folder):
            if base is None:
                raise RegistryError(f"{folder} is a LoRA adapter: registering it needs the base models' folder")
            all_tags.update(weights="lora adapter", **logged.base_record(base / "policy"))
        elif kind == "policy":
            all_tags["weights"] = "full"
        if run_id:  # the training run: a tag (a tracking server requires the version's run to
            all_tags["training_run_id"] = run_id  # be the one holding its files, the register run)
        meta = {"flywheel_content_hash": digest, "flywheel_kind": kind}
        with mlflow.start_run(  # under the loop's run when there is one (one run tree per loop turn)
            experiment_id=self.experiment_id,
            run_name=f"register-{name}",
            parent_run_id=self.settings.parent_run_id or None,
            tags={"flywheel.stage": "register"},
        ) as run:
            try:
                info = logged.log_version(kind, Path(folder), base / "policy" if base else None, meta)
                source, model_id = info.model_uri, info.model_id
            except Exception as exc:  # a folder that does not load: kept as files, so the refusal is on record
                mlflow.log_artifacts(str(folder), artifact_path="model")
                source, model_id = f"{run.info.artifact_uri}/model", None
                all_tags["mlflow_model"] = f"not an MLflow Model: it failed to load ({type(exc).__name__}: {exc})"[:500]
        mv = self.client.create_model_version(
            name, source=source, run_id=run.info.run_id, tags=all_tags, model_id=model_id
        )
        return _v(mv), True

    def set_tags(self, name: str, version: str, tags: dict) -> None:
        for k, v in tags.items():
            self.client.set_model_version_tag(name, str(version), k, str(v)[:5000])

    def describe(self, name: str, version: str, text: str) -> None:
        """The version's description (the MLflow UI shows it on the version's page and in the list)."""
        self.client.update_model_version(name, str(version), description=text)

    def delete_tags(self, name: str, version: str, keys: list[str]) -> None:
        """Remove these tags from the version where it has them."""
        have = self.get(name, version).tags
        for k in keys:
            if k in have:
                self.client.delete_model_version_tag(name, str(version), k)

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(name, alias, str(version))

    def delete_alias(self, name: str, alias: str) -> None:
        self.client.delete_registered_model_alias(name, alias)

    def promote(self, name: str, version: str) -> Version | None:
        """Move ``champion`` to ``version``: ``previous-champion`` is set first, then ``champion`` in one call.
        Returns the former champion (None if there was none or it is the same version)."""
        current = self.alias(name, CHAMPION)
        if current is not None and current.version == str(version):
            return None
        if current is not None:
            self.set_alias(name, PREVIOUS, current.version)
        self.set_alias(name, CHAMPION, version)
        return current

    def rollback(self, name: str, to_version: str | None = None) -> tuple[Version, Version]:
        """Point ``champion`` back at ``to_version`` (default: ``previous-champion``); the rolled-back
        version becomes ``previous-champion``. Returns (new champion, former champion). The aliases only: which
        versions may be rolled back to is ``flywheel.release.rollback``'s decision."""
        current = self.alias(name, CHAMPION)
        target = self.get(name, to_version) if to_version else self.alias(name, PREVIOUS)
        if target is None:
            raise RegistryError(f"{name} has no previous-champion to roll back to; name a version")
        if current is None:
            raise RegistryError(f"{name} has no champion")
        if target.version == current.version:
            raise RegistryError(f"{name} version {target.version} is already the champion")
        self.set_alias(name, CHAMPION, target.version)
        self.set_alias(name, PREVIOUS, current.version)
        return self.get(name, target.version), current

    def local_dir(self, version: Version) -> Path:
        """A local Flywheel model folder of the version: ``<models>/registry/<name>/<version>``, rebuilt once from
        the MLflow Model (one place per version, so every worker names it alike and a second call downloads
        nothing). A version registered before MLflow Models (a folder of files) is its artifact store's own folder
        when that is local."""
        from urllib.parse import urlparse

        import mlflow

        from flywheel.models.logged import materialize

        scheme = urlparse(version.source).scheme
        if scheme in ("", "file") or (len(scheme) == 1 and version.source[1:3] == ":\\"):
            return Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=version.source, tracking_uri=self.settings.tracking_uri
                )
            )
        dest = Path(self.settings.models) / "registry" / version.name / str(version.version)
        done = dest.with_name(dest.name + ".complete")  # beside it: inside, it would change the content hash
        if done.is_file() and dest.is_dir():
            return dest
        materialize(version.source, dest, self.settings.tracking_uri)
        done.write_text(version.source)
        return dest
