"""Keeping a live microphone open: reopen it with backoff when it fails, vanishes or stalls.

An always-on daemon must outlive its microphone: a USB device is unplugged, a
PulseAudio/PipeWire source is removed, the sound server restarts. What PortAudio does then
depends on the host API. Through ALSA's ``pulse`` plugin the stream ends at once (the
capture thread's poll fails and the finished callback runs), and every open fails with
"Input/output error" until the source is back. Other drivers may just stop calling back,
so a stream that delivers nothing for ``stall_timeout_s`` counts as gone as well.

The supervisor lives on the processing thread: the daemon calls :meth:`poll` on every turn
of its loop, so retrying never needs a thread of its own, signals and the watchdog keep
being served, and the capture callback still only writes the ring buffer. Between
attempts the device is closed, so PortAudio can be re-initialised to see devices that
appeared meanwhile.

Stream positions stay monotonic across an outage: each reopened stream continues after
the last sample heard, advanced by the outage's duration. The jump tells the front end
that audio is missing (no window straddles the outage) and keeps ``t_*`` close to wall
time, while ``audio_seconds`` still counts only samples actually heard.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator

from streamkws import SAMPLE_RATE
from streamkws.audio.base import AudioSource, Sink
from streamkws.audio.chunk import Chunk
from streamkws.errors import AudioError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _native_stderr_silenced(enabled: bool) -> Iterator[None]:
    """Point file descriptor 2 at /dev/null for a moment (C libraries write there directly).

    Only used on the processing thread while the device is closed, when no other thread
    has anything to say on stderr."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)

OK = "ok"
RETRYING = "retrying"

RETRY_INITIAL_S = 0.5
"""The first wait before reopening; each failed attempt doubles it up to ``retry_max_s``."""


