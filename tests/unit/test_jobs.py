"""The job runner's state machine, serialization, rollback, cancel and recovery."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from vmhive.jobs.runner import JobContext, JobError, JobNotFound, JobRunner
from vmhive.store import db


@pytest.fixture
async def runner(tmp_path: Path) -> AsyncIterator[JobRunner]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'jobs.db'}"
    await asyncio.to_thread(db.migrate, url)
    engine = db.make_engine(url)
    r = JobRunner(db.make_sessionmaker(engine))
    yield r
    await r.shutdown()
    await engine.dispose()


async def test_success_records_progress_log_and_result(runner: JobRunner) -> None:
    async def work(ctx: JobContext) -> dict[str, Any]:
        await ctx.log("step one")
        await ctx.progress(50)
        await ctx.log("step two")
        return {"answer": 42}

    job_id = await runner.submit("test.ok", "t:1", work)
    await runner.wait(job_id, 5)
    job = await runner.get(job_id)
    assert (job.state, job.progress, job.result, job.error) == (
        "succeeded",
        100,
        {"answer": 42},
        None,
    )
    assert job.started_at is not None and job.finished_at is not None
    assert [(e.seq, e.message) for e in await runner.logs(job_id)] == [
        (1, "step one"),
        (2, "step two"),
    ]


async def test_failure_rolls_back_in_reverse_order(runner: JobRunner) -> None:
    undone: list[str] = []

    async def work(ctx: JobContext) -> None:
        for name in ("disk", "firmware", "process"):

            async def undo(name: str = name) -> None:
                undone.append(name)

            ctx.on_rollback(f"undo {name}", undo)
        raise JobError("the process did not start")

    job_id = await runner.submit("test.fail", "t:1", work)
    await runner.wait(job_id, 5)
    job = await runner.get(job_id)
    assert job.state == "failed" and job.error == "the process did not start"
    assert undone == ["process", "firmware", "disk"]


async def test_commit_clears_rollback_and_a_failing_step_does_not_stop_the_rest(
    runner: JobRunner,
) -> None:
    undone: list[str] = []

    async def boom() -> None:
        raise RuntimeError("cannot undo")

    async def note() -> None:
        undone.append("first")

    async def work(ctx: JobContext) -> None:
        ctx.on_rollback("committed step", note)
        ctx.commit()
        ctx.on_rollback("note", note)
        ctx.on_rollback("boom", boom)
        raise ValueError("unexpected")

    job_id = await runner.submit("test.fail", None, work)
    await runner.wait(job_id, 5)
    job = await runner.get(job_id)
    assert job.state == "failed" and job.error == "ValueError: unexpected"
    assert undone == ["first"]
    messages = [e.message for e in await runner.logs(job_id)]
    assert "rollback step failed: boom: cannot undo" in messages


async def test_one_job_per_target_at_a_time(runner: JobRunner) -> None:
    order: list[str] = []
    gate = asyncio.Event()

    def make(tag: str, block: bool) -> Any:
        async def work(ctx: JobContext) -> None:
            order.append(f"{tag}-start")
            if block:
                await gate.wait()
            order.append(f"{tag}-end")

        return work

    first = await runner.submit("t", "vm:a", make("a1", True))
    second = await runner.submit("t", "vm:a", make("a2", False))
    other = await runner.submit("t", "vm:b", make("b1", False))
    await runner.wait(other, 5)
    assert (await runner.get(second)).state == "queued"
    assert runner.busy("vm:a") and not runner.busy("vm:b")
    gate.set()
    await runner.wait(second, 5)
    assert order.index("a1-end") < order.index("a2-start")
    assert (await runner.get(first)).state == "succeeded"


async def test_cancel_queued_and_running(runner: JobRunner) -> None:
    gate = asyncio.Event()
    undone: list[bool] = []

    async def blocker(ctx: JobContext) -> None:
        async def undo() -> None:
            undone.append(True)

        ctx.on_rollback("undo", undo)
        await gate.wait()

    running = await runner.submit("t", "vm:a", blocker, cancellable=False)
    queued = await runner.submit("t", "vm:a", blocker)
    await asyncio.sleep(0.05)
    assert await runner.cancel(queued)
    assert (await runner.get(queued)).state == "cancelled"
    assert not await runner.cancel(running), "a non-cancellable running job keeps running"

    cancellable = await runner.submit("t", "vm:c", blocker, cancellable=True)
    await asyncio.sleep(0.05)
    assert await runner.cancel(cancellable)
    job = await runner.get(cancellable)
    assert job.state == "cancelled" and undone == [True]
    gate.set()
    await runner.wait(running, 5)
    assert not await runner.cancel(running)  # already ended


async def test_recover_fails_leftover_jobs(runner: JobRunner) -> None:
    gate = asyncio.Event()

    async def blocker(ctx: JobContext) -> None:
        await gate.wait()

    job_id = await runner.submit("t", "vm:a", blocker)
    await asyncio.sleep(0.05)
    # A new runner on the same database sees what the old daemon left behind.
    fresh = JobRunner(runner._sessions)
    recovered = await fresh.recover()
    assert [j.id for j in recovered] == [job_id]
    job = await fresh.get(job_id)
    assert job.state == "failed" and "interrupted" in (job.error or "")
    gate.set()


async def test_unknown_job(runner: JobRunner) -> None:
    with pytest.raises(JobNotFound):
        await runner.get("nope")
    with pytest.raises(JobNotFound):
        await runner.wait("nope", 1)
