"""The systemd notify protocol against real AF_UNIX datagram sockets the tests create."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamkws.sdnotify import Notifier, WatchdogPacer, monotonic_usec, watchdog_interval


class Listener:
    """A stand-in for systemd's notify socket: receives and parses datagrams."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value

    def receive(self) -> dict[str, str]:
        data = self.sock.recv(4096)
        fields = {}
        for line in data.decode().split("\n"):
            key, sep, value = line.partition("=")
            assert sep, f"not KEY=VALUE: {line!r}"
            fields[key] = value
        return fields

    def empty(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(2.0)
        return False


def _listener(address: str | bytes, env_value: str) -> Iterator[Listener]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(2.0)
    try:
        yield Listener(sock, env_value)
    finally:
        sock.close()


@pytest.fixture
def path_listener(tmp_path: Path) -> Iterator[Listener]:
    path = tmp_path / "notify.sock"
    yield from _listener(str(path), str(path))


@pytest.fixture
def abstract_listener() -> Iterator[Listener]:
    name = f"streamkws-test-{uuid.uuid4().hex}"
    yield from _listener(b"\0" + name.encode(), "@" + name)


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest) -> Listener:
    return request.getfixturevalue(f"{request.param}_listener")


def notifier_for(listener: Listener, monkeypatch: pytest.MonkeyPatch) -> Notifier:
    monkeypatch.setenv("NOTIFY_SOCKET", listener.env_value)
    return Notifier.from_env()


def test_ready_with_status(listener: Listener, monkeypatch: pytest.MonkeyPatch) -> None:
    with notifier_for(listener, monkeypatch) as n:
        assert n.enabled
        assert n.ready(status="listening on mic")
        assert listener.receive() == {"READY": "1", "STATUS": "listening on mic"}
        assert n.ready()
        assert listener.receive() == {"READY": "1"}


def test_watchdog_stopping_status(listener: Listener, monkeypatch: pytest.MonkeyPatch) -> None:
    with notifier_for(listener, monkeypatch) as n:
        assert n.watchdog()
        assert listener.receive() == {"WATCHDOG": "1"}
        assert n.stopping()
        assert listener.receive() == {"STOPPING": "1"}
        assert n.status("two\nlines")  # a newline must not smuggle in a second field
        assert listener.receive() == {"STATUS": "two lines"}


def test_reloading_carries_monotonic_usec(
    listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    with notifier_for(listener, monkeypatch) as n:
        before = monotonic_usec()
        assert n.reloading()
        after = monotonic_usec()
        fields = listener.receive()
        assert fields.keys() == {"RELOADING", "MONOTONIC_USEC"}
        assert fields["RELOADING"] == "1"
        assert before <= int(fields["MONOTONIC_USEC"]) <= after
        # CLOCK_MONOTONIC is what Python's monotonic clock reads on Linux.
        assert abs(int(fields["MONOTONIC_USEC"]) / 1e6 - time.monotonic()) < 5


def test_generic_notify_uppercases_keys(path_listener: Listener,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    with notifier_for(path_listener, monkeypatch) as n:
        assert n.notify(status="x", EXTEND_TIMEOUT_USEC=5_000_000)
        assert path_listener.receive() == {"STATUS": "x", "EXTEND_TIMEOUT_USEC": "5000000"}
        assert not n.notify()  # nothing to say: nothing sent
        assert path_listener.empty()


def test_unset_socket_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    n = Notifier.from_env()
    assert not n.enabled
    assert not n.ready("x") and not n.watchdog() and not n.stopping() and not n.reloading()
    assert n._sock is None  # not even a socket was created
    assert n.watchdog_interval() is None  # no socket to ping: no watchdog either


def test_missing_socket_path_does_not_raise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    n = Notifier.from_env()
    with caplog.at_level(logging.DEBUG, logger="streamkws.sdnotify"):
        assert not n.ready("x")
        assert not n.watchdog()
        assert not n.stopping()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, "a failure is logged once at warning level"
    assert "gone.sock" in warnings[0].getMessage()
    n.close()


def test_relative_socket_path_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/notify.sock")
    assert not Notifier.from_env().enabled


def test_unset_environment(path_listener: Listener, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", path_listener.env_value)
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    n = Notifier.from_env(unset_environment=True)
    assert "NOTIFY_SOCKET" not in os.environ and "WATCHDOG_USEC" not in os.environ
    assert n.watchdog_interval() == 2.0
    assert n.watchdog()
    assert path_listener.receive() == {"WATCHDOG": "1"}
    n.close()


def test_watchdog_interval_is_half_the_timeout() -> None:
    pid = os.getpid()
    assert watchdog_interval({"WATCHDOG_USEC": "10000000"}) == 5.0
    assert watchdog_interval({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(pid)}) == 5.0
    assert watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "42"}, pid=42) == 1.5
    # Meant for another process (e.g. we are a child that inherited the environment).
    assert watchdog_interval({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(pid + 1)}) is None
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "x"}) is None


def test_a_reload_pets_the_watchdog_when_it_is_on(
    path_listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", path_listener.env_value)
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    with Notifier.from_env() as n:
        assert n.reloading()
        assert path_listener.receive().keys() == {"RELOADING", "MONOTONIC_USEC", "WATCHDOG"}


def test_notifier_watchdog_interval_from_env(
    path_listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", path_listener.env_value)
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert Notifier.from_env().watchdog_interval() == 5.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert Notifier.from_env().watchdog_interval() is None


def test_watchdog_pacer() -> None:
    pacer = WatchdogPacer(5.0)
    assert pacer.due(100.0)  # the first ping goes out at once
    assert not pacer.due(100.0)
    assert not pacer.due(104.9)
    assert pacer.due(105.0)
    assert not pacer.due(106.0)
    assert pacer.due(200.0)  # after a stall: one ping, then counted from it
    assert not pacer.due(204.0)
    assert pacer.due(205.5)
    assert pacer.due() or True  # the default clock works (time.monotonic)


def test_watchdog_pacer_disabled_and_invalid() -> None:
    pacer = WatchdogPacer(None)
    assert not any(pacer.due(t) for t in (0.0, 1e9))
    with pytest.raises(ValueError):
        WatchdogPacer(0)


def test_pacer_drives_notifier(path_listener: Listener, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon's loop: ask the pacer every iteration, ping only when due."""
    monkeypatch.setenv("NOTIFY_SOCKET", path_listener.env_value)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    with Notifier.from_env() as n:
        pacer = WatchdogPacer(n.watchdog_interval())
        sent = sum(n.watchdog() for t in range(0, 2500, 10) if pacer.due(t / 1000))
        assert sent == 3  # at 0, 1 and 2 s over 2.5 s of 10 ms iterations
        for _ in range(sent):
            assert path_listener.receive() == {"WATCHDOG": "1"}
        assert path_listener.empty()