class SourceSupervisor:
    """Opens ``source`` into ``sink`` and reopens it, with exponential backoff, when it fails.

    ``state`` is ``"ok"`` while audio flows and ``"retrying"`` from a failure until a
    reopened stream delivers audio again; ``error`` is the last error while retrying;
    ``retries`` counts reopen attempts since the start (monotonic, like the daemon's other
    counters, so a subscriber sees flapping that happened between two status messages).
    ``rescan`` re-enumerates devices; it is called only while the source is closed.
    """

    def __init__(
        self,
        source: AudioSource,
        sink: Sink,
        *,
        retry_initial_s: float = RETRY_INITIAL_S,
        retry_max_s: float = 10.0,
        stall_timeout_s: float = 5.0,
        rescan: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if retry_initial_s <= 0 or retry_max_s <= 0:
            raise ValueError("retry delays must be positive")
        self.source = source
        self.retry_initial_s = min(retry_initial_s, retry_max_s)
        self.retry_max_s = retry_max_s
        self.stall_timeout_s = stall_timeout_s
        self.state = OK
        self.error: str | None = None
        self.retries = 0
        self.outages = 0
        self._sink = sink
        self._rescan = rescan
        self._clock = clock
        self._delay = self.retry_initial_s
        self._open = False
        self._stopped = False
        self._next_attempt = 0.0
        self._opened_at = 0.0
        self._outage_start = 0.0
        self._outage_retries = 0
        self._reset_backoff_at: float | None = None
        # Written by the capture context (in _deliver), read here: plain attribute stores,
        # and the source is closed (no callbacks) whenever they must be exact.
        self._offset = 0
        self._end = 0
        self._last_audio = 0.0
        self._chunks = 0
        self._heard_any = False

    # -- the capture context ---------------------------------------------------------------

    def _deliver(self, chunk: Chunk) -> None:
        now = self._clock()
        if self._chunks == 0:
            # Placed by when its first sample was captured, not by when the stream opened:
            # a device may take a while to deliver (an idle PulseAudio sink: up to 2 s)
            # and what it did not capture meanwhile is part of the outage.
            captured = now - len(chunk.samples) / SAMPLE_RATE
            self._offset = self._resume_position(captured) - chunk.start
        shifted = Chunk(chunk.samples, chunk.start + self._offset)
        self._sink(shifted)
        self._end = shifted.end
        self._last_audio = now
        self._chunks += 1

    # -- the processing thread -------------------------------------------------------------

    def start(self) -> None:
        """Open the source; if that fails, start retrying instead of raising."""
        now = self._clock()
        self._last_audio = now
        self._attempt(now, first=True)

    def poll(self, now: float | None = None) -> bool:
        """Check the stream and reopen it when due; True when ``state`` changed."""
        if self._stopped:
            return False
        now = self._clock() if now is None else now
        before = self.state
        if self._open:
            failure = self._failure(now)
            if failure is not None:
                self._close()
                self._failed(now, failure)
            elif self._chunks:
                if self.state == RETRYING:
                    self._recovered(now)
                elif self._reset_backoff_at is not None and now >= self._reset_backoff_at:
                    # Only a stream that stayed up this long earns fast retries again, so a
                    # flapping device is retried (and logged) at most once per retry_max_s.
                    self._delay = self.retry_initial_s
                    self._reset_backoff_at = None
        elif now >= self._next_attempt:
            self._attempt(now)
        return self.state != before

    def stop(self) -> None:
        self._stopped = True
        self._close()

    @property
    def next_attempt_in(self) -> float | None:
        """Seconds until the next reopen attempt, or None while the stream is open."""
        return None if self._open else max(0.0, self._next_attempt - self._clock())

    # -- internals ---------------------------------------------------------------------------

    def _failure(self, now: float) -> str | None:
        if self.source.finished.is_set():
            err = self.source.error
            return str(err) if err is not None else f"audio source {self.source.name} ended"
        if self.stall_timeout_s > 0:
            silent = now - max(self._last_audio, self._opened_at)
            if silent >= self.stall_timeout_s:
                return (f"audio source {self.source.name} delivered no audio for "
                        f"{self.stall_timeout_s:g} s")
        return None

    def _close(self) -> None:
        if self._open:
            self._open = False
            self.source.stop()

    def _resume_position(self, captured: float) -> int:
        # Arrival times on both sides (the last chunk heard, the new first sample), so the
        # device's buffering latency cancels out. At least one sample of gap once anything
        # was heard, so the front end always restarts its windows after an outage.
        if self.outages == 0:
            return 0  # the stream opened at start-up: audio time begins with its first sample
        outage = max(0, round((captured - self._last_audio) * SAMPLE_RATE))
        return self._end + (max(1, outage) if self._heard_any else outage)

    def _attempt(self, now: float, first: bool = False) -> None:
        # Each failed open makes ALSA and PortAudio print about a dozen lines straight to
        # stderr (not through logging). The first failure keeps them, as diagnosis; the
        # repeats would flood the journal every few seconds for as long as the device is
        # away, so they are dropped unless debug logging is on.
        quiet = not first and self.state == RETRYING and not log.isEnabledFor(logging.DEBUG)
        with _native_stderr_silenced(quiet):
            self._try_open(now, first)

    def _try_open(self, now: float, first: bool) -> None:
        if not first:
            self.retries += 1
            if self._rescan is not None:
                try:
                    self._rescan()
                except Exception as exc:  # the open below reports what is really wrong
                    log.debug("re-scanning audio devices failed: %r", exc)
        self._heard_any = self._heard_any or self._chunks > 0
        self._chunks = 0  # the first chunk of the new stream fixes its offset (_deliver)
        try:
            self.source.start(self._deliver)
        except Exception as exc:  # any failure to open is retried: the daemon must outlive it
            self.source.stop()  # release whatever the failed open left half-done
            msg = str(exc) if isinstance(exc, AudioError) else f"{type(exc).__name__}: {exc}"
            self._failed(self._clock(), msg)  # the wait counts from now, not before the re-scan
            return
        # From now, not from the attempt: re-scanning and opening may take seconds that
        # are not the new stream's silence.
        self._opened_at = self._clock()
        self._open = True
        if not first:
            log.debug("reopened %s (attempt %d); waiting for audio", self.source.name,
                      self.retries)

    def _failed(self, now: float, message: str) -> None:
        self.error = message
        self._reset_backoff_at = None
        if self.state == OK:
            self.state = RETRYING
            self.outages += 1
            self._outage_start = now
            self._outage_retries = self.retries
            log.warning("audio source %s: %s; reopening it (retrying every %g s at most)",
                        self.source.name, message, self.retry_max_s)
        else:
            log.debug("audio source %s still unavailable: %s", self.source.name, message)
        self._next_attempt = now + self._delay
        log.debug("next attempt to open %s in %.2f s", self.source.name, self._delay)
        self._delay = min(self._delay * 2, self.retry_max_s)

    def _recovered(self, now: float) -> None:
        log.info("audio source %s is back after %.1f s (%d reopen attempts)",
                 self.source.name, now - self._outage_start, self.retries - self._outage_retries)
        self.state = OK
        self.error = None
        self._reset_backoff_at = now + self.retry_max_s
