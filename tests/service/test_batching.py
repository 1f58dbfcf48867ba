"""The batching queue and the group writer, without a model: what arrives together runs together, a batch never
passes its row limit, each caller gets its own answer, duplicates inside one commit are told apart."""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.batching import Batcher, Job, Overloaded
from service.store import FeedbackStore
from service.writer import GroupWriter


def _run_echo(calls: list, lock=threading.Lock()):
    def run(jobs: list[Job]) -> None:
        with lock:
            calls.append([j.copies for j in jobs])
        for j in jobs:
            j.begin("v1")
            j.emit("piece")
            j.finish(f"answer to {j.messages[0]['content']}")

    return run


def test_concurrent_jobs_share_a_call_within_the_row_limit():
    calls: list = []

    async def main():
        b = Batcher(_run_echo(calls), max_rows=4, window_s=0.05, max_queue=100)
        b.start(ThreadPoolExecutor(1))
        jobs = [
            Job([{"role": "user", "content": str(i)}], 4, 0.0, copies=2 if i == 0 else 1, stream=i == 1)
            for i in range(7)
        ]
        for j in jobs:
            b.submit(j)
        answers = await asyncio.gather(*(j.result for j in jobs))
        streamed = [await jobs[1].deltas.get(), await jobs[1].deltas.get()]
        await b.stop()
        return answers, streamed, await jobs[0].started

    answers, streamed, version = asyncio.run(main())
    assert answers == [f"answer to {i}" for i in range(7)]
    assert streamed == ["piece", None] and version == "v1"
    assert all(sum(c) <= 4 for c in calls) and sum(map(sum, calls)) == 8
    assert len(calls) == 2  # 8 rows in calls of at most 4


def test_a_full_queue_refuses_and_a_failed_call_fails_only_its_jobs():
    async def main():
        def boom(jobs):
            raise RuntimeError("generate failed")

        b = Batcher(boom, max_rows=8, window_s=0.0, max_queue=1)
        b.start(ThreadPoolExecutor(1))
        job = Job([{"role": "user", "content": "x"}], 1, 0.0)
        b.submit(job)
        with pytest.raises(Overloaded):
            b.submit(Job([{"role": "user", "content": "y"}], 1, 0.0))
        with pytest.raises(RuntimeError, match="generate failed"):
            await job.result
        await b.stop()

    asyncio.run(main())


def test_group_writer_commits_together_and_flags_duplicates(tmp_path):
    store = FeedbackStore(f"sqlite:///{tmp_path / 'w.db'}")

    def row(eid):
        return {
            "event_id": eid,
            "received_at": "t",
            "answer_id": None,
            "model_version": "v",
            "feedback_type": "thumbs",
            "user_id": None,
            "row": json.dumps({"event_id": eid}),
        }

    async def main():
        w = GroupWriter(store, max_items=64)
        w.start()
        flags = await asyncio.gather(*(w.write([row(f"e{i % 10}")]) for i in range(30)))
        again = await w.write([row("e1"), row("new"), row("new")])
        await w.stop()
        return flags, again

    flags, again = asyncio.run(main())
    assert sum(f[0] for f in flags) == 10 and store.count() == 11
    assert again == [False, True, False]
