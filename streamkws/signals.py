"""Signals handed to a thread of their own before anything acts on them.

Python runs a signal handler on the main thread between two bytecodes, wherever that
thread happens to be: also inside ``threading.Event.set``, ``clear`` or ``wait``, holding
the lock of that event's condition. A handler that then sets an event the main thread
uses (a stop flag, the ring buffer's wake-up) waits for a lock its own thread holds, for
ever: the daemon neither stops nor pings the watchdog, and systemd has to kill it. So the
handler here only writes the signal's number into a pipe, which takes no lock, and a
relay thread reads it and makes the call.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger(__name__)


class StopFlag:
    """A flag a signal handler may set: a plain attribute, where ``threading.Event.set``
    takes a lock that a second signal, landing inside the first handler, would wait for
    for ever."""

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def clear(self) -> None:
        self._set = False

    def is_set(self) -> bool:
        return self._set


class SignalRelay:
    """Route each signal in ``actions`` to its call, made on the relay thread.

    Install it from the main thread (where Python delivers signals); :meth:`close`
    puts the previous handlers back and ends the thread.
    """

    def __init__(self, actions: Mapping[int, Callable[[], None]]) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("signal handlers can only be installed from the main thread")
        self._actions = dict(actions)
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)  # a handler must never wait
        self._thread = threading.Thread(target=self._relay, name="signals", daemon=True)
        self._thread.start()
        self._previous: dict[int, Any] = {}
        try:
            for sig in self._actions:
                self._previous[sig] = signal.signal(sig, self.handle)
        except BaseException:
            self.close()
            raise

    def handle(self, signum: int, frame: object = None) -> None:
        """The installed handler: lock-free, so safe wherever the main thread is."""
        try:
            os.write(self._write_fd, bytes([signum]))
        except BlockingIOError:
            pass  # thousands of signals still pending: the relay will act on those
        except OSError:
            pass  # closed: a handler already replaced, running late

    def _relay(self) -> None:
        while True:
            try:
                data = os.read(self._read_fd, 64)
            except OSError:
                return
            if not data:  # close(): the write end is gone, and all before it was read
                return
            for signum in data:
                try:
                    self._actions[signum]()
                except Exception:  # a failed reload must not end signal handling
                    log.exception("acting on signal %d failed", signum)

    def close(self) -> bool:
        """Restore the previous handlers, act on what is still pending, end the thread.

        Only the main thread may change handlers: called from another, it leaves all as
        it is (the handlers still reach their actions) and returns False.
        """
        if self._write_fd < 0:
            return True
        if threading.current_thread() is not threading.main_thread():
            return False
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
        os.close(self._write_fd)
        self._write_fd = -1
        self._thread.join(timeout=1.0)
        os.close(self._read_fd)
        return True
