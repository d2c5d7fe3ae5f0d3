"""A single-producer, single-consumer ring buffer of audio samples.

The producer is the capture callback, which must never block or raise: when the ring is
full it keeps what fits, counts the rest as an overrun and records the gap, so the consumer
still knows the true stream position of every sample it reads. File sources, which may
wait, use ``write(..., block=True)`` instead and so never lose audio.

No lock guards the data: each index is written by one side only, and CPython makes the
integer stores atomic, so the producer's ``_written`` store publishes a fully copied chunk.
"""

from __future__ import annotations

import collections
import itertools
import threading

import numpy as np

from streamkws.audio.chunk import Chunk


class RingBuffer:
    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self._buf = np.zeros(capacity, dtype=np.float32)
        self._written = 0  # samples ever stored (producer-owned)
        self._read = 0  # samples ever consumed (consumer-owned)
        self._next_in = 0  # stream position the producer expects next
        self._next_out = 0  # stream position of the next sample the consumer gets
        # (ring position, samples missing there), appended by the producer only.
        self._gaps: collections.deque[tuple[int, int]] = collections.deque()
        self._data = threading.Event()
        # wake() numbers its calls; a read returns at once while one it has not seen is
        # pending. An event alone would lose a wake to the read's own clear().
        self._wake_ids = itertools.count(1)
        self._wakes = 0  # the latest wake's number
        self._wakes_seen = 0  # consumer-owned: the latest a read started after
        self._space = threading.Event()
        self._closed = False
        # Consumer-owned: how much audio makes waking the consumer worthwhile. A live
        # stream arrives in 20-ms blocks, but a window needs 100 ms; waking five times per
        # window would cost more than the front end itself on silence.
        self._want = 1
        self._space_want = 1  # producer-owned: free room that makes waking it worthwhile
        self.overruns = 0
        """Writes that did not fit whole (the capture side outran the consumer)."""
        self.overrun_samples = 0
        """Samples lost to overruns."""
        self.gap_samples = 0
        """Samples the source itself reported missing (a jump in ``Chunk.start``)."""

    # -- producer side -------------------------------------------------------------------

    def write(
        self,
        chunk: Chunk,
        block: bool = False,
        stop: threading.Event | None = None,
    ) -> int:
        """Store ``chunk``; return how many of its samples were kept.

        Non-blocking (the default) never waits: what does not fit is counted and dropped.
        With ``block=True`` it waits for the consumer, until everything is stored or
        ``stop`` is set.
        """
        samples = chunk.samples
        if chunk.start > self._next_in:
            missing = chunk.start - self._next_in
            self.gap_samples += missing
            self._gaps.append((self._written, missing))
        self._next_in = chunk.start + len(samples)
        kept = 0
        while kept < len(samples):
            free = self.capacity - (self._written - self._read)
            if free <= 0:
                if not block:
                    break
                if stop is not None and stop.is_set():
                    break
                # Wait for room for a good part of the ring, not for the next read: a
                # file replayed faster than it is processed would otherwise trade a
                # thread wake-up for every chunk the consumer takes.
                self._space_want = min(len(samples) - kept + self.capacity // 4, self.capacity)
                self._space.clear()
                if self.capacity - (self._written - self._read) < self._space_want:
                    self._space.wait(0.05)
                continue
            n = min(free, len(samples) - kept)
            self._store(samples[kept : kept + n])
            kept += n
            if self._written - self._read >= self._want or self._gaps:
                self._data.set()
        lost = len(samples) - kept
        if lost:
            self.overruns += 1
            self.overrun_samples += lost
            self._gaps.append((self._written, lost))
            self._data.set()
        return kept

    def _store(self, samples: np.ndarray) -> None:
        pos = self._written % self.capacity
        first = min(len(samples), self.capacity - pos)
        self._buf[pos : pos + first] = samples[:first]
        if first < len(samples):
            self._buf[: len(samples) - first] = samples[first:]
        self._written += len(samples)  # publishes the data just copied

    def close(self) -> None:
        """Mark the end of the stream: the consumer drains what is left, then sees EOF."""
        self._closed = True
        self._data.set()

    # -- consumer side -------------------------------------------------------------------

    @property
    def write_position(self) -> int:
        """Stream position just past the newest sample the producer has offered."""
        return self._next_in

    @property
    def available(self) -> int:
        return self._written - self._read

    @property
    def exhausted(self) -> bool:
        """True once the stream is closed and every stored sample has been read."""
        return self._closed and self._written == self._read

    def read(self, max_samples: int | None = None, timeout: float = 0.0,
             min_samples: int = 1) -> Chunk | None:
        """Return the oldest unread samples (at most ``max_samples``), or None.

        A chunk never spans a gap, so ``chunk.start`` is exact. With ``timeout`` it waits
        that long for data before giving up. ``min_samples`` holds back a read until that
        much has arrived (or the stream closed, or a gap ended the run of samples), and
        the producer does not wake the consumer for less.
        """
        self._want = max(1, min_samples)
        # A wake from here on is this read's to answer or, if it returns with data first,
        # the next one's: the caller looks at its flags only after a read returns.
        wakes = self._wakes
        chunk = self._take_ready(max_samples)
        if chunk is None and timeout > 0 and not self._closed:
            self._data.clear()
            chunk = self._take_ready(max_samples)
            # Checked after the clear, which would erase the set() of a wake just before.
            if chunk is None and self._wakes == self._wakes_seen:
                self._data.wait(timeout)
                chunk = self._take_ready(max_samples)
        self._wakes_seen = wakes
        return chunk

    def wake(self) -> None:
        """Make the consumer's current or next :meth:`read` return at once (maybe with None),
        so that it looks at whatever it was woken for."""
        self._wakes = next(self._wake_ids)  # before the set: read() checks it after its clear
        self._data.set()

    def _take_ready(self, max_samples: int | None) -> Chunk | None:
        if self._written - self._read < self._want and not self._closed and not self._gaps:
            return None
        return self._take(max_samples)

    def _take(self, max_samples: int | None) -> Chunk | None:
        written = self._written
        while self._gaps and self._gaps[0][0] <= self._read:
            self._next_out += self._gaps.popleft()[1]
        n = written - self._read
        if self._gaps and self._gaps[0][0] < self._read + n:
            n = self._gaps[0][0] - self._read
        if max_samples is not None:
            n = min(n, max_samples)
        if n <= 0:
            return None
        pos = self._read % self.capacity
        first = min(n, self.capacity - pos)
        out = np.empty(n, dtype=np.float32)
        out[:first] = self._buf[pos : pos + first]
        if first < n:
            out[first:] = self._buf[: n - first]
        self._read += n
        if self.capacity - (self._written - self._read) >= self._space_want:
            self._space.set()
        chunk = Chunk(out, self._next_out)
        self._next_out += n
        return chunk
