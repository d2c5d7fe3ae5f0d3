"""``streamkws listen``: subscribe to a daemon and print each message as one JSON line.

Topic filters are ZeroMQ's: a prefix match on the topic frame (``--topic det`` also gets
``detection``). With ``--server-key`` the connection uses CURVE: it is encrypted and the
daemon can check our key against its ``publish.curve_authorized_keys``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import stat
import sys
import time
from pathlib import Path
from typing import TextIO

import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from streamkws.config import tcp_host, tcp_port_problem
from streamkws.errors import StreamKWSError
from streamkws.publish import load_key_file
from streamkws.stdio import silence_stdout

log = logging.getLogger(__name__)

DEFAULT_CONNECT = "tcp://127.0.0.1:5556"

TOPICS = ("detection", "status")

NOT_CONNECTED_WARN_S = 5.0
"""After this long without a connection to the publisher, ``listen`` says so once: ZeroMQ
keeps retrying in silence, and a daemon publishes status at least every 5 s, so by then
a user watching an empty terminal deserves to know which of the two is quiet."""

HEARTBEAT_MS = 1000
"""``listen`` pings the publisher this often and counts it gone after three times as long
without an answer (ZeroMQ's own heartbeat, answered by the publisher's I/O thread)."""

_HANDSHAKE_FAILURES = {
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: (
        "handshake failed (is --server-key the publisher's public key?)"
    ),
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: (
        "handshake failed (security mismatch: does the publisher use CURVE and is "
        "--server-key its public key?)"
    ),
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: (
        "the publisher refused our key (not in its publish.curve_authorized_keys?)"
    ),
}


def listen(
    connect: str = DEFAULT_CONNECT,
    topics: list[str] | None = None,
    server_key: str | None = None,
    client_key: str | None = None,
    out: TextIO | None = None,
    count: int | None = None,
    timeout: float | None = None,
) -> int:
    """Print every message from ``connect`` as one JSON line on ``out``.

    Stops on Ctrl-C, after ``count`` messages, or after ``timeout`` seconds without one.
    Returns 0, or 1 when ``timeout`` ran out while not connected to the publisher (never
    reached, or gone without its final status and not back) or after a final status that
    carried an error.
    ``server_key``: the publisher's public key file (its ``.key`` or ``.key_secret``);
    ``client_key``: our key-pair file (``.key_secret``), else an ephemeral key pair.
    """
    out = sys.stdout if out is None else out
    problem = _connect_problem(connect)
    if problem:
        raise StreamKWSError(f"--connect {connect}: {problem}")
    for t in topics or []:
        if not any(name.startswith(t) for name in TOPICS):
            log.warning("--topic %r matches neither topic the daemon publishes (%s); "
                        "nothing will arrive", t, ", ".join(TOPICS))
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    # A publisher frozen whole (SIGSTOP, a hung host) or one whose host lost power or its
    # network closes no connection; without pings it would look connected for ever.
    sub.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_MS)
    sub.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * HEARTBEAT_MS)
    # And no limit on what waits to be printed: at the limit ZeroMQ stops reading the
    # connection, so a reader of our stdout that falls behind would starve the pongs,
    # and libzmq aborts the process on the reconnect that follows (its issue #3937).
    # The daemon's messages are few; a stalled reader costs ~300 bytes each.
    sub.setsockopt(zmq.RCVHWM, 0)
    monitor: zmq.Socket | None = None
    try:
        if connect.startswith("tcp://") and ":" in tcp_host(connect):
            sub.setsockopt(zmq.IPV6, 1)
        if server_key:
            _setup_curve_client(sub, server_key, client_key)
        elif client_key:
            raise StreamKWSError("--client-key needs --server-key (the publisher's public key)")
        for t in _subscriptions(topics):
            sub.setsockopt(zmq.SUBSCRIBE, t.encode("utf-8"))
        events = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
        for e in _HANDSHAKE_FAILURES:
            events |= e
        monitor = sub.get_monitor_socket(events)
        try:
            sub.connect(connect)
        except zmq.ZMQError as exc:
            raise StreamKWSError(f"cannot connect to {connect}: {exc}") from None
        told = _warn_if_unreachable(connect)
        return _loop(sub, monitor, connect, out, count, timeout, topics, told_why=told)
    except KeyboardInterrupt:
        return 0
    finally:
        if monitor is not None:
            sub.disable_monitor()
            monitor.close(linger=0)
        sub.close(linger=0)
        ctx.term()


def _setup_curve_client(sub: zmq.Socket, server_key: str, client_key: str | None) -> None:
    server_public, _ = load_key_file(server_key, "--server-key")
    if client_key:
        public, secret = load_key_file(client_key, "--client-key")
        if secret is None:
            raise StreamKWSError(
                f"--client-key: {client_key} holds only a public key; give the key-pair file "
                "('.key_secret')"
            )
    else:
        # Enough when the publisher lets any client in that knows its public key.
        public, secret = zmq.curve_keypair()
    try:
        sub.curve_serverkey = server_public
        sub.curve_publickey = public
        sub.curve_secretkey = secret
    except zmq.ZMQError as exc:
        raise StreamKWSError(f"--server-key {server_key}"
                             + (f" / --client-key {client_key}" if client_key else "")
                             + f": not a valid CURVE key ({exc})") from None


def _loop(sub: zmq.Socket, monitor: zmq.Socket, connect: str, out: TextIO,
          count: int | None, timeout: float | None, topics: list[str] | None = None,
          told_why: bool = False) -> int:
    poller = zmq.Poller()
    poller.register(sub, zmq.POLLIN)
    poller.register(monitor, zmq.POLLIN)
    received = 0
    started = last = time.monotonic()
    link = _Link(connect, started)
    if told_why:
        link.explained()
    while True:
        now = time.monotonic()
        deadlines = [link.warn_at] if link.warn_at is not None else []
        if timeout is not None:
            if last + timeout <= now:
                if link.failed is not None:
                    log.warning("%s: the publisher's run failed: %s", connect, link.failed)
                    return 1
                if link.up or link.ended:  # connected, or told the run ended cleanly
                    return 0
                # A script waiting for a detection must tell "none came" from "no daemon".
                if link.ever:
                    log.warning("%s: the publisher went away %.0f s ago and has not come "
                                "back; giving up", connect, now - link.lost_at)
                else:
                    log.warning("%s: never connected; giving up after %g s", connect,
                                timeout)
                return 1
            deadlines.append(last + timeout)
        wait_ms = max(1, int((min(deadlines) - now) * 1000) + 1) if deadlines else None
        events = dict(poller.poll(wait_ms))
        # Messages before connection events: a daemon publishes its final status and
        # closes at once, and its disconnect must be read knowing that the run ended.
        while sub in events:
            try:
                frames = sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            formatted = _format(frames)
            if formatted is None:
                continue
            line, payload = formatted
            link.heard(frames[0], payload)
            if not _wanted(frames[0], topics):  # a status taken only to see the run end
                continue
            last = time.monotonic()
            try:
                out.write(line + "\n")
                out.flush()
            except BrokenPipeError:
                silence_stdout(out)
                return 0
            received += 1
            if count is not None and received >= count:
                return 0
        if monitor in events:
            _handle_monitor(monitor, link)
        link.check(time.monotonic())


def _wanted(topic: bytes, topics: list[str] | None) -> bool:
    return not topics or any(topic.startswith(t.encode("utf-8")) for t in topics)


def _subscriptions(topics: list[str] | None) -> list[str]:
    """What to subscribe to: the topics asked for, and ``status`` too (not printed unless
    asked for), whose final message tells a run that ended from a daemon that died."""
    if not topics:
        return [""]
    return [*topics, *([] if _wanted(b"status", topics) else ["status"])]


def _format(frames: list[bytes]) -> tuple[str, dict] | None:
    """The message as one JSON line, and as parsed; None (after a warning) if it is not
    one of ours."""
    if len(frames) != 2:
        log.warning("ignoring a message of %d frames (expected topic and JSON)", len(frames))
        return None
    try:
        payload = json.loads(frames[1].decode("utf-8"), parse_constant=_not_json)
    except (UnicodeDecodeError, ValueError) as exc:
        log.warning("ignoring a %r message that is not UTF-8 JSON: %s", frames[0], exc)
        return None
    if not isinstance(payload, dict):
        log.warning("ignoring a %r message that is not a JSON object", frames[0])
        return None
    # Re-encoded so a publisher's pretty-printed JSON still comes out as one line; numbers
    # too large for a float (1e400) come back as infinity, which JSON cannot say.
    try:
        line = json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        line.encode("utf-8")
    except ValueError:  # a lone surrogate ("\ud800") or an infinity
        try:
            return json.dumps(payload, allow_nan=False, separators=(",", ":")), payload
        except ValueError:
            log.warning("ignoring a %r message with a number JSON cannot hold", frames[0])
            return None
    return line, payload


def _not_json(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _connect_problem(connect: str) -> str | None:
    """What is wrong with ``connect`` as an address to connect to, or None."""
    scheme = connect.split("://", 1)[0] if "://" in connect else None
    if scheme not in ("tcp", "ipc"):
        return "expected tcp://HOST:PORT or ipc://PATH, the daemon's publish.endpoint"
    wildcard = "a wildcard is for binding; give the publisher's own host and port"
    if scheme == "ipc":
        path = connect[len("ipc://"):]
        return "ipc:// needs the socket's path" if not path else wildcard if path == "*" else None
    if tcp_port_problem(connect):  # its wording offers bind's 0 and *
        return "the port must be 1-65535, the publisher's"
    if connect.rsplit(":", 1)[1] in ("*", "0") or tcp_host(connect) in ("*", ""):
        return wildcard
    return None


def _warn_if_unreachable(connect: str) -> bool:
    """What ZeroMQ retries forever with no event to report: a host name that does not
    resolve, an ipc:// path that is no socket or that we may not use. Returns whether it
    warned."""
    if connect.startswith("ipc://"):
        return _warn_if_unusable_socket(Path(connect[len("ipc://"):]), connect)
    if not connect.startswith("tcp://"):
        return False
    host = tcp_host(connect).strip("[]")
    try:
        socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):
        log.warning("%s: cannot resolve host %r; still trying (ZeroMQ retries quietly)",
                    connect, host)
        return True
    return False


def _warn_if_unusable_socket(path: Path, connect: str) -> bool:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return False  # not yet: the daemon may still be starting (said after 5 s)
    except OSError as exc:
        log.warning("%s: cannot reach %s (%s); still trying", connect, path,
                    exc.strerror or exc)
        return True
    if not stat.S_ISSOCK(mode):
        log.warning("%s: %s is not a socket; still trying", connect, path)
        return True
    if not os.access(path, os.W_OK):
        log.warning("%s: permission denied: %s is mode %04o, owner %s, and we may not write "
                    "to it (see the daemon's UMask= and group in systemd/README.md); still "
                    "trying", connect, path, stat.S_IMODE(mode), _owner(path))
        return True
    return False


def _owner(path: Path) -> str:
    try:
        return path.owner()
    except (KeyError, OSError):
        return str(path.stat().st_uid)


class _Link:
    """Whether we have reached the publisher, and whether the user has been told we have not."""

    def __init__(self, connect: str, started: float) -> None:
        self.connect = connect
        self.started = started
        self.warn_at: float | None = started + NOT_CONNECTED_WARN_S
        self.told = False
        self.ever = False
        self.up = False
        self.lost_at = started
        self.ended = False
        """The last message was the publisher's final status: its going away is no news."""
        self.failed: str | None = None
        """That final status's ``error``: the run ended, but as a failure."""
        self.failures_told: set[int] = set()
        """Handshake failures already explained since the last success."""

    def check(self, now: float) -> None:
        if self.warn_at is not None and now >= self.warn_at:
            self.warn_at = None
            self.told = True
            log.warning("%s: not connected after %.0f s; still trying (is `streamkws run` "
                        "publishing there?)", self.connect, now - self.started)

    def explained(self) -> None:
        """The user was told more precisely why no connection comes than "not connected"
        would say; a later success is news to them."""
        self.warn_at, self.told = None, True

    def connected(self, now: float) -> None:
        self.warn_at = None
        self.up = True
        self.failures_told.clear()
        if self.told:  # the user saw the warning: say that it no longer holds
            self.told = False
            since = self.lost_at if self.ever else self.started
            log.warning("%s: %s after %.0f s", self.connect,
                        "reconnected" if self.ever else "connected", now - since)
        elif self.ever:  # after a clean stop: a new run, whose seq starts again
            log.info("%s: a publisher is back after %.0f s (a new run: seq starts at 0 again)",
                     self.connect, now - self.lost_at)
        else:
            log.debug("connected to %s", self.connect)
        self.ever = True

    def heard(self, topic: bytes, payload: dict) -> None:
        """Every message: whether the run it comes from has ended, and how."""
        self.ended = topic == b"status" and payload.get("final") is True
        error = payload.get("error") if self.ended else None
        self.failed = str(error) if error else None

    def lost(self, now: float) -> None:
        """ZeroMQ reconnects by itself, in silence: a subscriber left waiting for a
        detection must learn that the daemon stopped or restarted."""
        if not self.up:
            return
        self.up, self.lost_at = False, now
        if self.ended:
            log.info("%s: the publisher stopped (its final status came)", self.connect)
            return
        self.told = True
        log.warning("%s: the publisher went away (stopped or restarting?); reconnecting",
                    self.connect)


