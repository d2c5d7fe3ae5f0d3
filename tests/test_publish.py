"""The detection messages' wire contract on ZeroMQ, and ``streamkws listen``.

Loopback only (127.0.0.1 on random ports, ipc:// under tmp_path); every wait is bounded.
A PUB socket drops what it sends before a subscription has arrived (ZeroMQ's "slow
joiner"), so each test first publishes probes until its subscribers see one.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.auth

from streamkws.config import PublishConfig
from streamkws.errors import StreamKWSError, TemporaryError
from streamkws.listen import DEFAULT_CONNECT, add_listen_arguments, listen, run_listen
from streamkws.publish import (
    Publisher,
    _check_secret_key_mode,
    detection_message,
    generate_keys,
    status_message,
)

DETECTION_KEYS = {"v", "type", "keyword", "score", "t_start", "t_end", "t_emit", "seq",
                  "source", "model", "model_sha256", "wall_time"}
STATUS_KEYS = {"v", "type", "seq", "uptime", "audio_seconds", "inferences",
               "vad_active_ratio", "overruns", "dropped_windows", "detections"}
LOCAL = "tcp://127.0.0.1:*"
# How long a subscriber that must not receive anything is watched.
QUIET_S = 1.0


def a_detection(keyword: str = "yes") -> dict[str, Any]:
    return detection_message(keyword, 0.97, 12.31, 12.95, 13.10, "mic:0", "default", "ab" * 32)


def a_status(**over: Any) -> dict[str, Any]:
    counters = dict(uptime=5.0, audio_seconds=4.98, inferences=50, vad_active_ratio=0.25,
                    overruns=0, dropped_windows=0, detections=1)
    counters.update(over)
    return status_message(**counters)


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


@pytest.fixture
def make_pub(ctx: zmq.Context) -> Iterator[Callable[..., Publisher]]:
    made: list[Publisher] = []

    def make(endpoint: str = LOCAL, **kw: Any) -> Publisher:
        p = Publisher(PublishConfig(endpoint=endpoint, **kw).validate(), context=ctx)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def subscriber(ctx: zmq.Context, endpoint: str, *, hwm: int | None = None,
               server_key: bytes | None = None,
               keypair: tuple[bytes, bytes] | None = None) -> zmq.Socket:
    s = ctx.socket(zmq.SUB)
    s.setsockopt(zmq.LINGER, 0)
    if hwm is not None:
        s.setsockopt(zmq.RCVHWM, hwm)
    if server_key is not None:
        public, secret = keypair or zmq.curve_keypair()
        s.curve_serverkey = server_key
        s.curve_publickey = public
        s.curve_secretkey = secret
    s.setsockopt(zmq.SUBSCRIBE, b"")
    s.connect(endpoint)
    return s


def recv(sock: zmq.Socket, timeout_s: float) -> tuple[list[bytes], dict[str, Any]] | None:
    if not sock.poll(int(timeout_s * 1000)):
        return None
    frames = sock.recv_multipart()
    return frames, json.loads(frames[1].decode("utf-8"))


def drain(sock: zmq.Socket, quiet_s: float = 0.1) -> list[dict[str, Any]]:
    got = []
    while (m := recv(sock, quiet_s)) is not None:
        got.append(m[1])
    return got


def sync(pub: Publisher, *subs: zmq.Socket, deadline_s: float = 5.0) -> None:
    """Publish probes until every subscriber has one, then drain them all.

    Each probe carries its own index, so this also checks that ``seq`` counts every
    message from 0.
    """
    pending = set(subs)
    end = time.monotonic() + deadline_s
    while pending:
        assert time.monotonic() < end, "subscribers never connected"
        n = pub.sent
        assert pub.publish("probe", {"type": "probe", "n": n})
        for s in list(pending):
            if (m := recv(s, 0.05)) is not None:
                pending.discard(s)
                assert m[1]["seq"] == m[1]["n"]
    for s in subs:
        for msg in drain(s):
            assert msg["type"] == "probe" and msg["seq"] == msg["n"]


def receive_after(sock: zmq.Socket, first_seq: int, n: int,
                  timeout_s: float = 5.0) -> list[tuple[list[bytes], dict[str, Any]]]:
    """The next ``n`` messages with ``seq >= first_seq`` (late probes are skipped)."""
    got = []
    end = time.monotonic() + timeout_s
    while len(got) < n:
        m = recv(sock, max(0.0, end - time.monotonic()))
        assert m is not None, f"got {len(got)} of {n} messages"
        if m[1]["seq"] >= first_seq:
            got.append(m)
    return got


# -- message builders -------------------------------------------------------------------

def test_detection_message_has_exactly_the_contract_keys() -> None:
    before = time.time()
    msg = detection_message("yes", 0.971234567, 12.3104, 12.9496, 13.1, "mic:0", "default",
                            "f" * 64)
    assert set(msg) == DETECTION_KEYS
    assert msg["type"] == "detection" and msg["v"] == 1 and msg["keyword"] == "yes"
    assert msg["score"] == 0.9712
    assert (msg["t_start"], msg["t_end"], msg["t_emit"]) == (12.31, 12.95, 13.1)
    assert before - 0.01 <= msg["wall_time"] <= time.time() + 0.01
    json.dumps(msg, allow_nan=False)


def test_status_message_has_exactly_the_contract_keys_and_final_only_when_final() -> None:
    msg = a_status(vad_active_ratio=0.123456, uptime=5.00049)
    assert set(msg) == STATUS_KEYS
    assert msg["type"] == "status" and msg["vad_active_ratio"] == 0.1235
    assert msg["uptime"] == 5.0
    final = a_status(final=True)
    assert set(final) == STATUS_KEYS | {"final"} and final["final"] is True
    with pytest.raises(TypeError):
        status_message(uptime=1.0)  # a missing counter is a bug, not a zero


def test_non_finite_numbers_become_null_so_the_json_stays_valid() -> None:
    msg = detection_message("yes", math.nan, math.inf, 1.0, 1.0, "demo", "default", "")
    assert msg["score"] is None and msg["t_start"] is None
    json.dumps(msg, allow_nan=False)


# -- the socket ---------------------------------------------------------------------------

def test_two_frames_contract_keys_and_seq_counts_every_message(
        ctx: zmq.Context, make_pub: Callable[..., Publisher]) -> None:
    pub = make_pub()
    assert pub.endpoint.startswith("tcp://127.0.0.1:") and not pub.endpoint.endswith("*")
    sub = subscriber(ctx, pub.endpoint)
    sync(pub, sub)
    first = pub.sent
    sent = []
    for i in range(20):
        msg = a_detection() if i % 3 else a_status()
        assert pub.publish(msg["type"], msg)
        assert msg["seq"] == first + i  # set in place: the caller can print what was sent
        sent.append(msg)
    got = receive_after(sub, first, 20)
    for (frames, payload), msg in zip(got, sent, strict=True):
        assert len(frames) == 2
        assert frames[0] == msg["type"].encode()
        assert set(payload) == (DETECTION_KEYS if msg["type"] == "detection" else STATUS_KEYS)
        assert payload == msg
    assert [p["seq"] for _, p in got] == list(range(first, first + 20))
    assert pub.sent == first + 20 and pub.dropped == 0


def test_final_status_is_delivered_on_close(ctx: zmq.Context,
                                            make_pub: Callable[..., Publisher]) -> None:
    pub = make_pub()
    sub = subscriber(ctx, pub.endpoint)
    sync(pub, sub)
    first = pub.sent
    assert pub.publish("status", a_status(final=True))
    pub.close()
    (_, payload), = receive_after(sub, first, 1)
    assert payload["final"] is True


def test_every_subscriber_receives_every_message(ctx: zmq.Context,
                                                 make_pub: Callable[..., Publisher]) -> None:
    pub = make_pub()
    subs = [subscriber(ctx, pub.endpoint) for _ in range(3)]
    sync(pub, *subs)
    first = pub.sent
    for i in range(50):
        assert pub.publish("detection", a_detection(f"kw{i}"))
    for s in subs:
        got = receive_after(s, first, 50)
        assert [p["seq"] for _, p in got] == list(range(first, first + 50))
        assert [p["keyword"] for _, p in got] == [f"kw{i}" for i in range(50)]


def test_a_stalled_subscriber_neither_slows_publishing_nor_costs_others_messages(
        ctx: zmq.Context, make_pub: Callable[..., Publisher]) -> None:
    pub = make_pub(high_water_mark=100)
    stalled = subscriber(ctx, pub.endpoint, hwm=100)
    reader = subscriber(ctx, pub.endpoint, hwm=100)
    sync(pub, stalled, reader)
    first = pub.sent
    # Big enough to fill the stalled subscriber's queues and the kernel's socket buffers.
    pad = "x" * 2000
    n = 20000
    worst = 0.0
    t0 = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        assert pub.publish("status", {"type": "status", "pad": pad, "i": i})
        worst = max(worst, time.perf_counter() - t)
    total = time.perf_counter() - t0
    assert worst < 0.25 and total < 5.0, (worst, total)
    assert pub.sent == first + n and pub.dropped == 0  # PUB drops per subscriber, silently

    # The reader could not keep up with that burst (its queue is 100 too); at a daemon's
    # pace it gets every message while the other subscriber is still stalled. (The pause
    # matters: PUB learns what a subscriber consumed only every HWM/2 messages and checks
    # at most about once a millisecond, so a tiny HWM drops even for a prompt reader when
    # messages follow each other within microseconds.)
    drain(reader, 0.3)
    start = pub.sent
    seqs = []
    for i in range(30):
        assert pub.publish("detection", a_detection(f"kw{i}"))
        (_, payload), = receive_after(reader, start + i, 1)
        seqs.append(payload["seq"])
        time.sleep(0.01)
    assert seqs == list(range(start, start + 30))

    # The stalled subscriber lost most of the burst and can tell from the gaps in seq.
    got = [m["seq"] for m in drain(stalled, 0.3)]
    assert 0 < len(got) < n + 30
    assert any(b - a > 1 for a, b in zip(got, got[1:], strict=False))
    assert got == sorted(got)


def test_seq_starts_at_zero_and_is_shared_by_all_topics(
        make_pub: Callable[..., Publisher]) -> None:
    pub = make_pub()
    msgs = [a_status(), a_detection(), a_detection("no"), a_status(final=True)]
    for m in msgs:
        assert pub.publish(m["type"], m)  # nobody subscribed: PUB still takes it
    assert [m["seq"] for m in msgs] == [0, 1, 2, 3]
    assert pub.sent == 4 and pub.dropped == 0


def test_publish_never_raises_after_close_and_close_is_idempotent(
        make_pub: Callable[..., Publisher]) -> None:
    pub = make_pub()
    pub.close()
    pub.close()
    assert pub.closed
    assert pub.publish("status", a_status()) is False
    assert pub.dropped == 1 and pub.sent == 0


def test_a_publisher_with_its_own_context_closes_promptly() -> None:
    pub = Publisher(PublishConfig(endpoint=LOCAL))
    # A subscriber that never reads must not make close() wait beyond LINGER.
    c = zmq.Context()
    try:
        sub = subscriber(c, pub.endpoint, hwm=1)
        for _ in range(100):
            pub.publish("status", a_status())
        t = time.monotonic()
        pub.close()
        assert time.monotonic() - t < 2.0
        sub.close()
    finally:
        c.destroy(linger=0)


def test_a_burst_of_connections_between_two_publishes_stalls_nothing() -> None:
    """Anyone who can reach the port can open connections faster than the daemon looks at
    them (before any CURVE check). With ZeroMQ's bounded event queue the I/O thread froze:
    no delivery, no new connection, and close() hung for ever."""
    pub = Publisher(PublishConfig(endpoint=LOCAL))
    port = int(pub.endpoint.rsplit(":", 1)[1])
    c = zmq.Context()
    try:
        for i in range(1500):  # all while the publisher publishes nothing
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            if i % 100 == 0:
                time.sleep(0.01)
        sub = subscriber(c, pub.endpoint)
        sync(pub, sub)  # a subscriber still connects and hears
        closed = threading.Event()
        threading.Thread(target=lambda: (pub.close(), closed.set()), daemon=True).start()
        assert closed.wait(5), "close() hung on the I/O thread"
        sub.close()
    finally:
        c.destroy(linger=0)


# -- endpoints ----------------------------------------------------------------------------

def test_ipc_creates_its_folder_and_replaces_a_stale_socket_file(
        ctx: zmq.Context, make_pub: Callable[..., Publisher], tmp_path: Path) -> None:
    path = tmp_path / "run" / "kws.sock"
    endpoint = f"ipc://{path}"
    pub = make_pub(endpoint)
    assert path.is_socket()
    sub = subscriber(ctx, endpoint)
    sync(pub, sub)
    pub.close()

    # What a daemon killed with SIGKILL leaves behind: a socket file nobody listens on.
    path.unlink(missing_ok=True)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()
    assert path.is_socket()
    pub2 = make_pub(endpoint)
    sub2 = subscriber(ctx, endpoint)
    sync(pub2, sub2)


def test_ipc_refuses_to_take_over_a_live_socket_or_delete_a_file(
        ctx: zmq.Context, make_pub: Callable[..., Publisher], tmp_path: Path) -> None:
    path = tmp_path / "kws.sock"
    endpoint = f"ipc://{path}"
    pub = make_pub(endpoint)
    with pytest.raises(StreamKWSError, match="address in use") as err:
        make_pub(endpoint)
    assert endpoint in str(err.value)
    sub = subscriber(ctx, endpoint)
    sync(pub, sub)  # the running publisher still owns its address

    precious = tmp_path / "notes.txt"
    precious.write_text("keep me")
    with pytest.raises(StreamKWSError, match="not a socket"):
        make_pub(f"ipc://{precious}")
    assert precious.read_text() == "keep me"


def test_binding_a_busy_tcp_port_names_the_endpoint(make_pub: Callable[..., Publisher]) -> None:
    pub = make_pub()
    with pytest.raises(StreamKWSError, match="address in use") as err:
        make_pub(pub.endpoint)
    assert pub.endpoint in str(err.value)


def test_binding_a_host_that_is_not_ours_names_it(
        make_pub: Callable[..., Publisher], monkeypatch: pytest.MonkeyPatch) -> None:
    """A typo never heals (exit 2, left failed by systemd); an interface that exists but has
    no address yet (DHCP at boot) may (exit 75, retried)."""
    with pytest.raises(StreamKWSError, match="no local address or network interface named "
                       "'nosuchhost.invalid'") as err:
        make_pub("tcp://nosuchhost.invalid:5556")
    assert not isinstance(err.value, TemporaryError)
    monkeypatch.setattr("streamkws.publish._is_interface", lambda name: True)
    with pytest.raises(TemporaryError):
        make_pub("tcp://nosuchhost.invalid:5556")


def test_only_a_port_the_system_chose_is_worth_a_warning(
        make_pub: Callable[..., Publisher], caplog: pytest.LogCaptureFixture) -> None:
    """localhost comes back as 127.0.0.1: a different string, but the port the user gave."""
    port = _free_port()
    make_pub(f"tcp://localhost:{port}")
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    pub = make_pub("tcp://127.0.0.1:*")
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"publishing on {pub.endpoint}"]


# -- CURVE --------------------------------------------------------------------------------

@pytest.fixture
def keys(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    return {name: generate_keys(tmp_path / "keys", name)
            for name in ("server", "client_a", "client_b")}


def _keypair(secret_file: Path) -> tuple[bytes, bytes]:
    public, secret = zmq.auth.load_certificate(secret_file)
    assert secret is not None
    return public, secret


def _quiet(sock: zmq.Socket, pub: Publisher) -> bool:
    """Keep publishing for QUIET_S; True if ``sock`` received nothing meanwhile."""
    end = time.monotonic() + QUIET_S
    while time.monotonic() < end:
        pub.publish("status", a_status())
        if sock.poll(20):
            return False
    return True


def test_generated_secret_key_is_private(keys: dict[str, tuple[Path, Path]]) -> None:
    public, secret = keys["server"]
    assert public.name == "server.key" and secret.name == "server.key_secret"
    assert secret.stat().st_mode & 0o077 == 0


def test_curve_subscriber_needs_the_server_public_key(
        ctx: zmq.Context, make_pub: Callable[..., Publisher],
        keys: dict[str, tuple[Path, Path]]) -> None:
    server_public_file, server_secret_file = keys["server"]
    pub = make_pub(curve_secret_key=str(server_secret_file))
    server_public, _ = zmq.auth.load_certificate(server_public_file)
    good = subscriber(ctx, pub.endpoint, server_key=server_public)
    plain = subscriber(ctx, pub.endpoint)
    sync(pub, good)
    assert _quiet(plain, pub)
    wrong = subscriber(ctx, pub.endpoint, server_key=zmq.curve_keypair()[0])
    assert _quiet(wrong, pub)


def test_curve_authorized_keys_admits_only_listed_clients(
        ctx: zmq.Context, make_pub: Callable[..., Publisher],
        keys: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    allowed = tmp_path / "authorized"
    allowed.mkdir()
    shutil.copy(keys["client_a"][0], allowed)
    pub = make_pub(curve_secret_key=str(keys["server"][1]),
                   curve_authorized_keys=str(allowed))
    server_public, _ = zmq.auth.load_certificate(keys["server"][0])
    a = subscriber(ctx, pub.endpoint, server_key=server_public,
                   keypair=_keypair(keys["client_a"][1]))
    b = subscriber(ctx, pub.endpoint, server_key=server_public,
                   keypair=_keypair(keys["client_b"][1]))
    sync(pub, a)
    assert _quiet(b, pub)


def test_a_second_curve_publisher_on_a_shared_context_is_refused_and_leaves_it_closable(
        keys: dict[str, tuple[Path, Path]]) -> None:
    shared = zmq.Context()
    cfg = PublishConfig(endpoint=LOCAL, curve_secret_key=str(keys["server"][1])).validate()
    first = Publisher(cfg, context=shared)
    with pytest.raises(StreamKWSError, match="cannot start CURVE authentication") as err:
        Publisher(cfg, context=shared)
    first.close()
    termed = threading.Event()
    # The error is still held here, as a caller that logs it would: nothing of the refused
    # publisher may keep the context open.
    threading.Thread(target=lambda: (shared.term(), termed.set()), daemon=True).start()
    assert termed.wait(5) and err.value is not None


def test_curve_key_errors_name_the_key_and_path(
        make_pub: Callable[..., Publisher], keys: dict[str, tuple[Path, Path]],
        tmp_path: Path) -> None:
    missing = tmp_path / "nope.key_secret"
    with pytest.raises(StreamKWSError, match="publish.curve_secret_key") as err:
        make_pub(curve_secret_key=str(missing))
    assert str(missing) in str(err.value)
    with pytest.raises(StreamKWSError, match="only a public key"):
        make_pub(curve_secret_key=str(keys["server"][0]))
    with pytest.raises(StreamKWSError, match="publish.curve_authorized_keys"):
        make_pub(curve_secret_key=str(keys["server"][1]),
                 curve_authorized_keys=str(tmp_path / "no-such-folder"))


def test_a_secret_key_every_user_can_read_is_refused(
        make_pub: Callable[..., Publisher], keys: dict[str, tuple[Path, Path]],
        tmp_path: Path) -> None:
    """Whoever reads it can impersonate the publisher; ssh refuses such keys too."""
    open_key = tmp_path / "open.key_secret"
    shutil.copy(keys["server"][1], open_key)
    open_key.chmod(0o644)
    with pytest.raises(StreamKWSError, match=r"publish.curve_secret_key: .*open.key_secret "
                       r"is readable by every user \(mode 0644\)"):
        make_pub(curve_secret_key=str(open_key))
    open_key.chmod(0o602)
    with pytest.raises(StreamKWSError, match=r"is writable by every user \(mode 0602\)"):
        _check_secret_key_mode(open_key)
    open_key.chmod(0o601)  # an execute bit opens nothing
    _check_secret_key_mode(open_key)


def test_a_secret_key_its_group_can_read_is_used_with_a_warning(
        make_pub: Callable[..., Publisher], keys: dict[str, tuple[Path, Path]],
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    group_key = tmp_path / "group.key_secret"
    shutil.copy(keys["server"][1], group_key)
    group_key.chmod(0o640)
    make_pub(curve_secret_key=str(group_key))
    assert "readable by its group (mode 0640)" in caplog.text
    caplog.clear()
    _check_secret_key_mode(keys["server"][1])  # 0600: nothing to say
    assert "readable" not in caplog.text


def test_key_paths_that_are_folders_or_unreadable_say_so(
        make_pub: Callable[..., Publisher], keys: dict[str, tuple[Path, Path]],
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(StreamKWSError,
                       match="publish.curve_secret_key .*: is a folder; give the key file"):
        make_pub(curve_secret_key=str(tmp_path))
    clients = tmp_path / "clients"
    clients.mkdir()
    # As root (CI) every folder is readable; a folder the daemon's user may not list is
    # what os.access would report.
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != clients)
    with pytest.raises(StreamKWSError, match=r"publish.curve_authorized_keys: cannot read "
                       r"the folder .*clients \(permission denied\)"):
        make_pub(curve_secret_key=str(keys["server"][1]), curve_authorized_keys=str(clients))


def test_a_malformed_secret_key_is_named_by_run_and_by_run_check_alike(
        make_pub: Callable[..., Publisher], keys: dict[str, tuple[Path, Path]],
        tmp_path: Path) -> None:
    from streamkws.config import Config
    from streamkws.daemon import Overrides, check

    bad = tmp_path / "bad.key_secret"
    text = keys["server"][1].read_text()
    secret_line = next(ln for ln in text.splitlines() if "secret-key" in ln)
    bad.write_text(text.replace(secret_line, '    secret-key = "too short"'))
    bad.chmod(0o600)
    message = r"publish.curve_secret_key: .*bad.key_secret does not hold a valid CURVE key"
    with pytest.raises(StreamKWSError, match=message):
        make_pub(curve_secret_key=str(bad))
    cfg = Config().validate()
    cfg = cfg.replace(publish=dataclasses.replace(cfg.publish, curve_secret_key=str(bad)))
    with pytest.raises(StreamKWSError, match=message):
        check(cfg, Overrides())


def test_a_key_file_with_a_blank_secret_line_is_a_public_key_file(
        keys: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    from streamkws.publish import load_key_file

    public, _ = zmq.auth.load_certificate(keys["server"][0])
    blank = tmp_path / "blank.key"
    blank.write_text(f'curve\n    public-key = "{public.decode()}"\n    secret-key = ""\n')
    assert load_key_file(blank, "--server-key") == (public, None)


@pytest.mark.parametrize("option", ["publish.curve_secret_key", "--server-key"])
def test_an_unreadable_key_file_says_permission_denied_and_as_whom(
        option: str, keys: dict[str, tuple[Path, Path]], monkeypatch: pytest.MonkeyPatch) -> None:
    from streamkws.publish import load_key_file

    def denied(path):  # as root (CI) every file is readable
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(zmq.auth, "load_certificate", denied)
    with pytest.raises(StreamKWSError, match=rf"{re.escape(option)}: cannot read .* \(permission "
                       r"denied\) as user \w+: make it readable by that user"):
        load_key_file(keys["server"][1], option)


# -- listen ---------------------------------------------------------------------------

class Background:
    """Publishes a detection and a status every 20 ms from its own thread until stopped."""

    def __init__(self, pub: Publisher) -> None:
        self.pub = pub
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        end = time.monotonic() + 10
        while not self.stop.is_set() and time.monotonic() < end:
            self.pub.publish("detection", a_detection())
            self.pub.publish("status", a_status())
            self.stop.wait(0.02)

    def __enter__(self) -> Background:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)


def test_listen_prints_one_json_line_per_message_and_stops_after_count(
        make_pub: Callable[..., Publisher]) -> None:
    pub = make_pub()
    out = io.StringIO()
    with Background(pub):
        assert listen(pub.endpoint, [], None, None, out=out, count=6, timeout=5) == 0
    lines = out.getvalue().splitlines()
    assert len(lines) == 6
    msgs = [json.loads(line) for line in lines]
    assert {m["type"] for m in msgs} == {"detection", "status"}
    for m in msgs:
        assert set(m) == (DETECTION_KEYS if m["type"] == "detection" else STATUS_KEYS)
    seqs = [m["seq"] for m in msgs]
    assert seqs == list(range(seqs[0], seqs[0] + 6))


def test_listen_topic_filter(make_pub: Callable[..., Publisher]) -> None:
    pub = make_pub()
    out = io.StringIO()
    with Background(pub):
        assert listen(pub.endpoint, ["status"], None, None, out=out, count=3, timeout=5) == 0
    assert [json.loads(line)["type"] for line in out.getvalue().splitlines()] == ["status"] * 3


def test_listen_with_curve(make_pub: Callable[..., Publisher],
                           keys: dict[str, tuple[Path, Path]], tmp_path: Path,
                           caplog: pytest.LogCaptureFixture) -> None:
    allowed = tmp_path / "authorized"
    allowed.mkdir()
    shutil.copy(keys["client_a"][0], allowed)
    pub = make_pub(curve_secret_key=str(keys["server"][1]),
                   curve_authorized_keys=str(allowed))
    out = io.StringIO()
    with Background(pub):
        # The server's secret file holds its public key too, so either file works.
        assert listen(pub.endpoint, [], str(keys["server"][1]), str(keys["client_a"][1]),
                      out=out, count=2, timeout=5) == 0
        assert len(out.getvalue().splitlines()) == 2
        refused = io.StringIO()
        assert listen(pub.endpoint, [], str(keys["server"][0]), str(keys["client_b"][1]),
                      out=refused, timeout=QUIET_S) == 1
        assert refused.getvalue() == ""
    # ZeroMQ retries silently forever; listen says once why nothing arrives.
    assert "refused our key" in caplog.text


def test_listen_exits_cleanly_on_ctrl_c() -> None:
    main = threading.main_thread().ident
    assert main is not None and threading.get_ident() == main
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.3, signal.pthread_kill, (main, signal.SIGINT))
    t = time.monotonic()
    try:
        timer.start()
        # timeout only as a safety net: Ctrl-C must end it well before.
        assert listen("tcp://127.0.0.1:1", [], None, None, out=io.StringIO(), timeout=5) == 0
    except KeyboardInterrupt:
        pytest.fail("listen let KeyboardInterrupt escape")
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - t < 3


def test_listen_times_out_quietly_without_messages() -> None:
    out = io.StringIO()
    t = time.monotonic()
    # Nothing listens on port 1 of loopback: ZeroMQ just keeps retrying. Exit 1 tells a
    # script that no daemon was there, rather than that none spoke.
    assert listen("tcp://127.0.0.1:1", [], None, None, out=out, timeout=0.3) == 1
    assert 0.25 < time.monotonic() - t < 3 and out.getvalue() == ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_listen_says_once_that_it_has_not_reached_the_publisher(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr("streamkws.listen.NOT_CONNECTED_WARN_S", 0.2)
    out = io.StringIO()
    # Nothing listens on port 1 of loopback: ZeroMQ retries in silence.
    assert listen("tcp://127.0.0.1:1", [], None, None, out=out, timeout=1.0) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["tcp://127.0.0.1:1: not connected after 0 s; still trying "
                        "(is `streamkws run` publishing there?)",
                        "tcp://127.0.0.1:1: never connected; giving up after 1 s"]
    assert out.getvalue() == ""


def test_listen_counts_a_server_that_never_speaks_zeromq_as_not_connected(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr("streamkws.listen.NOT_CONNECTED_WARN_S", 0.2)
    with socket.socket() as server:  # accepts the TCP connection, then says nothing
        server.bind(("127.0.0.1", 0))
        server.listen()
        endpoint = f"tcp://127.0.0.1:{server.getsockname()[1]}"
        assert listen(endpoint, [], None, None, out=io.StringIO(), timeout=0.8) == 1
    assert f"{endpoint}: not connected after" in caplog.text


def test_listen_says_when_a_late_publisher_is_reached_after_all(
        ctx: zmq.Context, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr("streamkws.listen.NOT_CONNECTED_WARN_S", 0.2)
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    pub = ctx.socket(zmq.PUB)
    stop = threading.Event()

    def start_late() -> None:
        stop.wait(0.6)
        pub.bind(endpoint)
        while not stop.wait(0.02):
            pub.send_multipart([b"status", json.dumps(a_status()).encode()])

    t = threading.Thread(target=start_late, daemon=True)
    t.start()
    out = io.StringIO()
    try:
        assert listen(endpoint, [], None, None, out=out, count=1, timeout=5) == 0
    finally:
        stop.set()
        t.join(5)
        pub.close(linger=0)
    messages = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(messages) == 2 and "not connected after" in messages[0]
    assert messages[1].startswith(f"{endpoint}: connected after")
    assert json.loads(out.getvalue())["type"] == "status"


def test_listen_says_when_it_connects_after_saying_why_it_could_not(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """After 'the publisher refused our key' the user waits for news; a success is news."""
    import streamkws.listen as L

    def from_list(events: list[int], flags: int = 0) -> dict:  # a monitor socket, faked
        if not events:
            raise zmq.Again()
        return {"event": events.pop(0)}

    monkeypatch.setattr(L, "recv_monitor_message", from_list)
    link = L._Link("tcp://x", time.monotonic())
    L._handle_monitor([zmq.EVENT_HANDSHAKE_FAILED_AUTH], link)
    L._handle_monitor([zmq.EVENT_HANDSHAKE_SUCCEEDED], link)
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(said) == 2 and "refused our key" in said[0]
    assert said[1].startswith("tcp://x: connected after")


def test_listen_is_silent_about_a_publisher_it_reaches_at_once(
        make_pub: Callable[..., Publisher], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr("streamkws.listen.NOT_CONNECTED_WARN_S", 0.5)
    pub = make_pub()
    with Background(pub):
        # Past the warning's time, so a connection that did not count would show.
        assert listen(pub.endpoint, ["nosuchtopic"], None, None, out=io.StringIO(),
                      timeout=1.0) == 0
    assert [r.getMessage()[:20] for r in caplog.records
            if r.name == "streamkws.listen" and r.levelname == "WARNING"] == [
        "--topic 'nosuchtopic"]  # what it is told about the topic, nothing of connecting


def test_listen_key_errors_are_user_errors(tmp_path: Path,
                                           keys: dict[str, tuple[Path, Path]]) -> None:
    with pytest.raises(StreamKWSError, match="--server-key"):
        listen(DEFAULT_CONNECT, [], str(tmp_path / "missing.key"), None, timeout=0.1)
    with pytest.raises(StreamKWSError, match="--client-key"):
        listen(DEFAULT_CONNECT, [], str(keys["server"][0]), str(tmp_path / "missing"),
               timeout=0.1)
    with pytest.raises(StreamKWSError, match="only a public key"):
        listen(DEFAULT_CONNECT, [], str(keys["server"][0]), str(keys["client_a"][0]),
               timeout=0.1)
    with pytest.raises(StreamKWSError, match="--server-key"):
        listen(DEFAULT_CONNECT, [], None, str(keys["client_a"][1]), timeout=0.1)
    with pytest.raises(StreamKWSError, match="expected tcp://HOST:PORT or ipc://PATH"):
        listen("bogus://x", [], None, None, timeout=0.1)


@pytest.mark.parametrize(("endpoint", "message"), [
    ("127.0.0.1:5556", "expected tcp://HOST:PORT or ipc://PATH"),
    ("inproc://kws", "expected tcp://HOST:PORT or ipc://PATH"),
    ("ipc://", "ipc:// needs the socket's path"),
    ("tcp://*:5556", "a wildcard is for binding"),
    ("tcp://127.0.0.1:0", "a wildcard is for binding"),
    ("ipc://*", "a wildcard is for binding"),
])
def test_listen_refuses_what_it_could_never_connect_to(endpoint: str, message: str) -> None:
    with pytest.raises(StreamKWSError, match=message):
        listen(endpoint, [], None, None, timeout=0.1)


def test_listen_warns_of_a_topic_the_daemon_never_publishes(
        caplog: pytest.LogCaptureFixture) -> None:
    listen("tcp://127.0.0.1:1", ["detections", "stat"], None, None, out=io.StringIO(),
           timeout=0.1)
    warned = [r.getMessage() for r in caplog.records if r.name == "streamkws.listen"]
    assert warned[0] == ("--topic 'detections' matches neither topic the daemon publishes "
                         "(detection, status); nothing will arrive")
    assert not any("'stat'" in w for w in warned)  # a prefix of status: fine


def wait_for_text(out: io.StringIO, text: str, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while text not in out.getvalue() and time.monotonic() < end:
        time.sleep(0.02)


def listening(pub: Publisher, timeout: float, topics: list[str] | None = None
              ) -> tuple[threading.Thread, io.StringIO, list[int]]:
    """``listen`` in a thread, once it has printed a message from ``pub``: the thread, what
    it printed, and (once it returns) its exit status."""
    out = io.StringIO()
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(
        listen(pub.endpoint, topics or [], None, None, out=out, timeout=timeout)))
    with Background(pub):
        thread.start()
        wait_for_text(out, "\n")
    return thread, out, result


def test_listen_says_when_the_publisher_goes_away_and_a_timeout_then_exits_1(
        make_pub: Callable[..., Publisher], caplog: pytest.LogCaptureFixture) -> None:
    """A subscriber left waiting must learn that the daemon stopped, not just hear nothing."""
    pub = make_pub()
    thread, out, result = listening(pub, timeout=5)
    pub.close()  # gone without a final status: a crash, a kill
    thread.join(30)
    assert result == [1]
    warned = [r.getMessage() for r in caplog.records if r.name == "streamkws.listen"]
    assert any("the publisher went away (stopped or restarting?); reconnecting" in w
               for w in warned), warned
    assert warned[-1].endswith("has not come back; giving up")


FROZEN_PUBLISHER = r"""
import sys, time
from streamkws.config import PublishConfig
from streamkws.publish import Publisher, status_message
pub = Publisher(PublishConfig(endpoint="tcp://127.0.0.1:0").validate())
print(pub.endpoint, flush=True)
while True:
    pub.publish("status", status_message(uptime=1, audio_seconds=1, inferences=1,
                                         vad_active_ratio=0, overruns=0,
                                         dropped_windows=0, detections=0))
    time.sleep(0.2)
