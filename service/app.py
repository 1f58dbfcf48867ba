"""The FastAPI application: wiring of the store, the group writer, the models and their batchers, the routes.

``create_app(config)`` builds it from a resolved ``ServiceConfig``; ``flywheel serve`` runs it under uvicorn.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi_offline import FastAPIOffline

from service import chat, feedback
from service.auth import RateLimiter, TokenBook
from service.batching import Batcher
from service.config import ServiceConfig
from service.guard import BodyLimitAndMetrics, Invalid, require, safe_error
from service.metrics import SIZE_BUCKETS, Metrics
from service.models import ModelManager
from service.schemas import body_schemas
from service.store import FeedbackStore
from service.writer import GroupWriter

log = logging.getLogger("flywheel.service")
TRACING_METRICS = {
    "traces": "flywheel_traces_written_total",
    "assessments": "flywheel_assessments_written_total",
    "no_trace": "flywheel_assessments_without_trace_total",  # feedback on an answer traced nowhere
    "failed": "flywheel_traces_failed_total",  # MLflow refused or could not be reached
    "dropped": "flywheel_traces_dropped_total",  # no room on the queue (serve.tracing.max_queue)
}


class Service:
    """The state one running app holds (``app.state.svc``)."""

    def __init__(self, config: ServiceConfig):
        self.config, self.params, self.log = config, config.params, log
        self.store = FeedbackStore(config.feedback_store, config.params.sqlite_synchronous)
        self.writer = GroupWriter(self.store, config.params.write_batch_max)
        self.models = ModelManager(config)
        self.metrics = Metrics()
        self.tokens = TokenBook(self.store)
        self.limiter = RateLimiter()
        self.batchers = {kind: self._batcher(kind) for kind in ("champion", "challenger") if kind in self.models.kinds}
        self._poller: asyncio.Task | None = None
        self.tracer = None
        if config.tracking_uri and config.params.tracing.enabled:
            from service.tracing import Tracer

            t = config.params.tracing
            self.tracer = Tracer(config.tracking_uri, t.experiment, t.max_queue)

    def _batcher(self, kind: str) -> Batcher:
        from service.generation import run_batch

        p = self.params

        def run(jobs):
            self.metrics.observe("flywheel_generate_batch_rows", sum(j.copies for j in jobs), SIZE_BUCKETS)
            run_batch(
                jobs,
                self.models.slots[kind],
                self.models.slots.get("reward"),
                p.max_prompt_tokens,
                p.best_of_temperature,
            )

        return Batcher(run, p.max_batch_size, p.batch_window_ms / 1000, p.max_queue)

    async def start(self) -> None:
        """Start the writer, the batchers and the model poller (again after a stop: a lifespan may restart)."""
        if self.params.threads:
            import torch

            torch.set_num_threads(self.params.threads)
        self._gen_pool = ThreadPoolExecutor(1, thread_name_prefix="flywheel-generate")
        self.writer.start()
        if self.tracer is not None:
            self.tracer.start()
        for b in self.batchers.values():
            b.start(self._gen_pool)
        self._poller = asyncio.get_running_loop().create_task(self.models.poll(self.params.reload_poll_s))

    async def stop(self) -> None:
        self._poller.cancel()
        await asyncio.gather(self._poller, return_exceptions=True)
        for b in self.batchers.values():
            await b.stop()
        await self.writer.stop()
        if self.tracer is not None:  # what was answered or stored reaches MLflow before the process ends
            await asyncio.to_thread(self.tracer.stop)
        self._gen_pool.shutdown(wait=True)
        self.store.engine.dispose()


def create_app(config: ServiceConfig) -> FastAPI:
    svc = Service(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await svc.start()
        try:
            yield
        finally:
            await svc.stop()

    app = FastAPIOffline(  # /docs and /redoc from assets served here: they render on a machine without internet
        title="Flywheel",
        version="1",
        lifespan=lifespan,
        description="Serves the champion policy and captures feedback (contract v1).",
        swagger_ui_parameters={"validatorUrl": None},  # no badge fetched from validator.swagger.io
    )
    app.state.svc = svc
    app.include_router(chat.router)
    app.include_router(feedback.router)
    p = config.params
    limits = {"/v1/feedback": config.max_line_bytes, "/v1/feedback/batch": p.max_batch_body_bytes}
    app.add_middleware(BodyLimitAndMetrics, limits=limits, default_limit=p.max_body_bytes, metrics=svc.metrics)
    app.add_exception_handler(Invalid, lambda _r, exc: JSONResponse({"detail": exc.errors}, status_code=422))
    app.add_exception_handler(RequestValidationError, _request_invalid)

    @app.get("/healthz", tags=["ops"], summary="The process is up")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], summary="A model is loaded", responses={503: {"description": "not ready"}})
    async def readyz() -> JSONResponse:
        versions = {k: (s.version if s else None) for k, s in svc.models.slots.items()}
        return JSONResponse(
            {"ready": svc.models.ready, "models": versions}, status_code=200 if svc.models.ready else 503
        )

    @app.get(
        "/metrics",
        tags=["ops"],
        summary="Prometheus metrics",
        response_class=PlainTextResponse,
        dependencies=[Depends(require("admin"))],
    )
    async def metrics() -> PlainTextResponse:
        m = svc.metrics
        m.gauges["flywheel_model_info"] = {}
        for kind, slot in svc.models.slots.items():
            if slot is not None:
                m.set("flywheel_model_info", 1, slot=kind, model_version=slot.version)
        m.counters["flywheel_model_reloads_total"][()] = svc.models.reloads
        m.counters["flywheel_model_load_errors_total"][()] = svc.models.errors
        for kind, b in svc.batchers.items():
            m.set("flywheel_chat_queue_waiting", b.waiting, variant=kind)
        if svc.tracer is not None:  # MLflow tracing (serve.tracing): what the writer did, what it had no room for
            for what, n in svc.tracer.written.items():
                m.counters[TRACING_METRICS[what]][()] = n
            m.set("flywheel_traces_queued", svc.tracer.queued)
        return PlainTextResponse(m.render(), media_type="text/plain; version=0.0.4")

    def openapi() -> dict:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            spec.setdefault("components", {}).setdefault("schemas", {}).update(
                body_schemas(config.max_text_chars, config.max_turns, p.max_batch_events)
            )
            spec["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path in ("/v1/chat/completions", "/v1/feedback", "/v1/feedback/batch", "/metrics"):
                for op in spec["paths"][path].values():
                    op["security"] = [{"bearer": []}]
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi
    return app


async def _request_invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422, without echoing the input back (it may hold personal data): location, message, type."""
    return JSONResponse({"detail": [safe_error(e) for e in exc.errors()]}, status_code=422)
