"""Standard output for a command whose reader may stall or go away."""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

log = logging.getLogger(__name__)


def silence_stdout(out: TextIO) -> None:
    """After a ``BrokenPipeError`` on ``out`` (``streamkws run | head -1``): point the real
    stdout at /dev/null, so Python's flush at exit does not complain about the pipe."""
    if out is sys.stdout:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


class LineEcho:
    """Lines for a reader of standard output, written by a thread of their own.

    ``streamkws run | consumer`` must not stall the daemon when the consumer stops reading
    (suspended, busy, stuck): a blocking write there would stop detection, status messages
    and the watchdog alike. So :meth:`put` only queues. When ``wait`` is false (a live
    source, which cannot wait) a full queue drops the line and counts it; the line was
    published over ZeroMQ all the same. When the reader leaves (a broken pipe) or a write
    fails (a full disk), ``on_closed`` is called from the writer thread, with the error
    or ``None``; lines after that are not written.
    """

    def __init__(self, out: TextIO, on_closed: Callable[[OSError | None], None],
                 max_lines: int = 1000) -> None:
        self.out = out
        self.on_closed = on_closed
        self.queued = 0
        self.written = 0
        self.dropped = 0
        self.error: OSError | None = None
        self._lines: queue.Queue[str | None] = queue.Queue(max_lines)
        self._closed = threading.Event()  # the reader left, or writing failed
        self._thread = threading.Thread(target=self._write, name="stdout", daemon=True)
        self._thread.start()

    def put(self, line: str, wait: bool = False,
            stop: threading.Event | None = None) -> None:
        """Queue ``line``; with ``wait``, wait for room until ``stop`` is set."""
        while not self._closed.is_set():
            try:
                self._lines.put(line, block=wait, timeout=0.1 if wait else None)
                self.queued += 1
                return
            except queue.Full:
                if not wait or (stop is not None and stop.is_set()):
                    if self.dropped == 0:
                        log.warning("standard output is not being read: detection lines "
                                    "are dropped (they are still published)")
                    self.dropped += 1
                    return

    def _write(self) -> None:
        while (line := self._lines.get()) is not None:
            try:
                self.out.write(line)
                self.out.flush()
            except BrokenPipeError:
                # Whoever read our stdout left (`streamkws run | head -1`): stop as the
                # producer of a pipeline does, but cleanly.
                log.info("standard output was closed; stopping")
                silence_stdout(self.out)
                self._end(None)
                return
            except (OSError, ValueError) as exc:  # ValueError: a file closed under us
                self._end(exc if isinstance(exc, OSError) else OSError(str(exc)))
                return
            self.written += 1

    def _end(self, error: OSError | None) -> None:
        self.error = error
        self._closed.set()
        self.on_closed(error)

    def close(self, stop: threading.Event | None = None, grace: float = 0.5) -> None:
        """Write what is queued: all of it, unless ``stop`` is set (now or while waiting),
        then for ``grace`` seconds more at most."""
        give_up: float | None = None

        def patient() -> bool:
            nonlocal give_up
            if stop is None or not stop.is_set():
                return True
            if give_up is None:
                give_up = time.monotonic() + grace
            return time.monotonic() < give_up

        while not self._closed.is_set():
            try:
                self._lines.put(None, timeout=0.1)
                break
            except queue.Full:
                if not patient():
                    break
        while self._thread.is_alive() and patient():
            self._thread.join(0.1)
        unwritten = self.dropped + self.queued - self.written
        left = self._closed.is_set() and self.error is None  # nobody to write them for
        if unwritten and not left:
            log.warning("detection lines not written to standard output: %d (%s; they "
                        "were published)", unwritten,
                        "it was not being read" if self.error is None else "it failed")
