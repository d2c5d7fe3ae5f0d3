"""A private PulseAudio server for tests that need a real capture device.

Usage from a test module (``tests/`` is on ``sys.path`` under pytest's default import
mode)::

    pytest_plugins = ["pulse"]          # registers the session fixture once

    @pytest.mark.pulse
    def test_something(pulse_server):
        proc = pulse_server.play(wav_path)   # audio goes into the null sink "virt"
        MicSource(device=pulse_server.device) ...  # captures virt.monitor

``from pulse import pulse_server`` works too; the server is shared either way.

The server has one null sink, ``virt`` (16 kHz mono, so played 16 kHz audio reaches the
monitor untouched), whose monitor ``virt.monitor`` is the default source. PortAudio reaches
it through the ALSA ``pulse`` PCM (libasound2-plugins), which follows ``PULSE_SERVER``.

Invocation, as root in a container with no D-Bus, no session and no sound card::

    pulseaudio --daemonize=no --exit-idle-time=-1 -n --realtime=no --high-priority=no \
        --load="module-native-protocol-unix auth-anonymous=1" \
        --load="module-null-sink sink_name=virt rate=16000 channels=1"

PulseAudio only *warns* when run as root outside ``--system`` ("This program is not
intended to be run as root"); it needs no extra flag (``--system`` is for a machine-wide
daemon under /var/run and is neither needed nor wanted here). ``-n`` skips default.pa, so
no ALSA/udev/D-Bus modules are tried. ``-D`` works as well; we stay in the foreground
instead so the server is our child: we know its pid, get its log, and ``PR_SET_PDEATHSIG``
kills it if the test process dies without running teardown. ``auth-anonymous=1`` spares
clients the cookie, and ``HOME``/``XDG_RUNTIME_DIR`` point into a fresh temporary directory
so nothing is read from or written to the real home directory.

When ``pulseaudio`` (or ``pactl``/``paplay``/``parec``, or PortAudio) is missing the tests
are skipped, except under ``CI`` where that fails them: CI must exercise the real capture
path.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SINK = "virt"
SOURCE = f"{SINK}.monitor"
PORTAUDIO_DEVICE = "pulse"
_START_TIMEOUT_S = 15.0
_ENV_KEYS = ("XDG_RUNTIME_DIR", "PULSE_SERVER", "PULSE_COOKIE")


def unavailable(reason: str) -> None:
    """Skip the test, or fail it when running in CI."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (required when CI is set)", pytrace=False)
    pytest.skip(reason)


def _die_with_parent() -> None:
    # Linux-only: the server gets SIGTERM if the test process dies. Best effort elsewhere.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@dataclass
