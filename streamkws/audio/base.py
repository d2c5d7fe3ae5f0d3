"""The one interface every audio source offers.

A source delivers 16 kHz mono float32 :class:`Chunk` objects to a *sink* (normally
``RingBuffer.write``) from its own capture context: a PortAudio callback for microphones,
a reader thread for files and stdin. ``start`` returns at once; ``finished`` is set when the
stream ends (end of file, device gone, ``stop``) and ``error`` says why if it ended badly.
"""

from __future__ import annotations

import abc
import logging
import threading
import time
from collections.abc import Callable, Iterator

from streamkws import SAMPLE_RATE
from streamkws.audio.chunk import Chunk

log = logging.getLogger(__name__)

Sink = Callable[[Chunk], object]


class AudioSource(abc.ABC):
    name: str
    """How the source is reported in messages, e.g. ``mic:0`` or ``wav:/path.wav``."""

    blocks_on_full_ring: bool = False
    """File-like sources may wait for the consumer (nothing is lost); microphones may not."""

    reports_stalls: bool = False
    """Whether the daemon should watch :meth:`input_wait` and report a stall: a source
    fed by another program (stdin) that cannot be reopened, only waited for."""

    def __init__(self) -> None:
        self.finished = threading.Event()
        self.started_wall: float | None = None
        """Unix time at which the stream's first sample counts as captured."""
        self.error: BaseException | None = None
        self.samples_delivered = 0
        self.samples_read = 0
        """Samples taken from the input so far, delivered or about to be (a stall watcher
        tells input that came from a stream that ended by it)."""
        self.on_finished: Callable[[], object] | None = None
        """Called (from the capture context) once a file or stdin stream has ended, so a
        consumer waiting for audio need not poll to notice."""

    @abc.abstractmethod
    def start(self, sink: Sink) -> None:
        """Begin delivering chunks to ``sink``; returns immediately."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop delivering and release the device or file. Idempotent."""

    def input_wait(self, now: float) -> float:
        """Seconds (by ``time.monotonic``) the source has been waiting for its input to
        deliver anything, up to ``now``; 0 when it is not waiting."""
        return 0.0

    def __enter__(self) -> AudioSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ThreadedSource(AudioSource):
    """A source that produces chunks from a generator on a reader thread.

    Subclasses implement :meth:`blocks`, yielding float32 mono 16 kHz arrays. With
    ``realtime=True`` delivery is paced like a microphone; otherwise as fast as the sink
    accepts, while chunk positions still count audio time.
    """

    blocks_on_full_ring = True

    def __init__(self, realtime: bool = False) -> None:
        super().__init__()
        self.realtime = realtime
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._waiting_since: float | None = None

    @abc.abstractmethod
    def blocks(self) -> Iterator:
        """Yield successive float32 arrays of 16 kHz mono audio until the stream ends."""

    def chunks(self) -> Iterator[Chunk]:
        """The whole stream as chunks, synchronously (for tools and tests)."""
        pos = 0
        t0 = time.monotonic()
        self.started_wall = time.time()
        blocks = self.blocks()
        while True:
            # Only the wait for input counts, not the pacing below or a full ring: a
            # producer that has gone quiet is told apart from a consumer that is busy.
            self._waiting_since = time.monotonic()
            try:
                block = next(blocks, None)
            finally:
                self._waiting_since = None
            if block is None:
                return
            if self._stop.is_set():
                return
            if len(block) == 0:
                continue
            self.samples_read += len(block)
            if self.realtime:
                # Pace by the end of the block: a real microphone hands a block over only
                # once its last sample has been captured.
                delay = t0 + (pos + len(block)) / SAMPLE_RATE - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    return
            yield Chunk(block, pos)
            pos += len(block)

    def input_wait(self, now: float) -> float:
        since = self._waiting_since  # read once: the reader thread clears it
        return 0.0 if since is None else max(0.0, now - since)

    def start(self, sink: Sink) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(sink,), name=f"capture[{self.name}]", daemon=True
        )
        self._thread.start()

    def _run(self, sink: Sink) -> None:
        try:
            for chunk in self.chunks():
                sink(chunk)
                self.samples_delivered = chunk.end
        except BaseException as exc:  # reported through .error, never lost in a thread
            log.error("audio source %s failed: %s", self.name, exc)
            self.error = exc
        finally:
            self.finished.set()
            if self.on_finished is not None:
                self.on_finished()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            # A reader blocked on a silent pipe cannot be woken; it is a daemon thread, so
            # waiting longer would only eat into the 2 s a stop may take.
            self._thread.join(timeout=1.0)
        self.finished.set()
