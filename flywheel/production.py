"""The production topology's fail-fast check: does every service the settings name answer?

Six settings may name a network service: the Airflow metadata DB, the Celery broker, the MLflow tracking
and registry servers (or databases), the feedback store and the DVC remote. :func:`probe` tries a TCP
connection to each one's host and port with a short timeout; :func:`check_reachable` raises a
:class:`SettingsError` naming every setting that did not answer. Local values (SQLite files, folders,
empty settings) are skipped. Passwords never appear in a result or a message.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

from flywheel.settings import Settings, SettingsError, mask_url

NETWORK_SETTINGS = ("airflow_db", "celery_broker", "tracking_uri", "registry_uri", "feedback_store", "dvc_remote")
DEFAULT_TIMEOUT_S = 2.0
# An s3:// DVC remote is reached through this endpoint (MinIO, moto, ...); none set: AWS S3 itself.
S3_ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_AWS_S3 = "https://s3.amazonaws.com"
_DEFAULT_PORTS = {
    "postgresql": 5432,
    "mysql": 3306,
    "redis": 6379,
    "rediss": 6379,
    "amqp": 5672,
    "amqps": 5671,
    "pyamqp": 5672,
    "http": 80,
    "https": 443,
}


@dataclass(frozen=True)
class Probe:
    """What checking one setting found. ``url`` has its password masked."""

    setting: str
    url: str
    target: str = ""  # host:port tried; empty when skipped
    error: str = ""  # why the target did not answer; empty when it did (or was skipped)
    skipped: str = ""  # why nothing was tried (a local value or an empty setting)

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def message(self) -> str:
        if self.skipped:
            return f"settings.{self.setting}: not checked ({self.skipped})"
        via = f" via {self.target}" if self.target not in self.url else ""
        if self.error:
            return f"settings.{self.setting}: cannot reach {self.url}{via} ({self.error})"
        return f"settings.{self.setting}: {self.url}{via} answers"


def _host_port(setting: str, url: str, default_port: int) -> tuple[str, int] | None:
    try:
        parts = urlsplit(url)
        port = parts.port or default_port
    except ValueError as exc:  # a port that is not a number, a bad IPv6 literal
        raise SettingsError(f"settings.{setting}: {mask_url(url)!r} is not a valid URL ({exc})") from exc
    return (parts.hostname, port) if parts.hostname else None


def network_target(setting: str, url: str, env: Mapping[str, str]) -> tuple[str, int] | str:
    """The (host, port) a setting's URL makes Flywheel connect to, or why there is none to check."""
    if not url:
        return "empty"
    if "://" not in url:
        return "local path"
    scheme = url.split("://", 1)[0].lower()
    base = scheme.split("+", 1)[0]
    if base == "s3":
        endpoint = next((env[k] for k in S3_ENDPOINT_ENV if env.get(k)), _AWS_S3)
        return network_target(setting, endpoint, env)
    if base not in _DEFAULT_PORTS:
        return f"{scheme}:// is local"
    found = _host_port(setting, url, _DEFAULT_PORTS[base])
    return found or "no host: a local socket"


def _connect(host: str, port: int, timeout: float) -> str:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return ""
    except socket.gaierror:
        return f"unknown host {host}"
    except ConnectionRefusedError:
        return "connection refused"
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except OSError as exc:
        return exc.strerror or str(exc)


def probe(
    settings: Settings,
    names: Iterable[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> list[Probe]:
    """Try each network setting (all of NETWORK_SETTINGS by default) at once; one Probe per setting, in order.

    ``env`` supplies the S3 endpoint of an s3:// DVC remote (default: the process environment)."""
    env = os.environ if env is None else env
    chosen = list(NETWORK_SETTINGS if names is None else names)
    unknown = [n for n in chosen if n not in NETWORK_SETTINGS]
    if unknown:
        raise SettingsError(
            f"not a network setting: {', '.join(unknown)}; expected some of {', '.join(NETWORK_SETTINGS)}"
        )

    def one(name: str) -> Probe:
        url = str(getattr(settings, name))
        shown = mask_url(url)
        target = network_target(name, url, env)
        if isinstance(target, str):
            return Probe(name, shown, skipped=target)
        host, port = target
        return Probe(name, shown, target=f"{host}:{port}", error=_connect(host, port, timeout))

    with ThreadPoolExecutor(max_workers=max(1, len(chosen))) as pool:
        return list(pool.map(one, chosen))


def check_reachable(
    settings: Settings,
    names: Iterable[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> None:
    """Fail fast: a SettingsError naming each network setting whose service does not answer (one per line),
    e.g. ``settings.tracking_uri: cannot reach http://mlflow:5000 (connection refused)``."""
    failed = [p.message for p in probe(settings, names, env=env, timeout=timeout) if not p.ok]
    if failed:
        raise SettingsError("\n".join(failed))