class PulseServer:
    """A running private PulseAudio daemon; see the module docstring."""

    root: Path
    proc: subprocess.Popen
    sink: str = SINK
    source: str = SOURCE
    device: str = PORTAUDIO_DEVICE
    """The PortAudio/ALSA device name that captures from :attr:`source`."""
    _children: list[subprocess.Popen] = field(default_factory=list)

    @property
    def log_path(self) -> Path:
        return self.root / "pulseaudio.log"

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def play(self, wav_path: str | Path) -> subprocess.Popen:
        """Start playing a file into the null sink; returns the ``paplay`` process."""
        proc = subprocess.Popen(
            ["paplay", f"--device={self.sink}", str(wav_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._children.append(proc)
        return proc

    def pactl(self, *args: str, timeout: float = 5.0) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["pactl", *args], capture_output=True, text=True, timeout=timeout, check=False
        )

    def stop(self) -> None:
        for p in self._children:
            if p.poll() is None:
                p.kill()
            p.wait()
            if p.stderr is not None:
                p.stderr.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def start_pulse_server() -> PulseServer:
    """Start the daemon and point this process (and its children) at it.

    Sets ``XDG_RUNTIME_DIR``, ``PULSE_SERVER`` and ``PULSE_COOKIE`` in ``os.environ`` and
    re-scans PortAudio's devices. Calls :func:`unavailable` if something needed is missing.
    """
    for tool in ("pulseaudio", "pactl", "paplay", "parec"):
        if shutil.which(tool) is None:
            unavailable(f"{tool} is not installed (apt-get install pulseaudio pulseaudio-utils)")
    try:
        from streamkws.audio.mic import refresh_devices
        from streamkws.errors import AudioError

        refresh_devices()  # also proves PortAudio loads
    except AudioError as exc:
        unavailable(str(exc))

    root = Path(tempfile.mkdtemp(prefix="streamkws-pulse-"))
    runtime = root / "runtime"
    runtime.mkdir(mode=0o700)
    home = root / "home"
    home.mkdir()
    socket = runtime / "pulse" / "native"
    env = dict(os.environ, HOME=str(home), XDG_RUNTIME_DIR=str(runtime))
    for key in ("PULSE_SERVER", "PULSE_COOKIE", "DBUS_SESSION_BUS_ADDRESS"):
        env.pop(key, None)
    cmd = [
        "pulseaudio",
        "--daemonize=no",
        "--exit-idle-time=-1",
        "-n",
        "--realtime=no",
        "--high-priority=no",
        "--log-target=stderr",
        "--load=module-native-protocol-unix auth-anonymous=1",
        f"--load=module-null-sink sink_name={SINK} rate=16000 channels=1",
    ]
    with open(root / "pulseaudio.log", "wb") as log:
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
    server = PulseServer(root=root, proc=proc)

    os.environ["XDG_RUNTIME_DIR"] = str(runtime)
    os.environ["PULSE_SERVER"] = f"unix:{socket}"
    os.environ["PULSE_COOKIE"] = str(home / "cookie")  # clients never touch the real ~

    deadline = time.monotonic() + _START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            server.stop()
            pytest.fail(f"pulseaudio exited with {proc.returncode}:\n{server.log_tail()}")
        if socket.exists() and server.pactl("info", timeout=2.0).returncode == 0:
            break
        if time.monotonic() > deadline:
            server.stop()
            pytest.fail(
                f"pulseaudio did not answer within {_START_TIMEOUT_S:.0f} s:\n{server.log_tail()}"
            )
        time.sleep(0.05)

    r = server.pactl("set-default-source", SOURCE)
    if r.returncode != 0:
        server.stop()
        pytest.fail(f"pactl set-default-source {SOURCE} failed: {r.stderr.strip()}")
    _keep_monitor_busy(server)
    refresh_devices()  # PortAudio lists the ALSA "pulse" PCM only once a server answers
    return server


def _keep_monitor_busy(server: PulseServer) -> None:
    # An idle null sink renders in 2 s blocks, so the first capture stream would wait up to
    # 2 s for its first sample. A recorder asking for 20 ms latency keeps it rendering in
    # small blocks; we wait for its first data so the next stream starts at once.
    proc = subprocess.Popen(
        ["parec", "--raw", f"--device={server.source}", "--latency-msec=20"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    server._children.append(proc)  # stopped with the server
    got_data = threading.Event()

    def drain() -> None:
        assert proc.stdout is not None
        with proc.stdout:  # closed here, at EOF, once stop() has killed the recorder
            while proc.stdout.read(4096):
                got_data.set()

    threading.Thread(target=drain, name="pulse-keepalive", daemon=True).start()
    if not got_data.wait(_START_TIMEOUT_S):
        server.stop()
        pytest.fail(f"no audio from {server.source} within {_START_TIMEOUT_S:.0f} s")


_server: PulseServer | None = None
_users = 0
_saved_env: dict[str, str | None] = {}


@pytest.fixture(scope="session")
def pulse_server() -> Iterator[PulseServer]:
    """A private PulseAudio server for the whole session (shared by every importer)."""
    global _server, _users
    if _server is None:
        _saved_env.update({k: os.environ.get(k) for k in _ENV_KEYS})
        try:
            _server = start_pulse_server()
        except BaseException:  # skip/fail included: leave the environment as we found it
            _restore_env()
            raise
    _users += 1
    try:
        yield _server
    finally:
        _users -= 1
        if _users == 0:
            server, _server = _server, None
            server.stop()
            _restore_env()
            from streamkws.audio.mic import refresh_devices

            refresh_devices()  # forget the vanished "pulse" device


def _restore_env() -> None:
    for key, value in _saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _saved_env.clear()
