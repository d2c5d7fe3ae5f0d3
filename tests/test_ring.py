"""The ring buffer between capture and processing."""

import threading
import time
from itertools import pairwise

import numpy as np

from streamkws.audio.chunk import Chunk
from streamkws.audio.ring import RingBuffer


def chunks_of(audio: np.ndarray, size: int):
    for i in range(0, len(audio), size):
        yield Chunk(audio[i : i + size], i)


def drain(ring: RingBuffer) -> list[Chunk]:
    out = []
    while (c := ring.read()) is not None:
        out.append(c)
    return out


def test_data_comes_out_in_order_across_the_wrap(speech_stream):
    ring = RingBuffer(1000)
    got = []
    for c in chunks_of(speech_stream, 333):
        assert ring.write(c) == len(c.samples)
        got += drain(ring)
    assert np.array_equal(np.concatenate([c.samples for c in got]), speech_stream)
    assert got[0].start == 0 and all(a.end == b.start for a, b in pairwise(got))
    assert ring.overruns == 0


def test_a_full_ring_drops_and_counts_instead_of_blocking():
    ring = RingBuffer(1000)
    x = np.arange(1500, dtype=np.float32)
    t = time.perf_counter()
    kept = ring.write(Chunk(x, 0))
    assert time.perf_counter() - t < 0.01
    assert kept == 1000 and ring.overruns == 1 and ring.overrun_samples == 500


def test_audio_time_survives_an_overrun():
    ring = RingBuffer(1000)
    ring.write(Chunk(np.zeros(800, np.float32), 0))
    ring.write(Chunk(np.ones(400, np.float32), 800))  # 200 fit, 200 lost
    ring.write(Chunk(np.full(100, 2, np.float32), 1200))  # no room at all
    assert ring.overrun_samples == 300
    first = ring.read()
    assert (first.start, len(first.samples)) == (0, 1000)
    ring.write(Chunk(np.full(100, 3, np.float32), 1300))
    after = ring.read()
    # The 200 + 100 lost samples are a gap: the next sample read is stream sample 1300.
    assert after.start == 1300 and np.all(after.samples == 3)


def test_a_source_reported_gap_is_carried_to_the_consumer():
    ring = RingBuffer(1000)
    ring.write(Chunk(np.zeros(100, np.float32), 0))
    ring.write(Chunk(np.ones(100, np.float32), 250))
    a, b = ring.read(), ring.read()
    assert (a.start, a.end, b.start) == (0, 100, 250)
    assert ring.gap_samples == 150


def test_slow_consumer_loses_audio_only_as_counted_overruns(speech_stream):
    """A producer at a fixed pace and a consumer that stalls: every sample is either
    read at its true stream position or counted as lost, never silently shifted."""
    ring = RingBuffer(4000)
    stream = np.tile(speech_stream, 2)
    done = threading.Event()

    def produce():
        for c in chunks_of(stream, 320):
            ring.write(c)
            time.sleep(0.0005)
        ring.close()
        done.set()

    got = []
    threading.Thread(target=produce).start()
    while not ring.exhausted:
        c = ring.read(max_samples=1000, timeout=0.05)
        if c is not None:
            got.append(c)
            time.sleep(0.02)  # a consumer far slower than the producer
    done.wait(5)
    assert ring.overruns > 0
    read = sum(len(c.samples) for c in got)
    assert read + ring.overrun_samples == len(stream)
    for c in got:
        assert np.array_equal(c.samples, stream[c.start : c.end])


def test_blocking_write_waits_for_the_consumer_and_loses_nothing(speech_stream):
    ring = RingBuffer(2000)

    def produce():
        for c in chunks_of(speech_stream, 1600):
            ring.write(c, block=True)
        ring.close()

    threading.Thread(target=produce).start()
    got = []
    while not ring.exhausted:
        c = ring.read(timeout=0.05)
        if c is not None:
            got.append(c.samples)
            time.sleep(0.002)
    assert ring.overruns == 0
    assert np.array_equal(np.concatenate(got), speech_stream)


def test_blocking_write_gives_up_when_stopped():
    ring = RingBuffer(100)
    stop = threading.Event()
    stop.set()
    assert ring.write(Chunk(np.zeros(300, np.float32), 0), block=True, stop=stop) == 100


def test_read_waits_for_data_up_to_the_timeout():
    ring = RingBuffer(100)
    t = time.perf_counter()
    assert ring.read(timeout=0.05) is None
    assert time.perf_counter() - t >= 0.04
    threading.Timer(0.02, lambda: ring.write(Chunk(np.ones(10, np.float32), 0))).start()
    c = ring.read(timeout=1.0)
    assert c is not None and len(c.samples) == 10


def test_a_wake_before_the_read_is_not_lost():
    """A stop request wakes the consumer between its look at the stop flag and its read;
    the read must return at once, not wait out its timeout (a SIGTERM stop has 2 s)."""
    ring = RingBuffer(100)
    ring.wake()
    t = time.perf_counter()
    assert ring.read(timeout=2.0) is None
    assert time.perf_counter() - t < 0.5
    # Once returned for, the wake is spent: the next read waits for data again.
    t = time.perf_counter()
    assert ring.read(timeout=0.05) is None
    assert time.perf_counter() - t >= 0.04


def test_a_wake_during_a_read_ends_it():
    ring = RingBuffer(100)
    threading.Timer(0.05, ring.wake).start()
    t = time.perf_counter()
    assert ring.read(timeout=2.0, min_samples=50) is None
    assert time.perf_counter() - t < 1.0


def test_a_wake_while_a_read_takes_its_data_is_kept_for_the_next_read():
    """A file's end (or a stop) signalled just as a read succeeds: the caller looks at its
    flags only when a read returns, so the next read must not wait out its timeout."""

    class WokenMidRead(RingBuffer):
        def _take_ready(self, max_samples):
            chunk = super()._take_ready(max_samples)
            if chunk is not None:
                self.wake()
            return chunk

    ring = WokenMidRead(100)
    ring.write(Chunk(np.ones(10, np.float32), 0))
    assert ring.read(timeout=2.0) is not None
    t = time.perf_counter()
    assert ring.read(timeout=2.0) is None
    assert time.perf_counter() - t < 0.5
