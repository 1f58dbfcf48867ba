"""Group commit: concurrent writes share one transaction, and each caller is answered only after it committed.

Requests put their rows on a queue; one task takes everything waiting (up to ``max_items``), commits it in
one transaction on a dedicated thread, then resolves each request's future. While a commit runs, the next
group gathers, so throughput grows with concurrency instead of paying one commit per request.

One bad request never fails the others: when a group's commit fails, each of its requests is committed again
alone, so only the one the database refuses fails (a database that is down fails them all, as it should).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import sqlalchemy as sa

from service.store import FeedbackStore


@dataclass
class _Item:
    feedback: list[dict]
    answers: list[dict]
    future: asyncio.Future = field(repr=False)


class GroupWriter:
    def __init__(self, store: FeedbackStore, max_items: int = 512):
        self.store = store
        self.max_items = max_items
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task | None = None
        self._pool: ThreadPoolExecutor | None = None

    def start(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="flywheel-store")
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="flywheel-group-writer")

    async def stop(self) -> None:
        if self._task is not None:
            while not self._queue.empty():  # let what was accepted reach the database
                await asyncio.sleep(0.01)
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._pool.shutdown(wait=True)

    async def write(self, feedback: list[dict], answer_rows: list[dict] = ()) -> list[bool]:
        """Commit the rows; per feedback row, True when it was new, False for a duplicate event id."""
        fut = asyncio.get_running_loop().create_future()
        await self._queue.put(_Item(feedback, list(answer_rows), fut))
        return await fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self._queue.get()]
            while len(items) < self.max_items and not self._queue.empty():
                items.append(self._queue.get_nowait())
            try:
                new = await loop.run_in_executor(self._pool, _commit, self.store, items)
            except Exception as exc:
                if len(items) == 1 or _unavailable(exc):  # down or locked: every waiting request fails alike
                    for it in items:
                        _fail(it, exc)
                    continue
                # the database refused some row: retry each request alone, so only the one it refuses fails
                for i, it in enumerate(items):
                    try:
                        _resolve(it, await loop.run_in_executor(self._pool, _commit, self.store, [it]))
                    except Exception as exc_one:
                        _fail(it, exc_one)
                        if _unavailable(exc_one):  # it went down meanwhile: do not try the rest one by one
                            for rest in items[i + 1 :]:
                                _fail(rest, exc_one)
                            break
                continue
            for it in items:
                _resolve(it, new)


def _unavailable(exc: Exception) -> bool:
    """The database cannot be reached or is busy, as opposed to refusing a row."""
    return isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError)) or getattr(
        exc, "connection_invalidated", False
    )


def _commit(store: FeedbackStore, items: list[_Item]) -> set[str]:
    """One transaction for the items' rows; the event ids that were new."""
    feedback = [r for it in items for r in it.feedback]
    answer_rows = [r for it in items for r in it.answers]
    unique = list({r["event_id"]: r for r in reversed(feedback)}.values())  # first of each id wins
    return store.write(unique, answer_rows)


def _resolve(item: _Item, new: set[str]) -> None:
    flags = []
    for r in item.feedback:
        flags.append(r["event_id"] in new)
        new.discard(r["event_id"])  # a second copy in the same group is a duplicate
    if not item.future.done():
        item.future.set_result(flags)


def _fail(item: _Item, exc: Exception) -> None:
    if not item.future.done():
        item.future.set_exception(exc)
