"""The systemd notify protocol, spoken directly on ``$NOTIFY_SOCKET``.

No systemd library is needed: a service of ``Type=notify`` tells the service manager about
its state by sending newline-separated ``KEY=VALUE`` datagrams to the AF_UNIX socket named
in ``$NOTIFY_SOCKET`` (see sd_notify(3)). A path starting with ``@`` names a socket in the
abstract namespace, where the ``@`` stands for a leading NUL byte.

Outside systemd (``NOTIFY_SOCKET`` unset) every call is a cheap no-op, so the daemon can
notify unconditionally. Sending never raises into the caller: a failure is logged once at
warning level (later ones at debug level) and reported as a ``False`` return value.

The watchdog: with ``WatchdogSec=`` set, systemd passes ``WATCHDOG_USEC`` (and
``WATCHDOG_PID``) and kills the service when no ``WATCHDOG=1`` arrives within that time.
:func:`watchdog_interval` gives half the timeout, the period sd_watchdog_enabled(3)
recommends, and :class:`WatchdogPacer` makes "is it time to pet the dog?" cheap enough to
ask on every iteration of the processing loop, so a hung pipeline really stops petting it::

    notifier = Notifier.from_env()
    pacer = WatchdogPacer(notifier.watchdog_interval())
    notifier.ready(status="listening")
    while running:
        process_one_block()
        if pacer.due():
            notifier.watchdog()
    notifier.stopping()
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)

#: Seconds a send may block when the manager's receive queue is full: the processing loop
#: pets the watchdog, and a stuck service manager must not stall the audio pipeline long.
SEND_TIMEOUT_S = 1.0


def _parse_address(value: str | None) -> str | bytes | None:
    """``$NOTIFY_SOCKET`` as a socket address: a path, or an abstract name as bytes."""
    if not value:
        return None
    if value.startswith("@"):
        # Abstract namespace: the name is the rest, after a leading NUL byte.
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    # sd_notify(3) accepts only absolute paths and abstract names for AF_UNIX
    # (systemd >= 253 also knows vsock:CID:PORT, which a Pi-class daemon never sees).
    log.warning("NOTIFY_SOCKET=%r is not an absolute path or @abstract name: "
                "not notifying systemd", value)
    return None


def _positive_int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        return None
    return n if n > 0 else None


def watchdog_interval(environ: Mapping[str, str] | None = None,
                      pid: int | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``$WATCHDOG_USEC``, or ``None``.

    ``None`` when the watchdog is off: ``WATCHDOG_USEC`` unset, not a positive integer, or
    ``WATCHDOG_PID`` set to another process than ``pid`` (default: ours). A child that
    inherited the environment must not think the watchdog is its job.
    """
    env = os.environ if environ is None else environ
    usec = _positive_int(env.get("WATCHDOG_USEC"))
    if usec is None:
        return None
    wd_pid = env.get("WATCHDOG_PID")
    if wd_pid and _positive_int(wd_pid) != (os.getpid() if pid is None else pid):
        return None
    return usec / 2 / 1_000_000


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock systemd's ``MONOTONIC_USEC=`` means."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Sends state notifications to systemd; does nothing when not run by systemd.

    Thread-safe: the processing loop may pet the watchdog while a signal handler's thread
    reports a reload.
    """

    def __init__(self, address: str | bytes | None, watchdog: float | None = None) -> None:
        #: The socket address (a path, or bytes starting with NUL), or None when disabled.
        self.address = address
        self._watchdog = watchdog if address is not None else None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._warned = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *,
                 unset_environment: bool = False) -> Notifier:
        """A notifier for ``$NOTIFY_SOCKET`` (and ``$WATCHDOG_USEC``/``$WATCHDOG_PID``).

        ``unset_environment`` removes those variables from ``os.environ`` afterwards, as
        sd_notify(3)'s flag of that name does, so child processes do not inherit them.
        """
        env = os.environ if environ is None else environ
        notifier = cls(_parse_address(env.get("NOTIFY_SOCKET")), watchdog_interval(env))
        if unset_environment:
            for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                os.environ.pop(key, None)
        return notifier

    @property
    def enabled(self) -> bool:
        """Whether there is a socket to notify (``NOTIFY_SOCKET`` was set and valid)."""
        return self.address is not None

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half of ``WatchdogSec=``), ``None`` when off."""
        return self._watchdog

    # -- the messages ---------------------------------------------------------------------

    def ready(self, status: str | None = None) -> bool:
        """Start-up (or a reload) is complete: ``READY=1``, with an optional ``STATUS=``."""
        if status is None:
            return self.notify(READY=1)
        return self.notify(READY=1, STATUS=status)

    def status(self, text: str) -> bool:
        """A one-line status shown by ``systemctl status``."""
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        """Pet the watchdog: ``WATCHDOG=1``."""
        return self.notify(WATCHDOG=1)

    def stopping(self) -> bool:
        """Shutdown has begun: ``STOPPING=1``."""
        return self.notify(STOPPING=1)

    def reloading(self, status: str | None = None) -> bool:
        """A reload has begun: ``RELOADING=1`` with ``MONOTONIC_USEC=``.

        systemd >= 253 requires the timestamp to match a reload to its request (older ones
        ignore it). Send :meth:`ready` when the reload is done. With the watchdog on, it is
        petted too: the processing thread, which pets it, now loads a model, and on a
        small board that may take seconds of the half-timeout left since the last pet.
        """
        fields: dict[str, object] = {"RELOADING": 1, "MONOTONIC_USEC": monotonic_usec()}
        if self._watchdog is not None:
            fields["WATCHDOG"] = 1
        if status is not None:
            fields["STATUS"] = status
        return self.notify(**fields)

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more time to start or stop: ``EXTEND_TIMEOUT_USEC=``."""
        return self.notify(EXTEND_TIMEOUT_USEC=max(0, int(seconds * 1_000_000)))

    def notify(self, **fields: object) -> bool:
        """Send ``KEY=VALUE`` lines (keys upper-cased); ``True`` when the datagram went out.

        Newlines in a value would start a new field, so they become spaces.
        """
        if self.address is None or not fields:
            return False
        try:
            message = "\n".join(
                f"{key.upper()}={str(value).replace(chr(10), ' ')}"
                for key, value in fields.items()
            ).encode()
            with self._lock:
                if self._sock is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    sock.settimeout(SEND_TIMEOUT_S)
                    self._sock = sock
                self._sock.sendto(message, self.address)
            return True
        except Exception as exc:  # a notification must never break the daemon
            self._report(exc)
            return False

    def _report(self, exc: Exception) -> None:
        if self._warned:
            log.debug("systemd notification failed: %s", exc)
            return
        self._warned = True
        shown = self.address
        if isinstance(shown, bytes):
            shown = "@" + shown[1:].decode(errors="replace")
        log.warning("cannot notify systemd on %s: %s (further failures are not logged)",
                    shown, exc)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WatchdogPacer:
    """Says when the next watchdog ping is due; cheap to ask on every loop iteration.

    ``interval`` is :meth:`Notifier.watchdog_interval`; with ``None`` (no watchdog) nothing
    is ever due. The first call is due at once, then one per ``interval`` seconds of the
    monotonic clock, counted from the last ping.
    """

    __slots__ = ("interval", "_next")

    def __init__(self, interval: float | None) -> None:
        if interval is not None and interval <= 0:
            raise ValueError(f"watchdog interval must be positive, got {interval}")
        self.interval = interval
        self._next = float("-inf")

    def due(self, now: float | None = None) -> bool:
        """``True`` (and the next ping scheduled) when a ping is due at ``now``."""
        if self.interval is None:
            return False
        if now is None:
            now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self.interval
        return True