def _handle_monitor(monitor: zmq.Socket, link: _Link) -> None:
    while True:
        try:
            evt = recv_monitor_message(monitor, zmq.NOBLOCK)
        except zmq.Again:
            return
        event = evt["event"]
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            link.connected(time.monotonic())
        elif event == zmq.EVENT_DISCONNECTED:
            link.lost(time.monotonic())
        elif event in _HANDSHAKE_FAILURES and event not in link.failures_told:
            # ZeroMQ retries forever and silently; say once why nothing arrives.
            link.failures_told.add(event)
            link.explained()
            log.warning("%s: %s", link.connect, _HANDSHAKE_FAILURES[event])


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {n})")
    return n


def _positive_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < x < float("inf"):  # NaN fails too; inf overflows the poll's timeout
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds (got {text})")
    return x


def add_listen_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``streamkws listen`` options."""
    parser.add_argument("--connect", metavar="EP", default=DEFAULT_CONNECT,
                        help=f"publisher endpoint (default {DEFAULT_CONNECT})")
    parser.add_argument("--topic", metavar="T", action="append", default=None,
                        help="topic prefix to receive (detection, status); repeatable; "
                             "default all")
    parser.add_argument("--server-key", metavar="FILE", default=None,
                        help="the publisher's CURVE public key file: turns on encryption")
    parser.add_argument("--client-key", metavar="FILE", default=None,
                        help="our CURVE key-pair file (.key_secret) when the publisher only "
                             "admits known clients; default a throw-away key pair")
    parser.add_argument("--count", metavar="N", type=_positive_int, default=None,
                        help="exit after N messages")
    parser.add_argument("--timeout", metavar="S", type=_positive_float, default=None,
                        help="exit after S seconds without a message: 0 if connected or "
                             "the publisher ended with its final status, 1 if not reached "
                             "(never, or gone and not back) or if its run failed")


def run_listen(args: argparse.Namespace) -> int:
    return listen(
        connect=args.connect,
        topics=args.topic or [],
        server_key=args.server_key,
        client_key=args.client_key,
        count=args.count,
        timeout=args.timeout,
    )
