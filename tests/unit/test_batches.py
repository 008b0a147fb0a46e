"""BatchRegistry: exactly-once delivery, idempotent pushes, admission, expiry and cancelled streams."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from infer_proto import infer_pb2
from infer_server.front.batches import Batch, BatchRegistry, Quota, Reservation, request_fingerprint
from infer_server.front.caller_usage import CallerUsage
from infer_server.front.cursors import PullCursor
from infer_server.front.errors import Conflict, InvalidBatch, Overloaded, Unavailable, UnknownBatch
from infer_server.front.handoff import BatchFile
from infer_server.messages import Code, FileRef, ImageOutcome, ImageRef

T = TypeVar("T")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 10))


def make_registry(clock: Clock | None = None, **kw: Any) -> BatchRegistry:
    args: dict[str, Any] = {"max_inflight_images": 8, "max_inflight_bytes": 10_000, "result_ttl_s": 60.0}
    args.update(kw)
    return BatchRegistry(clock=clock or Clock(), **args)


def refs(n: int, size: int = 10) -> tuple[ImageRef, ...]:
    return tuple(ImageRef(i, i * size, size, f"img{i}") for i in range(n))


def open_batch(
    reg: BatchRegistry, n: int, request_id: str = "", staged: bool = False, owner: str = "anonymous"
) -> Batch:
    images = refs(n)
    r = reg.reserve(request_id, images, 10 * n, deadline=1100.0, owner=owner)
    reg.activate(r, BatchFile(FileRef(f"/dev/shm/x/{r.batch.batch_id}", 1, 2, 10 * n, -1), images, staged=staged))
    return r.batch


def outcome(batch: Batch, index: int, code: Code = Code.OK) -> ImageOutcome:
    return ImageOutcome(batch.batch_id, index, f"img{index}", code)


async def drain(sub: PullCursor) -> list[tuple[str, int]]:
    got = []
    while (o := await sub.next()) is not None:
        sub.ack([o])
        got.append((o.batch_id, o.index))
    return got


def test_results_stream_in_completion_order_exactly_once() -> None:
    async def scenario() -> None:
        reg = make_registry()
        a, b = open_batch(reg, 3), open_batch(reg, 2)
        for batch, i in [(a, 2), (b, 1), (a, 0), (b, 0), (a, 1)]:
            reg.record(outcome(batch, i))
        with reg.subscribe([a.batch_id, b.batch_id]) as sub:
            got = await drain(sub)
        assert got == [(a.batch_id, 2), (b.batch_id, 1), (a.batch_id, 0), (b.batch_id, 0), (a.batch_id, 1)]
        with reg.subscribe([a.batch_id]) as again:  # still known, but nothing is handed out twice
            assert await drain(again) == []

    run(scenario())


def test_stream_waits_for_results_and_ends_when_all_answered() -> None:
    async def scenario() -> None:
        reg = make_registry()
        batch = open_batch(reg, 2)
        with reg.subscribe([batch.batch_id]) as sub:
            task = asyncio.ensure_future(drain(sub))
            await asyncio.sleep(0)  # let the stream block on its empty batch
            assert not task.done()
            reg.record(outcome(batch, 1))
            reg.record(outcome(batch, 0))
            assert await task == [(batch.batch_id, 1), (batch.batch_id, 0)]

    run(scenario())


def test_unsent_result_stays_available_for_a_later_stream() -> None:
    async def scenario() -> None:
        reg = make_registry()
        batch = open_batch(reg, 3)
        for i in (0, 1, 2):
            reg.record(outcome(batch, i))
        with reg.subscribe([batch.batch_id]) as first:
            o = await first.next()
            assert o is not None and o.index == 0
            first.ack([o])
            o = await first.next()
            assert o is not None and o.index == 1
            first.nack([o])  # e.g. the client cancelled while this one was being written
        with reg.subscribe([batch.batch_id]) as second:
            assert [i for _, i in await drain(second)] == [1, 2]

    run(scenario())


def test_cancelled_waiting_stream_loses_nothing() -> None:
    async def scenario() -> None:
        reg = make_registry()
        batch = open_batch(reg, 2)
        sub = reg.subscribe([batch.batch_id])
        task = asyncio.ensure_future(sub.next())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        sub.close()
        reg.record(outcome(batch, 0))
        reg.record(outcome(batch, 1))
        with reg.subscribe([batch.batch_id]) as later:
            assert sorted(i for _, i in await drain(later)) == [0, 1]

    run(scenario())


def test_two_streams_on_one_batch_split_results_and_both_end() -> None:
    async def scenario() -> None:
        reg = make_registry()
        batch = open_batch(reg, 6)
        s1, s2 = reg.subscribe([batch.batch_id]), reg.subscribe([batch.batch_id])
        t1, t2 = asyncio.ensure_future(drain(s1)), asyncio.ensure_future(drain(s2))
        for i in range(6):
            reg.record(outcome(batch, i))
            await asyncio.sleep(0)
        got = await t1 + await t2
        assert sorted(i for _, i in got) == list(range(6))
        s1.close()
        s2.close()

    run(scenario())


def test_stream_does_not_end_while_another_holds_a_lease() -> None:
    async def scenario() -> None:
        reg = make_registry()
        batch = open_batch(reg, 1)
        reg.record(outcome(batch, 0))
        holder, waiter = reg.subscribe([batch.batch_id]), reg.subscribe([batch.batch_id])
        leased = await holder.next()
        assert leased is not None
        task = asyncio.ensure_future(drain(waiter))
        await asyncio.sleep(0)
        assert not task.done()  # the lease may still come back
        holder.nack([leased])
        assert await task == [(batch.batch_id, 0)]

    run(scenario())


def test_duplicate_and_late_outcomes_are_dropped() -> None:
    async def scenario() -> None:
        reg = make_registry()
        batch = open_batch(reg, 2)
        reg.record(outcome(batch, 0))
        reg.record(outcome(batch, 0, Code.INTERNAL))
        reg.record(outcome(batch, 5))
        reg.record(outcome(batch, 1))
        reg.record(outcome(batch, 1))
        with reg.subscribe([batch.batch_id]) as sub:
            got = []
            while (o := await sub.next()) is not None:
                sub.ack([o])
                got.append((o.index, o.code))
        assert got == [(0, Code.OK), (1, Code.OK)]

    run(scenario())


def test_request_id_makes_push_idempotent() -> None:
    async def scenario() -> None:
        reg = make_registry()
        first = reg.reserve("req-1", refs(2), 20, 1100.0)
        retry = reg.reserve("req-1", refs(2), 20, 1100.0)
        assert first.is_new and not retry.is_new and retry.batch is first.batch
        assert reg.inflight_images == 2  # the retry is not charged again
        waiting = asyncio.ensure_future(retry.ready)
        reg.activate(first, BatchFile(FileRef("/dev/shm/x/b", 1, 2, 20, -1), refs(2), staged=False))
        assert (await waiting) is first.batch
        assert reg.reserve("req-2", refs(1), 10, 1100.0).batch is not first.batch

    run(scenario())


def test_failed_first_attempt_fails_its_retry_and_frees_the_request_id() -> None:
    async def scenario() -> None:
        reg = make_registry()
        first = reg.reserve("req", refs(3), 30, 1100.0)
        retry = reg.reserve("req", refs(3), 30, 1100.0)
        reg.abandon(first, InvalidBatch("sizes add up to 30 bytes but the file holds 29"))
        with pytest.raises(InvalidBatch):
            await retry.ready
        assert reg.inflight_images == 0 and reg.inflight_bytes == 0
        assert reg.reserve("req", refs(3), 30, 1100.0).is_new

    run(scenario())


def test_admission_bounds_images_and_bytes_until_batches_finish() -> None:
    async def scenario() -> None:
        finished: list[Batch] = []
        reg = make_registry(max_inflight_images=4, max_inflight_bytes=100, on_finished=finished.append)
        batch = open_batch(reg, 3, staged=True)
        with pytest.raises(Overloaded, match="3 of 4 images"):
            reg.reserve("", refs(2), 20, 1100.0)
        with pytest.raises(Overloaded, match="bytes"):
            reg.reserve("", refs(1, size=80), 80, 1100.0)
        assert batch.file is not None and reg.staged_paths() == {batch.file.path}
        for i in range(3):
            reg.record(outcome(batch, i))
        assert finished == [batch] and reg.inflight_images == 0 and reg.staged_paths() == set()
        assert await reg.wait_idle(0.1)
        reg.reserve("", refs(4), 40, 1100.0)
        assert not await reg.wait_idle(0.01)

    run(scenario())


def test_finished_batches_expire_after_ttl() -> None:
    async def scenario() -> None:
        clock = Clock()
        reg = make_registry(clock, result_ttl_s=60.0)
        batch = open_batch(reg, 1, request_id="req")
        reg.record(outcome(batch, 0))
        clock.now += 59
        reg.expire()
        with reg.subscribe([batch.batch_id]) as sub:  # results not pulled yet are still there
            assert await drain(sub) == [(batch.batch_id, 0)]
        clock.now += 2
        reg.expire()
        with pytest.raises(UnknownBatch):
            reg.subscribe([batch.batch_id])
        assert reg.reserve("req", refs(1), 10, 1100.0).is_new

    run(scenario())


def test_retained_batches_are_bounded() -> None:
    async def scenario() -> None:
        reg = make_registry(max_retained_batches=2)
        batches = [open_batch(reg, 1) for _ in range(3)]
        for b in batches:
            reg.record(outcome(b, 0))
        reg.expire()
        with pytest.raises(UnknownBatch):
            reg.subscribe([batches[0].batch_id])
        reg.subscribe([batches[1].batch_id, batches[2].batch_id]).close()

    run(scenario())


def test_a_caller_over_its_retention_quota_loses_its_own_oldest() -> None:
    async def scenario() -> None:
        reg = make_registry(max_retained_batches=5, quota=Quota(8, 10_000, retained_batches=3))
        alices = open_batch(reg, 1, owner="alice")
        reg.record(outcome(alices, 0))
        bobs = []
        for _ in range(4):  # one more than bob's quota
            bobs.append(open_batch(reg, 1, owner="bob"))
            reg.record(outcome(bobs[-1], 0))
        with pytest.raises(UnknownBatch):
            reg.subscribe([bobs[0].batch_id], "bob")
        reg.subscribe([b.batch_id for b in bobs[1:]], "bob").close()
        carols = []
        for _ in range(2):  # past the server's bound of 5: the largest holder (bob) pays, not alice
            carols.append(open_batch(reg, 1, owner="carol"))
            reg.record(outcome(carols[-1], 0))
        reg.subscribe([alices.batch_id], "alice").close()
        reg.subscribe([b.batch_id for b in carols], "carol").close()
        with pytest.raises(UnknownBatch):
            reg.subscribe([bobs[1].batch_id], "bob")

    run(scenario())


def test_between_equal_holders_the_oldest_result_goes_first() -> None:
    async def scenario() -> None:
        clock = Clock()
        reg = make_registry(clock, max_retained_batches=4, quota=Quota(8, 10_000, retained_batches=2))
        finished = {}
        for owner in ("attacker", "victim", "attacker", "victim"):
            clock.now += 1
            finished.setdefault(owner, []).append(b := open_batch(reg, 1, owner=owner))
            reg.record(outcome(b, 0))
        clock.now += 1
        reg.record(outcome(open_batch(reg, 1, owner="third"), 0))  # one over the server's bound
        with pytest.raises(UnknownBatch):  # the attacker's first result is the oldest of all
            reg.subscribe([finished["attacker"][0].batch_id], "attacker")
        reg.subscribe([b.batch_id for b in finished["victim"]], "victim").close()

    run(scenario())


def test_batches_and_request_ids_belong_to_their_caller() -> None:
    async def scenario() -> None:
        reg = make_registry()
        alices = open_batch(reg, 2, request_id="r1", owner="alice")
        with pytest.raises(UnknownBatch) as theirs:
            reg.subscribe([alices.batch_id], "bob")
        with pytest.raises(UnknownBatch) as unknown:
            reg.subscribe(["0" * 32], "bob")
        assert str(theirs.value).replace(alices.batch_id, "?") == str(unknown.value).replace("0" * 32, "?")
        bobs = reg.reserve("r1", refs(2), 20, 1100.0, owner="bob")  # the same id, another caller: a new batch
        assert bobs.is_new and bobs.batch is not alices
        assert reg.reserve("r1", refs(2), 20, 1100.0, owner="alice").batch is alices
        with pytest.raises(Conflict):
            reg.reserve("r1", refs(2), 20, 1100.0, fingerprint=b"another request", owner="alice")

    run(scenario())


def test_in_flight_quota_per_caller() -> None:
    async def scenario() -> None:
        reg = make_registry(quota=Quota(inflight_images=3, inflight_bytes=10_000))
        open_batch(reg, 3, owner="bob")
        with pytest.raises(Overloaded, match="this caller"):
            open_batch(reg, 1, owner="bob")
        open_batch(reg, 3, owner="alice")  # the server has room for alice

    run(scenario())


def test_a_callers_quota_counts_its_work_on_every_shard() -> None:
    """Two shards' registries on one table (front.caller_usage): a caller's quota bounds its work
    on both together, whichever shard each push lands on; finished work frees it on both."""

    async def scenario() -> None:
        table = CallerUsage.create(2)
        regs = [make_registry(quota=Quota(inflight_images=4, inflight_bytes=1_000)) for _ in range(2)]
        regs[0].peers, regs[1].peers = table, CallerUsage(os.dup(table.fd), 2, 1)
        first = open_batch(regs[0], 3, owner="bob")
        with pytest.raises(Overloaded, match="this caller has 3 images"):
            open_batch(regs[1], 2, owner="bob")  # 3 on shard 0 + 2 > 4
        open_batch(regs[1], 1, owner="bob")
        with pytest.raises(Overloaded, match="this caller has 4 images"):
            open_batch(regs[0], 1, owner="bob")
        open_batch(regs[1], 4, owner="alice")  # another caller's quota is its own
        assert "this caller" not in (regs[1].bytes_budget_spent("bob") or "")
        regs[0].record(*(outcome(first, i) for i in range(3)))  # bob's batch on shard 0 finished
        open_batch(regs[1], 3, owner="bob")

    run(scenario())


def test_a_spent_byte_budget_is_known_before_a_push_is_received() -> None:
    async def scenario() -> None:
        reg = make_registry(max_inflight_images=16, max_inflight_bytes=100, quota=Quota(16, inflight_bytes=30))
        assert reg.bytes_budget_spent("bob") is None
        open_batch(reg, 3, owner="bob")  # 30 bytes: bob's whole budget
        assert "this caller" in (reg.bytes_budget_spent("bob") or "")
        assert reg.bytes_budget_spent("alice") is None
        for owner in ("alice", "carol"):
            open_batch(reg, 3, owner=owner)
        open_batch(reg, 1, owner="dave")  # 100 bytes: the server's
        assert "server is at capacity" in (reg.bytes_budget_spent("erin") or "")

    run(scenario())


def test_overdue_batch_is_answered_deadline_exceeded_once() -> None:
    async def scenario() -> None:
        clock = Clock()
        reg = make_registry(clock, deadline_grace_s=5.0)
        batch = open_batch(reg, 3)  # deadline 1100
        reg.record(outcome(batch, 1))
        clock.now = 1104.0
        reg.expire()
        assert reg.inflight_images == 3
        clock.now = 1106.0
        reg.expire()
        assert reg.inflight_images == 0
        reg.record(outcome(batch, 0))  # the pool answering late must not duplicate
        with reg.subscribe([batch.batch_id]) as sub:
            got = []
            while (o := await sub.next()) is not None:
                sub.ack([o])
                got.append((o.index, o.code))
        assert sorted(got) == [(0, Code.DEADLINE_EXCEEDED), (1, Code.OK), (2, Code.DEADLINE_EXCEEDED)]

    run(scenario())


def test_unknown_batch_ids() -> None:
    async def scenario() -> None:
        reg = make_registry()
        batch = open_batch(reg, 1)
        with pytest.raises(UnknownBatch):
            reg.subscribe([batch.batch_id, "f" * 32])
        with pytest.raises(UnknownBatch):
            reg.subscribe([])
        pending: Reservation = reg.reserve("", refs(1), 10, 1100.0)
        with pytest.raises(UnknownBatch):  # not pullable before its file was validated
            reg.subscribe([pending.batch.batch_id])

    run(scenario())


def test_cancelled_first_attempt_tells_its_retry_to_try_again() -> None:
    async def scenario() -> None:
        reg = make_registry()
        first = reg.reserve("req", refs(1), 10, 1100.0)
        retry = reg.reserve("req", refs(1), 10, 1100.0)
        reg.abandon(first, asyncio.CancelledError())
        with pytest.raises(Unavailable):
            await retry.ready

    run(scenario())


def test_a_session_takes_bursts_across_batches_in_completion_order() -> None:
    async def main() -> None:
        reg = make_registry()
        session = reg.open_session()
        a, b = open_batch(reg, 2), open_batch(reg, 3)
        reg.record(outcome(b, 2))
        session.add(a)
        session.add(b)
        session.add(a)  # a repeat (a retried push): its results come once, its completion twice
        reg.record(outcome(a, 1))
        reg.record(outcome(b, 0))
        burst = session.take()
        assert [(o.batch_id, o.index) for o in burst] == [(b.batch_id, 2), (a.batch_id, 1), (b.batch_id, 0)]
        assert session.completions(burst) == [], "nothing is complete yet"
        session.ack(burst)
        reg.record(outcome(a, 0))
        reg.record(outcome(b, 1))
        last = session.take(limit=1)
        assert [(o.batch_id, o.index) for o in last] == [(a.batch_id, 0)]
        assert session.completions(last) == [a.batch_id], "a's last result is in this burst"
        session.nack(last)  # the write failed: nothing is complete, the result goes back first
        assert session.completions([]) == []
        burst = session.take()
        assert [(o.batch_id, o.index) for o in burst] == [(a.batch_id, 0), (b.batch_id, 1)]
        assert session.completions(burst) == [a.batch_id, b.batch_id]
        session.ack(burst)
        session.release([a.batch_id, b.batch_id])
        assert session.take() == [] and session.completions([]) == [a.batch_id], "once more for the repeat"
        session.release([a.batch_id])
        assert session.completions([]) == []
        assert not session.finished, "open until sealed"
        session.seal()
        assert session.finished
        session.close()

    run(main())


def test_a_session_waits_for_results_and_reports_a_batch_delivered_elsewhere() -> None:
    async def main() -> None:
        reg = make_registry()
        a = open_batch(reg, 1)
        with reg.subscribe([a.batch_id]) as pull:  # PullResult takes a's only result first
            reg.record(outcome(a, 0))
            got = await pull.next()
            assert got is not None
            pull.ack([got])
        with reg.open_session() as session:
            session.add(a)  # pushed again with its request_id: nothing more will come of it
            assert session.take() == [] and session.completions([]) == [a.batch_id]
            session.release([a.batch_id])
            b = open_batch(reg, 1)
            session.add(b)
            waiter = asyncio.ensure_future(session.wait())
            await asyncio.sleep(0)
            assert not waiter.done()
            reg.record(outcome(b, 0))  # wakes the session
            await asyncio.wait_for(waiter, 1)
            assert [o.index for o in session.take()] == [0]

    run(main())


def test_an_ack_wakes_the_other_streams_on_its_batch_and_not_its_own() -> None:
    """A stream that delivered the last result lets the others end; what it wrote itself leaves it
    nothing new, so it is not woken by it (a Session then skips an empty look)."""

    async def main() -> None:
        reg = make_registry()
        a = open_batch(reg, 1)
        with reg.open_session() as session, reg.subscribe([a.batch_id]) as pull:
            session.add(a, wake=False)
            reg.record(outcome(a, 0))
            got = await pull.next()  # the pull takes the only result
            assert got is not None
            waiter = asyncio.ensure_future(session.wait())
            await asyncio.sleep(0)
            assert not waiter.done()
            pull.hush()
            pull.ack([got])
            assert not pull.woken
            await asyncio.wait_for(waiter, 1)
            assert session.take() == [] and session.completions([]) == [a.batch_id]

    run(main())


def test_a_request_without_names_is_the_same_request_as_one_with_every_name_empty() -> None:
    """A client that sends no names for unnamed images retries a push another sent with empty names."""
    unnamed = request_fingerprint(infer_pb2.PushDataRequest(sizes=[3, 4]))
    assert request_fingerprint(infer_pb2.PushDataRequest(sizes=[3, 4], names=["", ""])) == unnamed
    assert request_fingerprint(infer_pb2.PushDataRequest(sizes=[3, 4], names=["a", ""])) != unnamed
    assert request_fingerprint(infer_pb2.PushDataRequest(sizes=[3, 5])) != unnamed
