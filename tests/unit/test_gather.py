"""A worker's inbox as its dynamic batcher reads it (``stage.gather.Gatherer``): a pipeful per
read, chunks cut across writes read whole, the stop marker and the pool's close ending it."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time

from infer_server.messages import STOP, FileRef, ImageRef, WorkItem, dumps
from infer_server.pipes import frame
from infer_server.stage.gather import Gatherer


def chunk(item_id: int) -> WorkItem:
    refs = (ImageRef(0, 0, 10, f"image-{item_id}"),)
    return WorkItem(item_id, f"batch-{item_id}", FileRef("/dev/shm/x", 1, 2, 10, 7), refs, time.monotonic() + 300)


def test_chunks_written_at_once_run_together_and_the_stop_marker_after_them_ends_it() -> None:
    reader, writer = multiprocessing.Pipe(duplex=False)
    gatherer = Gatherer(reader, batch_size=8)
    os.write(writer.fileno(), b"".join(frame(dumps(m)) for m in (chunk(1), chunk(2), chunk(3), STOP)))
    assert [item.item_id for item in gatherer.next_group()] == [1, 2, 3]
    assert gatherer.stopped
    assert gatherer.next_group() == []
    writer.close()
    reader.close()


def test_a_chunk_cut_across_writes_is_read_whole() -> None:
    reader, writer = multiprocessing.Pipe(duplex=False)
    gatherer = Gatherer(reader, batch_size=1)
    data = frame(dumps(chunk(1)))
    os.write(writer.fileno(), data[:3])  # inside the length
    rest = threading.Timer(0.2, os.write, (writer.fileno(), data[3:]))
    rest.start()
    assert [item.item_id for item in gatherer.next_group()] == [1]  # waited for the rest
    rest.join()
    writer.close()
    reader.close()


def test_the_pools_close_and_a_garbled_inbox_end_it_after_the_chunks_before() -> None:
    for tail in (b"", (-7).to_bytes(4, "big", signed=True)):
        reader, writer = multiprocessing.Pipe(duplex=False)
        gatherer = Gatherer(reader, batch_size=1)
        os.write(writer.fileno(), frame(dumps(chunk(1))) + tail)
        writer.close()
        assert [item.item_id for item in gatherer.next_group()] == [1]
        assert gatherer.next_group() == [] and gatherer.stopped
        reader.close()
