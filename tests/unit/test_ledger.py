"""The pool's bookkeeping: each image answered once, retries and their limit, deadlines, shutdown."""

from __future__ import annotations

from infer_server.messages import Code, FileRef, ImageOutcome, ImageRef
from infer_server.supervisor.ledger import ChunkLedger


def ledger_with(n: int, batch_size: int = 4, max_attempts: int = 2, deadline: float = 100.0) -> ChunkLedger:
    ledger = ChunkLedger(batch_size, max_attempts)
    images = [ImageRef(i, i * 10, 10, f"img{i}") for i in range(n)]
    ledger.add_batch("b", FileRef("/dev/shm/x", 1, 2, n * 10, -1), images, deadline=deadline, now=0.0)
    return ledger


def ok(index: int, batch_id: str = "b") -> ImageOutcome:
    return ImageOutcome(batch_id=batch_id, index=index, name=f"img{index}", timings_ms=(("detector", 4.0),))


def test_batches_are_cut_into_chunks_of_batch_size() -> None:
    ledger = ledger_with(10)
    assert [[r.index for r in c.item.images] for c in ledger.pending] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert len({c.item.item_id for c in ledger.pending}) == 3
    assert ledger.open_images == 10


def test_an_image_is_delivered_once_and_duplicates_are_dropped() -> None:
    ledger = ledger_with(2)
    chunk = ledger.pending.popleft()
    assert chunk.item.submitted == 0.0  # the worker reports the queue time from it
    assert ledger.resolve(ok(0)) == ok(0)
    assert ledger.resolve(ok(0)) is None
    assert ledger.resolve(ok(0, batch_id="unknown")) is None
    assert ledger.resolve(ImageOutcome.failed("b", ImageRef(1, 10, 10), Code.INVALID_ARGUMENT, "bad")) is not None
    assert ledger.open_images == 0 and not ledger.is_open(chunk)


def test_a_chunk_that_never_started_goes_back_unchanged() -> None:
    ledger = ledger_with(6)
    chunk = ledger.pending.popleft()
    assert ledger.requeue(chunk) == []
    assert ledger.pending[0] is chunk and chunk.item.attempt == 1 and len(ledger.pending) == 2


def test_a_started_chunk_comes_back_one_image_per_chunk_with_the_next_attempt() -> None:
    ledger = ledger_with(6)
    chunk = ledger.pending.popleft()
    chunk.started = True
    ledger.resolve(ok(1))
    assert ledger.requeue(chunk) == []
    retries = [ledger.pending.popleft() for _ in range(3)]
    assert [[r.index for r in c.item.images] for c in retries] == [[0], [2], [3]]
    assert {c.item.attempt for c in retries} == {2}
    # A late answer from the dead worker still counts, and the retry's answer is then dropped.
    assert ledger.resolve(ok(2)) is not None
    assert ledger.resolve(ok(2)) is None


def test_the_last_attempt_answers_unavailable() -> None:
    ledger = ledger_with(3, max_attempts=1)
    chunk = ledger.pending.popleft()
    chunk.started = True
    outcomes = ledger.requeue(chunk)
    assert [(o.index, o.code, o.message) for o in outcomes if o] == [
        (i, Code.UNAVAILABLE, f"image {i}: worker crashed while processing this image") for i in range(3)
    ]
    assert ledger.open_images == 0 and not ledger.pending


def test_pending_chunks_past_their_deadline_expire() -> None:
    ledger = ledger_with(5, deadline=10.0)
    assert ledger.expire(now=5.0) == []
    expired = ledger.expire(now=11.0)
    assert sorted(o.index for o in expired if o) == [0, 1, 2, 3, 4]
    assert {o.code for o in expired if o} == {Code.DEADLINE_EXCEEDED}
    assert not ledger.pending and ledger.open_images == 0


def test_fail_all_answers_every_open_image_once() -> None:
    ledger = ledger_with(5)
    dispatched = ledger.pending.popleft()
    ledger.resolve(ok(0))
    outcomes = ledger.fail_all(Code.UNAVAILABLE, "server is shutting down")
    assert sorted(o.index for o in outcomes if o) == [1, 2, 3, 4]
    assert not ledger.is_open(dispatched) and ledger.open_images == 0


def test_refile_moves_only_batches_no_worker_holds() -> None:
    """A staged batch moved to another tier: its waiting chunks read the copy, but a chunk in a
    worker's hands (or a batch with nothing open) refuses, and then nothing changed."""
    ledger = ledger_with(6)
    moved = FileRef("/var/spill/x", 3, 4, 60, 7)
    assert ledger.refile("b", moved)
    assert {c.item.file for c in ledger.pending} == {moved}
    assert not ledger.refile("unknown", moved)
    held = ledger.pending.popleft()  # dispatched: a worker may be reading it now
    assert not ledger.refile("b", FileRef("/elsewhere", 5, 6, 60, 8))
    assert {c.item.file for c in ledger.pending} == {held.item.file} == {moved}
    ledger.requeue(held)  # its worker died before starting it: waiting again
    assert ledger.refile("b", FileRef("/elsewhere", 5, 6, 60, 8))
    for i in range(6):
        ledger.resolve(ok(i))
    assert not ledger.refile("b", moved), "every image answered: nothing left to move"


def test_refile_without_a_file_only_asks() -> None:
    ledger = ledger_with(4)
    before = [c.item.file for c in ledger.pending]
    assert ledger.refile("b", None) and [c.item.file for c in ledger.pending] == before
    ledger.pending.popleft()  # in a worker's hands now
    assert not ledger.refile("b", None)
