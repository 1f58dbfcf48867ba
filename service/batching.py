"""A small async batching queue: requests that arrive together are answered by one generate call.

The batcher takes the first waiting job, then gathers more for up to ``window_s`` or until ``max_rows``
rows (answers, best-of candidates included) are collected, and hands the batch to ``run`` on a worker
thread. While a batch generates, the next one gathers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field


class Overloaded(RuntimeError):
    """More requests are waiting than the queue admits."""


@dataclass
class Job:
    """One chat request: its prompt, sampling settings, and where its answer (and stream) go."""

    messages: list[dict]
    max_tokens: int
    temperature: float
    top_p: float = 1.0
    copies: int = 1  # best-of candidates
    stream: bool = False
    loop: asyncio.AbstractEventLoop = field(default=None, repr=False)
    started: asyncio.Future = field(default=None, repr=False)  # -> model version, when its batch begins
    result: asyncio.Future = field(default=None, repr=False)  # -> Answer
    deltas: asyncio.Queue = field(default=None, repr=False)  # stream: text pieces, then None

    def __post_init__(self):
        self.loop = self.loop or asyncio.get_running_loop()
        self.started = self.loop.create_future()
        self.result = self.loop.create_future()
        self.deltas = asyncio.Queue() if self.stream else None

    @property
    def cancelled(self) -> bool:
        return self.result.done()

    def _call(self, fn, *args) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def begin(self, version: str) -> None:
        self._call(_set, self.started, version)

    def emit(self, text: str) -> None:
        if self.deltas is not None:
            self._call(self.deltas.put_nowait, text)

    def finish(self, answer) -> None:
        self._call(_set, self.result, answer)
        if self.deltas is not None:
            self._call(self.deltas.put_nowait, None)

    def fail(self, exc: BaseException) -> None:
        self._call(_fail, self.started, exc)
        self._call(_fail, self.result, exc)
        if self.deltas is not None:
            self._call(self.deltas.put_nowait, None)


def _set(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)


def _fail(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
        fut.exception()  # retrieved here: a caller that went away must not leave a warning behind


class Batcher:
    def __init__(self, run: Callable[[list[Job]], None], max_rows: int, window_s: float, max_queue: int):
        self.run, self.executor = run, None
        self.max_rows, self.window_s, self.max_queue = max_rows, window_s, max_queue
        self._queue: asyncio.Queue[Job] | None = None
        self._carry: Job | None = None
        self._task: asyncio.Task | None = None
        self.batches = 0

    def start(self, executor: Executor) -> None:
        """Run batches on ``executor`` (one thread: the model is used by one batch at a time)."""
        self.executor, self._queue, self._carry = executor, asyncio.Queue(), None
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="flywheel-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    @property
    def waiting(self) -> int:
        return self._queue.qsize() + (self._carry is not None) if self._queue else 0

    def submit(self, job: Job) -> None:
        if self.waiting >= self.max_queue:
            raise Overloaded(f"{self.waiting} requests waiting")
        self._queue.put_nowait(job)

    async def _next(self, timeout: float | None) -> Job | None:
        if self._carry is not None:
            job, self._carry = self._carry, None
            return job
        if timeout is None:
            return await self._queue.get()
        if not self._queue.empty():
            return self._queue.get_nowait()
        if timeout <= 0:
            return None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next(None)
            if first.cancelled:
                continue
            jobs, rows = [first], first.copies
            deadline = loop.time() + self.window_s
            while rows < self.max_rows:
                job = await self._next(deadline - loop.time())
                if job is None:
                    break
                if job.cancelled:
                    continue
                if rows + job.copies > self.max_rows:
                    self._carry = job
                    break
                jobs.append(job)
                rows += job.copies
            self.batches += 1
            try:
                await loop.run_in_executor(self.executor, self.run, jobs)
            except Exception as exc:  # the generate call failed: its requests fail, the service goes on
                for job in jobs:
                    job.fail(exc)
