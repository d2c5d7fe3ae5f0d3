"""Detection and status messages on a ZeroMQ PUB socket.

Wire format (binding, see the contract): two frames, the topic (``b"detection"`` or
``b"status"``) and UTF-8 JSON carrying ``"v": 1`` and ``"seq"``, a counter of every message
sent on the socket from 0. A subscriber that sees ``seq`` jump knows it lost messages.

ZeroMQ's PUB socket never blocks and never reports a slow subscriber: when one subscriber's
queue (``publish.high_water_mark`` messages) is full, messages for *that* subscriber are
silently dropped and every other subscriber still gets them. ``seq`` therefore advances for
every message handed to ZeroMQ and each subscriber sees gaps only for what it dropped itself.

Threading: a ``zmq.Socket`` is not thread-safe. One thread (the daemon's processing thread)
publishes and calls :meth:`Publisher.close`; other threads hand it messages through a queue.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import pwd
import socket
import stat
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from streamkws.config import PublishConfig, tcp_host
from streamkws.errors import StreamKWSError, TemporaryError

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
TOPIC_DETECTION = "detection"
TOPIC_STATUS = "status"

# Short enough that shutdown never hangs on a subscriber that went away, long enough for
# the final status message to leave the machine on a healthy connection.
LINGER_MS = 500
# ZMTP heartbeats let the socket notice a subscriber whose link died without a FIN (Wi-Fi
# gone, board unplugged) and free its queue, instead of waiting for TCP's 2-hour keepalive.
HEARTBEAT_IVL_MS = 10_000
HEARTBEAT_TIMEOUT_MS = 30_000


def _ms(x: float) -> float | None:
    """Seconds rounded to the millisecond; ``None`` for NaN/inf, which JSON cannot carry."""
    x = float(x)
    return round(x, 3) if math.isfinite(x) else None


def _r4(x: float) -> float | None:
    x = float(x)
    return round(x, 4) if math.isfinite(x) else None


def detection_message(
    keyword: str,
    score: float,
    t_start: float,
    t_end: float,
    t_emit: float,
    source: str,
    model: str,
    model_sha256: str,
) -> dict[str, Any]:
    """A detection message with exactly the contract's keys.

    ``seq`` is ``None`` until :meth:`Publisher.publish` fills it in; the key is present so
    the JSON keeps the contract's key order.
    """
    return {
        "v": PROTOCOL_VERSION,
        "type": "detection",
        "keyword": str(keyword),
        "score": _r4(score),
        "t_start": _ms(t_start),
        "t_end": _ms(t_end),
        "t_emit": _ms(t_emit),
        "seq": None,
        "source": str(source),
        "model": str(model),
        "model_sha256": str(model_sha256),
        "wall_time": _ms(time.time()),
    }


def status_message(
    *,
    uptime: float,
    audio_seconds: float,
    inferences: int,
    vad_active_ratio: float,
    overruns: int,
    dropped_windows: int,
    detections: int,
    final: bool = False,
    cpu_seconds: float | None = None,
    inference_ms_p50: float | None = None,
    inference_ms_p99: float | None = None,
    source_state: str | None = None,
    source_error: str | None = None,
    source_retries: int | None = None,
    source_overflows: int | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    """A status message with the contract's keys (plus ``"final": true`` if final).

    The optional extras (process CPU time, inference latency, the audio source's health,
    and in a final status why the daemon failed) are added after the contract's keys when
    given; subscribers that do not know them ignore them. Keyword-only so
    ``status_message(**counters)`` with a misspelt counter fails loudly.
    """
    msg: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "type": "status",
        "seq": None,
        "uptime": _ms(uptime),
        "audio_seconds": _ms(audio_seconds),
        "inferences": int(inferences),
        "vad_active_ratio": _r4(vad_active_ratio),
        "overruns": int(overruns),
        "dropped_windows": int(dropped_windows),
        "detections": int(detections),
    }
    extras = {"cpu_seconds": cpu_seconds, "inference_ms_p50": inference_ms_p50,
              "inference_ms_p99": inference_ms_p99, "source_state": source_state,
              "source_error": source_error, "source_retries": source_retries,
              "source_overflows": source_overflows, "error": error}
    msg.update({k: v for k, v in extras.items() if v is not None})
    if final:
        msg["final"] = True
    return msg


class Publisher:
    """A bound PUB socket that sends contract messages without ever blocking.

    The socket is an XPUB: it sends exactly as a PUB does, and also hears subscriptions
    arrive, so a replay can wait for its subscribers instead of publishing into the void
    (ZeroMQ drops what is sent before a subscription reaches the publisher).

    Not thread-safe: publish and close from one thread (see the module docstring).
    """

    def __init__(self, cfg: PublishConfig, context: zmq.Context | None = None) -> None:
        self.cfg = cfg
        self.sent = 0
        """Messages handed to ZeroMQ; also the ``seq`` of the next message."""
        self.dropped = 0
        """Messages ZeroMQ refused (``zmq.Again``) or could not take; never given a ``seq``."""
        self._closed = False
        self._own_context = context is None
        self.context: zmq.Context = zmq.Context() if context is None else context
        self._auth: ThreadAuthenticator | None = None
        self.subscriptions = 0
        """Subscriptions held now: each subscriber makes one per topic, and takes them back
        when it unsubscribes or leaves."""
        self._greeting_owed = False
        """A subscription to ``status`` came that no status was sent after (:meth:`poll`)."""
        self._peers: set[int] = set()
        """The connections accepted and not yet closed, by file descriptor."""
        self._bound = False
        self.socket: zmq.Socket = self.context.socket(zmq.XPUB)
        self._monitor: zmq.Socket | None = None
        try:
            # Watched from before the bind, so no subscriber can connect unseen.
            self._monitor = self._watch(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
            self._setup(cfg)
        except BaseException:
            self.close()
            raise
        self.endpoint: str = self._bound_endpoint()
        chosen = cfg.endpoint.startswith("tcp://") and cfg.endpoint.rsplit(":", 1)[1] in (
            "0", "*")
        # A port the system chose is something the user cannot otherwise learn; the
        # daemon's start-up line names the endpoint in every other case.
        log.log(logging.WARNING if chosen else logging.DEBUG, "publishing on %s%s",
                self.endpoint, " (CURVE)" if self._auth else "")

    # -- set-up -------------------------------------------------------------------------

    def _setup(self, cfg: PublishConfig) -> None:
        s = self.socket
        s.setsockopt(zmq.SNDHWM, cfg.high_water_mark)
        # Pass up every subscribe and unsubscribe, not only a topic's first and last: the
        # unsubscribes a leaving subscriber's connection makes keep `subscriptions` a count
        # of those held now, so one who left cannot make a bare TCP connection (a port
        # scan, a health check) pass for a subscriber in wait_for_subscribers.
        s.setsockopt(zmq.XPUB_VERBOSER, 1)
        s.setsockopt(zmq.LINGER, LINGER_MS)
        s.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        s.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        if cfg.endpoint.startswith("tcp://"):
            host = tcp_host(cfg.endpoint)
            # IPv6 sockets also accept IPv4 but ``*`` would then mean every v4 *and* v6
            # interface; keep it off unless the address itself is IPv6.
            s.setsockopt(zmq.IPV6, 1 if ":" in host else 0)
            if host in ("*", "0.0.0.0", "[::]", "::") and not cfg.curve_secret_key:
                log.warning("%s publishes detections unencrypted to every network interface; "
                            "consider publish.curve_secret_key", cfg.endpoint)
        elif cfg.endpoint.startswith("ipc://"):
            _prepare_ipc_path(cfg.endpoint)
        if cfg.curve_secret_key:
            self._setup_curve(cfg)
        try:
            s.bind(cfg.endpoint)
        except zmq.ZMQError as exc:
            # An address DHCP has not given yet, an interface without its address yet, a
            # port a previous process still holds: at boot these heal, so systemd retries
            # them. ZeroMQ's ENODEV also covers a host that names nothing (a typo), which
            # never heals: only an interface that exists counts as "not yet".
            transient = exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL) or (
                exc.errno == errno.ENODEV and _is_interface(tcp_host(cfg.endpoint)))
            raise (TemporaryError if transient else StreamKWSError)(
                f"cannot publish on {cfg.endpoint}: {_bind_reason(exc, cfg.endpoint)}"
            ) from None
        self._bound = True

    def _setup_curve(self, cfg: PublishConfig) -> None:
        path = Path(cfg.curve_secret_key).expanduser()
        public, secret, location = load_curve_keys(cfg)
        try:
            s = self.socket
            s.curve_secretkey = secret
            s.curve_publickey = public
            s.curve_server = True
        except zmq.ZMQError as exc:
            raise StreamKWSError(
                f"publish.curve_secret_key: {path} does not hold a valid CURVE key ({exc})"
            ) from None
        auth = ThreadAuthenticator(self.context, log=logging.getLogger(f"{__name__}.auth"))
        try:
            auth.start()
        except zmq.ZMQError as exc:
            # ZAP handlers are per context: a second CURVE publisher on a shared context
            # cannot start its own. Its half-made socket would keep the context open.
            with contextlib.suppress(Exception):
                auth.stop()
            raise StreamKWSError(
                f"cannot start CURVE authentication for {cfg.endpoint}: {exc}"
            ) from None
        self._auth = auth
        auth.configure_curve(domain="*", location=location)

    def _watch(self, events: int) -> zmq.Socket:
        """The socket's connection events, read in :meth:`_drain_subscriptions`.

        Its reading end takes any number of them. With ZeroMQ's default limit (1,000), a
        burst of connections between two reads (anyone who can reach the port can make
        one, before any CURVE check) blocked ZeroMQ's I/O thread on the full queue: no
        message delivered, no connection accepted, and close() waiting for it for ever.
        """
        address = f"inproc://streamkws-monitor-{uuid.uuid4().hex}"
        self.socket.monitor(address, events)
        reader = self.context.socket(zmq.PAIR)
        reader.rcvhwm = 0
        reader.connect(address)
        return reader

    def _bound_endpoint(self) -> str:
        try:
            last = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        except zmq.ZMQError:
            last = ""
        return last or self.cfg.endpoint

    # -- use ----------------------------------------------------------------------------

    def _drain_subscriptions(self) -> None:
        while True:
            try:
                frame = self.socket.recv(zmq.NOBLOCK)
            except zmq.ZMQError:
                break
            if frame[:1] == b"\x01":
                self.subscriptions += 1
                if b"status".startswith(frame[1:]):
                    self._greeting_owed = True
            elif frame[:1] == b"\x00":
                self.subscriptions = max(0, self.subscriptions - 1)
        while self._monitor is not None:
            try:
                evt = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.ZMQError:
                break
            # By connection: both events carry its file descriptor. (A client refused by
            # CURVE is accepted and soon disconnected; it never subscribes meanwhile.)
            if evt["event"] == zmq.EVENT_ACCEPTED:
                self._peers.add(evt["value"])
            elif evt["event"] == zmq.EVENT_DISCONNECTED:
                self._peers.discard(evt["value"])

    def poll(self) -> bool:
        """Take in what subscribers sent; True when a subscription to ``status`` has come
        that the last status sent may have missed, so the caller can greet it with one at
        once. ZeroMQ delivers to a subscription only what is sent after it arrives: a
        subscriber that connects, or reconnects to a restarted daemon, would otherwise wait
        out the status interval. One that arrived during the last send counts as missed: at
        most a spare status, never a missed one."""
        self._drain_subscriptions()
        return self._greeting_owed

    @property
    def subscribers(self) -> int:
        """Subscribers connected now (as of the last look at the socket's events)."""
        return len(self._peers)

    def wait_for_subscribers(self, n: int, timeout: float,
                             stop: threading.Event | None = None) -> bool:
        """Block until ``n`` subscribers are connected and have subscribed, ``timeout``
        seconds pass or ``stop`` is set (a SIGTERM must not wait out the timeout).

        ZeroMQ does not say which subscriber sent a subscription, so "have subscribed" means
        at least ``n`` subscriptions: a subscriber to two topics and one still connecting
        pass as two.
        """
        deadline = time.monotonic() + timeout
        self._drain_subscriptions()
        while self.subscribers < n or self.subscriptions < n:
            left = deadline - time.monotonic()
            if left <= 0 or (stop is not None and stop.is_set()):
                return False
            time.sleep(min(left, 0.02))
            self._drain_subscriptions()
        return True

    def publish(self, topic: str, payload: dict[str, Any]) -> bool:
        """Send ``payload`` as JSON under ``topic``; never blocks.

        ``payload`` gets ``"v"`` and ``"seq"`` set in place, so the caller can print exactly
        what subscribers receive. Returns False (and counts ``dropped``) when ZeroMQ did not
        take the message, whose ``seq`` the next message then reuses; a PUB socket
        practically never refuses, it drops per subscriber instead.
        A payload that is not JSON-serialisable is a bug and raises.
        """
        if self._closed:
            self.dropped += 1
            return False
        self._drain_subscriptions()  # keeps the XPUB's incoming queue from growing
        payload["v"] = PROTOCOL_VERSION
        payload["seq"] = self.sent
        # "replace": a string that cannot be UTF-8 (a file name's undecodable bytes) must
        # not stop detections from going out.
        data = json.dumps(payload, ensure_ascii=False, allow_nan=False,
                          separators=(",", ":")).encode("utf-8", "replace")
        try:
            self.socket.send_multipart([topic.encode("utf-8"), data], flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1
            return False
        except zmq.ZMQError as exc:
            # Detection must carry on even if publishing breaks (context terminated etc.).
            self.dropped += 1
            log.warning("publish on %s failed: %s", self.endpoint, exc)
            return False
        self.sent += 1
        if topic == "status":  # it reaches all drained just before it: no gap
            self._greeting_owed = False
        return True

    def close(self) -> None:
        """Close the socket (waiting at most LINGER_MS for queued messages); idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._monitor is not None:
                self.socket.disable_monitor()
                self._monitor.close(linger=0)
                self._monitor = None
            self.socket.close(linger=LINGER_MS)
            if self._bound:  # never another process's file: only the one we bound
                _remove_ipc_file(self.cfg.endpoint)
        finally:
            if self._auth is not None:
                self._auth.stop()
                self._auth = None
            if self._own_context:
                self.context.term()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_key_file(path: str | os.PathLike[str], option: str) -> tuple[bytes, bytes | None]:
    """A CURVE key file's (public, secret or None), or one error line naming ``option``:
    the daemon's key (``publish.curve_secret_key``) and ``listen``'s both come through here."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise StreamKWSError(f"{option} {path}: is a folder; give the key file")
    if not path.is_file():
        raise StreamKWSError(f"{option}: no such key file: {path}")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except PermissionError:
        raise StreamKWSError(
            f"{option}: cannot read {path} (permission denied) as user {_user()}: make it "
            "readable by that user (a secret key: make it the owner, chown, and chmod 600)"
        ) from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise StreamKWSError(f"{option}: cannot load key from {path}: {exc}") from None
    secret = secret or None  # `secret-key = ""`: a public key file, as without the line
    if secret is not None:
        try:
            matches = zmq.curve_public(secret) == public
        except (zmq.ZMQError, ValueError) as exc:
            raise StreamKWSError(
                f"{option}: {path} does not hold a valid CURVE key ({exc})") from None
        if not matches:
            # The peer given the public half would fail every handshake, silently.
            raise StreamKWSError(f"{option}: in {path} the public key is not the secret "
                                 "key's own; make a new pair with generate_keys")
    return public, secret


def load_curve_keys(cfg: PublishConfig) -> tuple[bytes, bytes, str | os.PathLike[str]]:
    """The server's key pair and where its allowed clients' keys are (or ZeroMQ's
    allow-any), each checked as start-up would: ``run --check`` calls this too."""
    path = Path(cfg.curve_secret_key).expanduser()
    public, secret = load_key_file(path, "publish.curve_secret_key")
    if secret is None:
        raise StreamKWSError(
            f"publish.curve_secret_key: {path} holds only a public key; give the secret "
            "key file (the '.key_secret' one that generate_keys writes)"
        )
    _check_secret_key_mode(path)
    location: str | os.PathLike[str] = zmq.auth.CURVE_ALLOW_ANY
    if cfg.curve_authorized_keys:
        location = Path(cfg.curve_authorized_keys).expanduser()
        # Unreadable, it would look empty: "no keys" would hide "permission denied".
        if location.is_dir() and not os.access(location, os.R_OK | os.X_OK):
            raise StreamKWSError(
                f"publish.curve_authorized_keys: cannot read the folder {location} "
                f"(permission denied) as user {_user()}")
        # The authenticator only logs a bad folder and then lets nobody in; check it
        # here so a typo is an error at start-up instead of a silent lock-out.
        try:
            allowed = zmq.auth.load_certificates(location)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise StreamKWSError(
                f"publish.curve_authorized_keys: cannot load client keys from "
                f"{location}: {exc}"
            ) from None
        if not allowed:
            log.warning("publish.curve_authorized_keys: no '*.key' files in %s; no "
                        "subscriber will be let in", location)
    return public, secret, location


def _check_secret_key_mode(path: Path) -> None:
    """Whoever can read the server's secret key can impersonate it to every subscriber;
    whoever can write it can swap in their own.

    Open to every user: refused, as ssh refuses such a private key. Open to a group
    (which may hold subscribers given access to an ipc:// socket): a warning.
    """
    mode = stat.S_IMODE(path.stat().st_mode)
    fix = "make the daemon's user its owner (chown) and chmod 600 it"
    if mode & 0o006:
        what = "readable" if mode & 0o004 else "writable"
        raise StreamKWSError(
            f"publish.curve_secret_key: {path} is {what} by every user (mode {mode:04o}); "
            f"a secret key must be the daemon's user's alone: {fix}")
    if mode & 0o060:
        risk = ("could impersonate this publisher" if mode & 0o040 else
                "could replace the key")
        log.warning("publish.curve_secret_key: %s is %s by its group (mode %04o), whose "
                    "members %s; %s", path, "readable" if mode & 0o040 else "writable",
                    mode, risk, fix)


def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # a uid with no passwd entry (containers)
        return str(os.geteuid())


def generate_keys(folder: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Create a CURVE key pair: ``folder/name.key`` (public) and ``name.key_secret``.

    The secret file is made readable by its owner only.
    """
    d = Path(folder).expanduser()
    try:
        d.mkdir(parents=True, exist_ok=True)
        public, secret = zmq.auth.create_certificates(d, name)
        os.chmod(secret, 0o600)
    except OSError as exc:
        raise StreamKWSError(f"cannot write CURVE keys to {d}: {exc.strerror or exc}") from None
    return Path(public), Path(secret)


# -- helpers ------------------------------------------------------------------------------

def _prepare_ipc_path(endpoint: str) -> None:
    """Create the socket's folder and remove a dead daemon's leftover socket file.

    libzmq unlinks whatever sits at an ipc path before binding, which would silently steal
    the address from a running daemon (or delete a regular file); check first.
    """
    path = _ipc_file(endpoint)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StreamKWSError(
            f"cannot publish on {endpoint}: cannot create {path.parent} "
            f"({exc.strerror or exc})"
        ) from None
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StreamKWSError(f"cannot publish on {endpoint}: {exc.strerror or exc}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise StreamKWSError(
            f"cannot publish on {endpoint}: {path} exists and is not a socket"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        pass  # nobody listens: a crashed daemon's leftover
    except OSError as exc:
        raise StreamKWSError(f"cannot publish on {endpoint}: {exc.strerror or exc}") from None
    else:
        raise StreamKWSError(
            f"cannot publish on {endpoint}: address in use (another process listens there)"
        )
    finally:
        probe.close()
    try:
        path.unlink()
        log.info("removed stale socket file %s", path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise StreamKWSError(
            f"cannot publish on {endpoint}: cannot remove stale socket file "
            f"({exc.strerror or exc})"
        ) from None


def _remove_ipc_file(endpoint: str) -> None:
    """Remove our socket file once closed (libzmq leaves it behind)."""
    path = _ipc_file(endpoint)
    if path is None:
        return
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()


def _ipc_file(endpoint: str) -> Path | None:
    """The socket file of an ``ipc://`` endpoint; None for other transports, the Linux
    abstract namespace (``@name``) and a libzmq-chosen temporary path (``*``)."""
    raw = endpoint[len("ipc://"):] if endpoint.startswith("ipc://") else ""
    if not raw or raw.startswith("@") or raw == "*":
        return None
    return Path(raw)


def _is_interface(name: str) -> bool:
    try:
        return name in {n for _, n in socket.if_nameindex()}
    except OSError:
        return False


def _bind_reason(exc: zmq.ZMQError, endpoint: str) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "address in use (is another streamkws running?)"
    if exc.errno == errno.EACCES:
        hint = " (ports below 1024 need privileges)" if endpoint.startswith("tcp://") else ""
        return f"permission denied{hint}"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "no such local address"
    if exc.errno == errno.ENODEV and endpoint.startswith("tcp://"):
        # ZeroMQ takes a bind host it cannot parse as an address for an interface name.
        return (f"no local address or network interface named {tcp_host(endpoint)!r} "
                "(bind to one of this machine's own addresses, e.g. 127.0.0.1, or *)")
    return str(exc)
