"""The edge of the service: settings and ``params.yaml: serve`` resolved into a ``ServiceConfig``, and uvicorn.

Access logs carry the method, the path without its query and the status: no client address (an IP address is
personal data) and no body.
"""

from __future__ import annotations

import logging
from pathlib import Path

from service.config import ServiceConfig


def config_from_settings(settings, model_dir: Path | None = None, use_registry: bool = True) -> ServiceConfig:
    """The service's configuration from the one settings object (its ``serve`` section was checked at load)."""
    params = settings.params.serve
    registry = None
    if use_registry:
        from flywheel.registry import Registry

        registry = Registry(settings)
    contract = settings.params.contract
    policy = Path(model_dir) if model_dir else settings.root / params.fallback_policy
    return ServiceConfig(
        params=params,
        feedback_store=settings.feedback_store,
        max_text_chars=contract.max_text_chars,
        max_turns=contract.max_turns,
        max_line_bytes=contract.max_line_bytes,
        fallback_policy=policy.resolve(),
        fallback_reward=(settings.root / params.fallback_reward).resolve(),
        registry=registry,
        base_policy=(Path(settings.models) / "base" / "policy").resolve(),
        tracking_uri=settings.tracking_uri,
    )


class AccessFormatter(logging.Formatter):
    """``"POST /v1/feedback HTTP/1.1" 200``: uvicorn's access record without the client address or query."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        args = record.args if isinstance(record.args, tuple) else ()
        if len(args) == 5:
            _client, method, path, version, status = args
            record.message = f'"{method} {str(path).split("?", 1)[0]} HTTP/{version}" {status}'
        return super().formatMessage(record)


def log_config(level: str = "info") -> dict:
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": fmt}, "access": {"()": AccessFormatter, "fmt": fmt}},
        "handlers": {
            "plain": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"},
            "access": {"class": "logging.StreamHandler", "formatter": "access", "stream": "ext://sys.stdout"},
        },
        "loggers": {
            "uvicorn": {"handlers": ["plain"], "level": level.upper(), "propagate": False},
            "uvicorn.access": {"handlers": ["access"], "level": level.upper(), "propagate": False},
            "flywheel": {"handlers": ["plain"], "level": level.upper(), "propagate": False},
        },
    }


def run(config: ServiceConfig, host: str | None = None, port: int | None = None, log_level: str = "info") -> None:
    """Serve until interrupted (one worker process: the models and the batching queue live in it)."""
    import uvicorn

    from service.app import create_app

    uvicorn.run(
        create_app(config),
        host=host or config.params.host,
        port=config.params.port if port is None else port,
        log_config=log_config(log_level),
        access_log=config.params.access_log,
        workers=1,
        timeout_graceful_shutdown=10,
    )