"""


def test_listen_tells_a_frozen_publisher_from_a_quiet_one(
        caplog: pytest.LogCaptureFixture) -> None:
    """A daemon frozen whole (SIGSTOP here; a hung host, or one that lost power or its
    network) closes no connection: only heartbeats show it is gone."""
    proc = subprocess.Popen([sys.executable, "-c", FROZEN_PUBLISHER],
                            stdout=subprocess.PIPE, text=True)
    try:
        endpoint = proc.stdout.readline().strip()
        out, result = io.StringIO(), []
        thread = threading.Thread(target=lambda: result.append(
            listen(endpoint, [], None, None, out=out, timeout=8)))
        thread.start()
        wait_for_text(out, "\n")
        os.kill(proc.pid, signal.SIGSTOP)
        thread.join(30)
        assert result == [1]
        warned = [r.getMessage() for r in caplog.records if r.name == "streamkws.listen"]
        assert warned and warned[-1].endswith("has not come back; giving up"), warned
    finally:
        proc.kill()
        proc.wait()


def test_listen_whose_reader_falls_behind_keeps_its_connection_and_every_message(
        make_pub: Callable[..., Publisher]) -> None:
    """`listen | slow-consumer`: with its queue full, ZeroMQ would stop reading the
    connection, starve the heartbeat, call a live publisher gone, and abort in libzmq on
    the reconnect."""
    pub = make_pub()
    proc = subprocess.Popen([sys.executable, "-m", "streamkws", "-v", "listen", "--connect",
                             pub.endpoint], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:  # until it subscribed
            pub.publish("status", a_status())
            if pub.subscriptions:
                break
            time.sleep(0.05)
        for _ in range(3000):  # far more than the pipe and ZeroMQ's default queue hold
            pub.publish("detection", a_detection())
        stalled_until = time.monotonic() + 6  # nobody reads listen's stdout meanwhile
        while time.monotonic() < stalled_until:
            pub.publish("status", a_status())
            time.sleep(0.3)
        assert proc.poll() is None, proc.stderr.read().decode()
        os.set_blocking(proc.stdout.fileno(), False)
        lines, quiet_since = 0, time.monotonic()
        while time.monotonic() - quiet_since < 1.0:
            try:
                data = os.read(proc.stdout.fileno(), 1 << 20)
            except BlockingIOError:
                time.sleep(0.05)
                continue
            if not data:  # it ended
                break
            lines += data.count(b"\n")
            quiet_since = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err.decode()
        assert b"went away" not in err and b"Assertion" not in err, err.decode()
        assert lines >= 3000 + 20
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("topics", [[], ["detection"]])
def test_listen_takes_a_publisher_that_ended_with_its_final_status_as_a_clean_end(
        make_pub: Callable[..., Publisher], caplog: pytest.LogCaptureFixture,
        topics: list[str]) -> None:
    """`run --fast --wait-subscribers 1` with `listen --timeout 3` capturing it: the replay's
    end is no daemon lost, and the script must see exit 0, also when it takes detections
    only. The daemon publishes its final status and closes at once, as here: the
    disconnect and the status often arrive together."""
    pub = make_pub()
    thread, out, result = listening(pub, timeout=3, topics=topics)
    pub.publish("status", {**a_status(), "final": True})
    pub.close()
    thread.join(30)
    assert result == [0]
    assert not [r for r in caplog.records
                if r.name == "streamkws.listen" and r.levelname == "WARNING"]
    assert ('"final":true' in out.getvalue()) == (not topics)  # statuses printed if asked


def test_listen_says_at_info_when_a_publisher_stopped_cleanly_and_when_a_new_run_is_back(
        make_pub: Callable[..., Publisher], caplog: pytest.LogCaptureFixture) -> None:
    """`systemctl restart`: no warning, but a subscriber still learns that the run it heard
    ended and that a new one (its seq from 0) took over."""
    caplog.set_level("INFO", logger="streamkws.listen")
    pub = make_pub()
    endpoint = pub.endpoint
    thread, out, result = listening(pub, timeout=4)
    pub.publish("status", {**a_status(), "final": True})
    pub.close()
    time.sleep(0.5)
    again = make_pub(endpoint)
    with Background(again):
        end = time.monotonic() + 10
        while "is back" not in caplog.text and time.monotonic() < end:
            time.sleep(0.05)
    thread.join(30)
    said = [(r.levelname, r.getMessage()) for r in caplog.records
            if r.name == "streamkws.listen"]
    assert ("INFO", f"{endpoint}: the publisher stopped (its final status came)") in said
    assert any(level == "INFO" and "a publisher is back after" in m
               and "seq starts at 0 again" in m for level, m in said), said
    assert not [m for level, m in said if level == "WARNING"]
    assert result == [0]


def test_listen_exits_1_when_the_publishers_run_ended_in_failure(
        make_pub: Callable[..., Publisher], caplog: pytest.LogCaptureFixture) -> None:
    pub = make_pub()
    thread, _, result = listening(pub, timeout=3)
    pub.publish("status", {**a_status(), "final": True,
                           "error": "audio source stopped: x.wav: file ended early"})
    pub.close()
    thread.join(30)
    assert result == [1]
    assert caplog.records[-1].getMessage().endswith(
        "the publisher's run failed: audio source stopped: x.wav: file ended early")


def test_listen_names_an_ipc_path_that_is_not_a_socket(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    plain = tmp_path / "kws.sock"
    plain.write_text("")
    assert listen(f"ipc://{plain}", [], None, None, out=io.StringIO(), timeout=0.2) == 1
    assert f"{plain} is not a socket" in caplog.text


@pytest.mark.parametrize("endpoint", ["tcp://no-port", "tcp://127.0.0.1:99999",
                                      "tcp://127.0.0.1:-1", "tcp://127.0.0.1:"])
def test_a_tcp_port_out_of_range_is_refused_not_wrapped_round(endpoint: str) -> None:
    with pytest.raises(StreamKWSError, match="--connect .*: the port must be 1-65535, the "
                       "publisher's$"):
        listen(endpoint, [], None, None, timeout=0.1)
    with pytest.raises(StreamKWSError, match="publish.endpoint.*port must be 0-65535"):
        PublishConfig(endpoint=endpoint).validate()


def test_listen_arguments(make_pub: Callable[..., Publisher]) -> None:
    parser = argparse.ArgumentParser()
    add_listen_arguments(parser)
    args = parser.parse_args([])
    assert (args.connect, args.topic, args.server_key, args.client_key, args.count,
            args.timeout) == (DEFAULT_CONNECT, None, None, None, None, None)
    args = parser.parse_args(["--topic", "status", "--topic", "detection", "--count", "2"])
    assert args.topic == ["status", "detection"] and args.count == 2
    for bad in (["--count", "0"], ["--timeout", "-1"], ["--timeout", "inf"],
                ["--timeout", "nan"], ["--count", "x"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)

    pub = make_pub()
    args = parser.parse_args(["--connect", pub.endpoint, "--count", "1", "--timeout", "5"])
    with Background(pub):
        assert run_listen(args) == 0


def test_a_replay_can_wait_for_its_subscribers(ctx: zmq.Context,
                                               make_pub: Callable[..., Publisher]) -> None:
    pub = make_pub()
    assert not pub.wait_for_subscribers(1, timeout=0.2)
    a = subscriber(ctx, pub.endpoint, hwm=1000)
    b = subscriber(ctx, pub.endpoint, hwm=1000)
    assert pub.wait_for_subscribers(2, timeout=5.0)
    # Once both subscriptions have arrived, the very first message reaches both.
    assert pub.publish("status", a_status())
    for s in (a, b):
        (_, payload), = receive_after(s, 0, 1)
        assert payload["seq"] == 0


def test_waiting_for_subscribers_counts_subscribers_not_their_topics(
        ctx: zmq.Context, make_pub: Callable[..., Publisher]) -> None:
    pub = make_pub()
    two_topics = subscriber(ctx, pub.endpoint)
    two_topics.setsockopt(zmq.SUBSCRIBE, b"status")
    assert not pub.wait_for_subscribers(2, timeout=1.0)
    assert pub.subscriptions >= 2 and pub.subscribers == 1
    other = subscriber(ctx, pub.endpoint)
    assert pub.wait_for_subscribers(2, timeout=5.0)
    two_topics.close(linger=0)
    deadline = time.monotonic() + 5
    while pub.subscribers != 1:  # a subscriber that leaves is no longer counted
        assert time.monotonic() < deadline
        pub.publish("status", a_status())
        time.sleep(0.02)
    assert recv(other, 1.0) is not None


def test_a_subscriber_who_left_does_not_let_a_bare_connection_pass_for_one(
        ctx: zmq.Context, make_pub: Callable[..., Publisher]) -> None:
    """`run --wait-subscribers 1`: a port scan or a health check's bare TCP connect, after
    the one real subscriber has gone, must not start the replay into the void."""
    import socket

    pub = make_pub()
    sub = subscriber(ctx, pub.endpoint)
    sub.setsockopt(zmq.SUBSCRIBE, b"status")
    assert pub.wait_for_subscribers(1, timeout=5.0)
    sub.close(linger=0)
    deadline = time.monotonic() + 5
    while pub.subscribers or pub.subscriptions:  # its subscriptions are taken back too
        assert time.monotonic() < deadline, (pub.subscribers, pub.subscriptions)
        pub.publish("status", a_status())
        time.sleep(0.02)
    host, port = pub.endpoint[len("tcp://"):].rsplit(":", 1)
    with socket.create_connection((host, int(port))):
        assert not pub.wait_for_subscribers(1, timeout=1.0)
        assert pub.subscribers == 1 and pub.subscriptions == 0
        real = subscriber(ctx, pub.endpoint)
        assert pub.wait_for_subscribers(1, timeout=5.0)
        assert pub.publish("status", a_status())
        assert recv(real, 2.0) is not None


def test_poll_says_when_a_subscriber_to_status_has_not_heard_one_yet(
        ctx: zmq.Context, make_pub: Callable[..., Publisher]) -> None:
    pub = make_pub()
    assert not pub.poll()

    def heard() -> bool:
        deadline = time.monotonic() + 5
        while not pub.poll():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    first = subscriber(ctx, pub.endpoint)  # every topic, status among them
    assert heard()
    pub.publish("detection", {"type": "detection"})
    assert pub.poll()  # a detection greets no one
    pub.publish("status", a_status())
    assert not pub.poll()
    assert recv(first, 2.0) is not None
    only_detections = ctx.socket(zmq.SUB)
    only_detections.setsockopt(zmq.LINGER, 0)
    only_detections.setsockopt(zmq.SUBSCRIBE, b"detection")
    only_detections.connect(pub.endpoint)
    time.sleep(0.3)
    assert not pub.poll()  # it wants no status
    partial = ctx.socket(zmq.SUB)  # a prefix of "status" takes statuses too
    partial.setsockopt(zmq.LINGER, 0)
    partial.setsockopt(zmq.SUBSCRIBE, b"sta")
    partial.connect(pub.endpoint)
    assert heard()
    only_detections.close()
    partial.close()


def test_waiting_for_subscribers_ends_when_told_to_stop(
        make_pub: Callable[..., Publisher]) -> None:
    pub = make_pub()
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    t = time.monotonic()
    assert not pub.wait_for_subscribers(1, timeout=30.0, stop=stop)
    assert time.monotonic() - t < 2.0


def test_a_closed_publisher_removes_its_socket_file_and_only_its_own(
        make_pub: Callable[..., Publisher], tmp_path: Path) -> None:
    path = tmp_path / "kws.sock"
    pub = make_pub(f"ipc://{path}")
    assert path.exists()
    with pytest.raises(StreamKWSError, match="address in use"):
        make_pub(f"ipc://{path}")
    assert path.exists()  # the refused one left the running one's file alone
    pub.close()
    assert not path.exists()


def test_a_name_that_is_not_utf8_does_not_stop_detections_going_out(
        ctx: zmq.Context, make_pub: Callable[..., Publisher]) -> None:
    pub = make_pub()
    sub = subscriber(ctx, pub.endpoint)
    sync(pub, sub)
    # What Python makes of a Latin-1 file name on the command line: a lone surrogate.
    msg = detection_message(keyword="yes", score=0.9, t_start=1.0, t_end=1.5, t_emit=1.6,
                            source="wav:d\udce9mo.wav", model="default", model_sha256="0")
    assert pub.publish("detection", msg)
    _, got = recv(sub, 2.0)
    assert got["keyword"] == "yes" and got["source"] == "wav:d?mo.wav"


def test_a_key_file_whose_halves_do_not_match_is_refused(
        make_pub: Callable[..., Publisher], keys: dict[str, tuple[Path, Path]],
        tmp_path: Path) -> None:
    server_public, _ = zmq.auth.load_certificate(keys["server"][0])
    _, other_secret = zmq.auth.load_certificate(keys["client_a"][1])
    mixed = tmp_path / "mixed.key_secret"
    mixed.write_text(f'curve\n    public-key = "{server_public.decode()}"\n'
                     f'    secret-key = "{other_secret.decode()}"\n')
    with pytest.raises(StreamKWSError, match="not the secret key's own"):
        make_pub(curve_secret_key=str(mixed))
    # listen's own key pair too: else the handshake fails and --server-key gets the blame.
    proc = subprocess.run(
        [sys.executable, "-m", "streamkws", "listen", "--connect", "tcp://127.0.0.1:1",
         "--server-key", str(keys["server"][0]), "--client-key", str(mixed), "--timeout", "1"],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith(f"streamkws listen: error: --client-key: in {mixed} "
                                          "the public key is not the secret key's own")


@pytest.mark.parametrize(("body", "printed"), [
    (b'{"type": "detection", "keyword": "yes"}', '{"type":"detection","keyword":"yes"}'),
    (b'{"name": "caf\\u00e9"}', '{"name":"caf\u00e9"}'),
    (b'{"name": "\\ud800"}', '{"name":"\\ud800"}'),   # a lone surrogate, kept escaped
    (b'{"score": NaN}', None),
    (b'{"score": 1e400}', None),
    (b"[1, 2]", None),
])
def test_listen_prints_only_valid_json_objects(body: bytes, printed: str | None) -> None:
    from streamkws.listen import _format

    formatted = _format([b"detection", body])
    line = None if formatted is None else formatted[0]
    assert line == printed
    if line is not None:
        line.encode("utf-8")  # writable to any UTF-8 terminal or pipe
        assert isinstance(json.loads(line), dict)
