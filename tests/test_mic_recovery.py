"""The microphone disappears or cannot open: the daemon retries with backoff, reports it in
status, and resumes when the device returns.

Three levels: :class:`SourceSupervisor` driven by a fake clock (backoff arithmetic, stall
detection, positions across an outage); the daemon in-process on a fake PortAudio whose
device is missing, fails to open, stops mid-stream or stalls (it "hears" the bundled demo
recording in real time, so detections show processing resumed); and the daemon as a
subprocess on a private PulseAudio server whose null sink is unloaded and loaded again.

What PortAudio does when the PulseAudio source goes (ALSA ``pulse`` plugin, PortAudio
19.6): the capture thread's poll fails within milliseconds and the stream's finished
callback runs; until the source is back every open fails in ``check_input_settings`` with
"Input/output error". So the PulseAudio tests exercise the error path; the stall path
(a driver that just stops calling back) is exercised with the fake.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamkws import SAMPLE_RATE
from streamkws.audio.base import AudioSource, Sink
from streamkws.audio.chunk import Chunk
from streamkws.audio.mic import MicSource
from streamkws.audio.ring import RingBuffer
from streamkws.audio.sources import DEMO_WAV
from streamkws.audio.supervisor import OK, RETRYING, SourceSupervisor
from streamkws.audio.wav import load_audio
from streamkws.config import AudioConfig, Config, PublishConfig
from streamkws.errors import AudioError, ConfigError
from streamkws.features import FrontEndConfig
from streamkws.frontend import FrontEnd
from streamkws.vad import VadConfig
from tests.conftest import write_wav
from tests.e2e import Subscriber

pytest_plugins = ["pulse"]  # the session-wide PulseAudio server fixture, tests/pulse.py

SUPERVISOR_LOG = "streamkws.audio.supervisor"


def wait_until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


# -- the supervisor alone, on a fake clock ---------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class ScriptedSource(AudioSource):
    """A source the test drives by hand: ``failures`` opens fail, then ``emit`` delivers."""

    name = "mic:scripted"

    def __init__(self, failures: int = 0) -> None:
        super().__init__()
        self.failures = failures
        self.opens = 0
        self.is_open = False
        self._sink: Sink | None = None
        self._pos = 0

    def start(self, sink: Sink) -> None:
        assert not self.is_open, "opened twice without a stop"
        self.opens += 1
        if self.failures:
            self.failures -= 1
            raise AudioError("no audio input device matches 'scripted'")
        self._sink, self.is_open, self._pos = sink, True, 0  # positions restart, like PortAudio
        self.error = None
        self.finished.clear()

    def emit(self, n: int = 320) -> None:
        assert self.is_open and self._sink is not None
        self._sink(Chunk(np.full(n, 0.01, np.float32), self._pos))
        self._pos += n

    def die(self) -> None:
        self.error = AudioError("audio device [0] scripted stopped unexpectedly")
        self.finished.set()

    def stop(self) -> None:
        self.is_open = False
        self.finished.set()


def supervised(source: ScriptedSource, sink: Sink | None = None, **kw: Any
               ) -> tuple[SourceSupervisor, Clock, list[Chunk]]:
    clock = Clock()
    got: list[Chunk] = []
    sup = SourceSupervisor(source, sink or got.append, clock=clock, **kw)
    return sup, clock, got


def run_until(sup: SourceSupervisor, clock: Clock, until: float, step: float = 0.01) -> None:
    while clock.t < until - 1e-9:
        clock.t = round(clock.t + step, 6)
        sup.poll()


def test_open_failures_back_off_doubling_to_the_cap_with_one_warning(caplog) -> None:
    caplog.set_level(logging.DEBUG, logger=SUPERVISOR_LOG)
    src = ScriptedSource(failures=1000)
    rescans: list[float] = []
    sup, clock, _ = supervised(src, retry_max_s=4.0, rescan=lambda: rescans.append(clock.t))
    sup.start()
    assert sup.state == RETRYING and sup.retries == 0
    assert "no audio input device matches 'scripted'" in sup.error
    attempts: list[float] = []
    while clock.t < 30.0:
        opens = src.opens
        clock.t = round(clock.t + 0.01, 6)
        sup.poll()
        if src.opens > opens:
            attempts.append(clock.t)
    delays = np.diff([0.0, *attempts])
    np.testing.assert_allclose(delays[:7], [0.5, 1, 2, 4, 4, 4, 4], atol=0.011)
    assert sup.retries == len(attempts) == len(rescans)  # a re-scan before every reopen
    assert sup.state == RETRYING
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]  # one per outage
    assert "mic:scripted" in warnings[0].getMessage()
    retry_logs = [r for r in caplog.records if "still unavailable" in r.getMessage()]
    assert len(retry_logs) == len(attempts) and all(r.levelno == logging.DEBUG
                                                    for r in retry_logs)


def test_device_missing_at_start_then_appearing_resumes_near_wall_time(caplog) -> None:
    caplog.set_level(logging.INFO, logger=SUPERVISOR_LOG)
    src = ScriptedSource(failures=3)
    sup, clock, got = supervised(src, retry_max_s=10.0)
    sup.start()
    run_until(sup, clock, 3.4)
    assert (sup.state, src.opens, sup.retries) == (RETRYING, 3, 2)  # at 0, 0.5, 1.5
    run_until(sup, clock, 3.5)
    assert src.is_open and sup.state == RETRYING  # open, but nothing heard yet
    src.emit()
    assert sup.poll() is True  # the state change the daemon publishes at once
    assert sup.state == OK and sup.error is None and sup.retries == 3
    # Audio time kept running while the device was missing: its first sample, captured
    # one 20 ms block before it arrived at 3.5 s, sits at 3.48 s.
    assert got[0].start == round(3.48 * SAMPLE_RATE)
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 1 and "is back after 3.5 s" in infos[0]


def test_a_stream_that_stops_mid_stream_is_reopened_after_the_old_positions() -> None:
    src = ScriptedSource()
    ring = RingBuffer(SAMPLE_RATE * 10)
    rescans: list[bool] = []
    sup, clock, _ = supervised(src, sink=ring.write, rescan=lambda: rescans.append(src.is_open))
    sup.start()
    assert sup.state == OK and src.is_open
    for _ in range(50):  # 1 s of audio
        clock.t = round(clock.t + 0.02, 6)
        src.emit()
        sup.poll()
    src.die()
    assert sup.poll() is True and sup.state == RETRYING and not src.is_open
    assert "stopped unexpectedly" in sup.error
    run_until(sup, clock, 1.5)
    assert src.is_open and rescans == [False]  # devices re-scanned only while closed
    for _ in range(50):
        clock.t = round(clock.t + 0.02, 6)
        src.emit()
        sup.poll()
    assert sup.state == OK
    chunks = []
    while (c := ring.read()) is not None:
        chunks.append(c)
    starts = [c.start for c in chunks]
    assert starts == sorted(starts)
    # 1 s heard, 0.5 s outage (from the last sample heard to the reopen), 1 s heard.
    assert ring.gap_samples == SAMPLE_RATE // 2
    assert chunks[-1].end == SAMPLE_RATE * 2 + SAMPLE_RATE // 2
    assert sum(len(c.samples) for c in chunks) == 2 * SAMPLE_RATE
    # The front end restarts its windows at the jump: no window straddles the outage.
    fe = FrontEnd(FrontEndConfig(), VadConfig(kind="off"))
    windows = [gw.window for c in chunks for gw in fe.process(c)]
    assert fe.gaps == 1
    assert windows and not any(w.start < 1.5 * SAMPLE_RATE and w.end > SAMPLE_RATE
                               for w in windows)


def test_a_stream_that_stalls_counts_as_gone() -> None:
    src = ScriptedSource()
    sup, clock, _ = supervised(src, stall_timeout_s=2.0)
    sup.start()
    clock.t = 0.5
    src.emit()
    run_until(sup, clock, 2.49)
    assert sup.state == OK and src.is_open
    run_until(sup, clock, 2.5)
    assert sup.state == RETRYING and not src.is_open
    assert sup.error == "audio source mic:scripted delivered no audio for 2 s"
    # stall_timeout_s = 0 turns it off: a device that never delivers is left alone.
    never = ScriptedSource()
    sup2, clock2, _ = supervised(never, stall_timeout_s=0.0)
    sup2.start()
    run_until(sup2, clock2, 60.0, step=0.5)
    assert sup2.state == OK and never.opens == 1


def test_a_slow_device_rescan_does_not_count_against_the_reopened_stream() -> None:
    """Re-scanning devices re-initialises PortAudio, seconds on some systems: the stall
    clock of the new stream starts once it is open, or it is declared stalled at once."""
    src = ScriptedSource()

    def slow_rescan() -> None:
        clock.t = round(clock.t + 4.8, 6)

    sup, clock, _ = supervised(src, stall_timeout_s=5.0, rescan=slow_rescan)
    sup.start()
    clock.t = 0.1
    src.emit()
    src.die()
    while not (src.opens == 2 and src.is_open):
        assert clock.t < 30, "never reopened"
        clock.t = round(clock.t + 0.01, 6)
        sup.poll()
    reopened = clock.t
    run_until(sup, clock, reopened + 0.5)
    src.emit()
    run_until(sup, clock, reopened + 1.0)
    assert sup.state == OK and src.is_open and src.opens == 2


def test_a_slow_device_rescan_does_not_eat_into_the_wait_before_the_next_attempt() -> None:
    src = ScriptedSource(failures=3)

    def slow_rescan() -> None:
        clock.t = round(clock.t + 4.8, 6)

    sup, clock, _ = supervised(src, rescan=slow_rescan)
    sup.start()  # fails: the next attempt in 0.5 s, then the wait doubles
    run_until(sup, clock, 0.5)  # re-scans for 4.8 s, and fails again
    assert src.opens == 2
    assert sup.next_attempt_in == pytest.approx(1.0)


def test_backoff_resets_only_after_the_stream_stayed_up() -> None:
    src = ScriptedSource()
    sup, clock, _ = supervised(src, retry_max_s=8.0)
    sup.start()

    def flap() -> float:
        """The stream dies; returns how long the supervisor waited before reopening."""
        src.die()
        sup.poll()
        t0, opens = clock.t, src.opens
        while src.opens == opens:
            clock.t = round(clock.t + 0.01, 6)
            sup.poll()
        src.emit()
        sup.poll()
        return round(clock.t - t0, 2)

    src.emit()
    assert [flap(), flap(), flap()] == [0.5, 1.0, 2.0]  # flapping: waits keep growing
    clock.t += 8.0
    src.emit()
    sup.poll()
    assert flap() == 0.5  # it ran for retry_max_s: fast retries again
    assert sup.outages == 4 and sup.retries == 4


def test_stop_while_retrying_makes_no_further_attempts() -> None:
    src = ScriptedSource(failures=1000)
    sup, clock, _ = supervised(src)
    sup.start()
    run_until(sup, clock, 2.0)
    opens = src.opens
    sup.stop()
    run_until(sup, clock, 20.0)
    assert src.opens == opens and not src.is_open


# -- a fake PortAudio under the real MicSource ----------------------------------------------


class FakeStream:
    """One capture stream: real-time blocks of the world's audio from a thread, like
    PortAudio's callback thread, ending as the device's script says."""

    def __init__(self, pa: FakePortAudio, behaviour: str, **kw: Any) -> None:
        self.pa, self.behaviour = pa, behaviour
        self.blocksize = kw["blocksize"]
        assert kw["samplerate"] == SAMPLE_RATE and kw["channels"] == 1
        self.callback, self.finished_callback = kw["callback"], kw["finished_callback"]
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-portaudio", daemon=True)

    def start(self) -> None:
        self.pa.open_streams += 1
        self._thread.start()

    def _run(self) -> None:
        pa, n = self.pa, self.blocksize
        t_open = time.monotonic()
        pos = round((t_open - pa.t0) * SAMPLE_RATE)  # what is "said" now, as a real mic
        due = t_open
        while not self._closed.is_set():
            elapsed = time.monotonic() - t_open
            if self.behaviour == "dies" and elapsed >= pa.dies_after_s:
                break  # PortAudio aborted the stream: the finished callback runs unasked
            if self.behaviour == "stalls" and elapsed >= pa.dies_after_s:
                self._closed.wait()  # no error, no callbacks: a hung driver
                break
            due += n / SAMPLE_RATE
            if self._closed.wait(max(0.0, due - time.monotonic())):
                break
            idx = (pos + np.arange(n)) % len(pa.audio)
            pos += n
            pa.blocks += 1
            overflow = bool(pa.overflow_every) and pa.blocks % pa.overflow_every == 0
            self.callback(pa.audio[idx][:, None].copy(), n, None,
                          types.SimpleNamespace(input_overflow=overflow))
            pa.delivered += n
        self.finished_callback()

    def close(self, ignore_errors: bool = True) -> None:
        self._closed.set()
        self._thread.join(5)
        self.pa.open_streams -= 1


class FakePortAudio:
    """Stands in for the ``sounddevice`` module: one input device, ``fake``, whose fate on
    each open is scripted: ``absent`` (not listed), ``unopenable`` (listed, open fails),
    ``dies``/``stalls`` (opens, then stops after ``dies_after_s``), ``ok``. Entry k of the
    script applies after k re-scans; the last entry repeats."""

    class PortAudioError(Exception):
        pass

    def __init__(self, script: list[str], audio: np.ndarray, dies_after_s: float = 3.0) -> None:
        self.script = script
        self.audio = audio
        self.dies_after_s = dies_after_s
        self.rescans = 0
        self.open_streams = 0
        self.delivered = 0
        self.blocks = 0
        self.overflow_every = 0
        """Every k-th block comes flagged as an input overflow (0: none)."""
        self.violations: list[str] = []
        self.t0 = time.monotonic()

    @property
    def behaviour(self) -> str:
        return self.script[min(self.rescans, len(self.script) - 1)]

    def query_devices(self, device: object = None, kind: str | None = None) -> Any:
        dev = {"name": "fake", "index": 0, "hostapi": 0, "max_input_channels": 1,
               "default_samplerate": float(SAMPLE_RATE)}
        if self.behaviour == "absent":
            if kind == "input":
                raise self.PortAudioError("Error querying device -1")
            return []
        return dev if kind == "input" else [dev]

    def query_hostapis(self, index: object = None) -> dict:
        return {"name": "FAKE"}

    def check_input_settings(self, **kw: Any) -> None:
        if self.behaviour == "unopenable":
            raise self.PortAudioError(
                "Error opening InputStream: Device unavailable [PaErrorCode -9985]")

    def InputStream(self, **kw: Any) -> FakeStream:  # noqa: N802 (sounddevice's name)
        return FakeStream(self, self.behaviour, **kw)

    def _terminate(self) -> None:
        # PortAudio invalidates open streams on re-initialisation: never while one is open.
        # (Recorded, not asserted: the supervisor swallows a failing re-scan.)
        if self.open_streams:
            self.violations.append("devices re-scanned while a stream was open")

    def _initialize(self) -> None:
        self.rescans += 1


@pytest.fixture(scope="module")
def demo_audio() -> np.ndarray:
    return load_audio(DEMO_WAV)


@pytest.fixture(scope="module")
def demo_truth() -> list[tuple[str, float]]:
    with open(DEMO_WAV.with_suffix(".csv"), newline="") as f:
        return [(r["keyword"], float(r["start"])) for r in csv.DictReader(f)]


def fake_portaudio(monkeypatch: pytest.MonkeyPatch, script: list[str], audio: np.ndarray,
                   **kw: Any) -> FakePortAudio:
    import streamkws.audio.mic as mic

    pa = FakePortAudio(script, audio, **kw)
    monkeypatch.setattr(mic, "_sounddevice", lambda: pa)
    return pa


def test_mic_source_that_stalls_is_closed_and_reopened(monkeypatch, demo_audio) -> None:
    pa = fake_portaudio(monkeypatch, ["stalls", "ok"], demo_audio, dies_after_s=0.3)
    from streamkws.audio.mic import refresh_devices

    ring = RingBuffer(SAMPLE_RATE * 10)
    mic = MicSource(device="fake")
    sup = SourceSupervisor(mic, ring.write, retry_max_s=1.0, stall_timeout_s=1.0,
                           rescan=refresh_devices)
    sup.start()
    try:
        wait_until(lambda: sup.poll() or sup.state == RETRYING, 5, "the stall to be noticed")
        assert "delivered no audio for 1 s" in sup.error and pa.open_streams == 0
        wait_until(lambda: sup.poll() or (sup.state == OK and pa.rescans == 1), 5,
                   "the reopened stream's audio")
        first_after = wait_until(lambda: next((c for c in iter(ring.read, None)
                                               if c.start > 1.2 * SAMPLE_RATE), None), 5,
                                 "audio after the stall")
        # 0.3 s heard, then 1 s of stall and 0.5 s of backoff: the gap is carried along.
        assert first_after.start == pytest.approx(1.8 * SAMPLE_RATE, abs=0.15 * SAMPLE_RATE)
    finally:
        sup.stop()
    assert pa.open_streams == 0 and pa.violations == []


# -- the daemon in-process on the fake ---------------------------------------------------------


class DaemonThread:
    """``Daemon.run`` on a thread (signals stay with pytest), recording what it publishes."""

    def __init__(self, tmp_path: Path, source: str, **audio: Any) -> None:
        from streamkws.daemon import Daemon

        cfg = Config(audio=AudioConfig(source=source, **audio),
                     publish=PublishConfig(endpoint=f"ipc://{tmp_path}/pub.sock",
                                           status_interval_s=0.2)).validate()
        self.daemon = Daemon(cfg, echo=None)
        self.daemon._restore_signals()  # it runs on a thread: signals stay with pytest
        self.messages: list[tuple[str, dict, float]] = []
        publish = self.daemon.publisher.publish

        def record(topic: str, payload: dict) -> bool:
            self.messages.append((topic, dict(payload), time.monotonic()))
            return publish(topic, payload)

        self.daemon.publisher.publish = record  # type: ignore[method-assign]
        self.rc: int | None = None
        self.thread = threading.Thread(target=self._run, name="daemon", daemon=True)

    def _run(self) -> None:
        self.rc = self.daemon.run()

    def start(self) -> DaemonThread:
        self.thread.start()
        return self

    def statuses(self) -> list[dict]:
        return [m for t, m, _ in self.messages if t == "status"]

    def detections(self) -> list[dict]:
        return [m for t, m, _ in self.messages if t == "detection"]

    def stop(self, timeout: float = 2.0) -> float:
        t = time.monotonic()
        self.daemon.request_stop()
        self.thread.join(timeout + 5)
        return time.monotonic() - t


def state_runs(statuses: list[dict]) -> list[str]:
    """The sequence of source states with repeats collapsed."""
    runs: list[str] = []
    for s in statuses:
        if not runs or runs[-1] != s["source_state"]:
            runs.append(s["source_state"])
    return runs


def test_daemon_retries_reports_and_resumes_hearing_keywords(
    tmp_path, monkeypatch, caplog, demo_audio, demo_truth
) -> None:
    caplog.set_level(logging.INFO, logger=SUPERVISOR_LOG)
    # Missing at start; then a stream that stops mid-stream after 3 s; two failed opens;
    # then a stream that keeps going.
    pa = fake_portaudio(monkeypatch, ["absent", "dies", "unopenable", "unopenable", "ok"],
                        demo_audio)
    d = DaemonThread(tmp_path, "mic:fake", retry_max_s=1.0)
    pa.t0 = time.monotonic()  # the demo starts "playing" as the daemon starts listening
    d.start()
    try:
        wait_until(lambda: len(state_runs(d.statuses())) >= 4, 20, "retrying/ok/retrying/ok")
        resumed = d.statuses()[-1]
        wait_until(lambda: any(x["t_start"] > 6.0 for x in d.detections()), 15,
                   "a detection after the second outage")
    finally:
        took = d.stop()
    assert took < 2.0 and d.rc == 0
    statuses = d.statuses()
    assert state_runs(statuses) == [RETRYING, OK, RETRYING, OK]
    first = statuses[0]
    assert first["source_state"] == RETRYING and first["source_retries"] == 0
    assert "no audio input devices found" in first["source_error"]
    outage2 = [s for s in statuses if s["source_state"] == RETRYING][-1]
    assert "Device unavailable" in outage2["source_error"]
    assert "source_error" not in resumed and resumed["source_retries"] == 4
    retries = [s["source_retries"] for s in statuses]
    assert retries == sorted(retries)
    # Audio time is monotonic, counts only what was heard, and every sample heard reached
    # the pipeline (the last few ms may still sit in the ring at the stop).
    final = statuses[-1]
    assert final["final"] is True and final["source_state"] == OK
    audio = [s["audio_seconds"] for s in statuses]
    assert audio == sorted(audio)
    assert final["audio_seconds"] == pytest.approx(pa.delivered / SAMPLE_RATE, abs=0.15)
    assert final["audio_seconds"] < final["uptime"] - 2.0  # two outages of > 1 s unheard
    # Detections, before and after the outages, sit where the words were said: stream
    # positions kept pace with the wall clock through both outages.
    dets = d.detections()
    assert {x["keyword"] for x in dets if x["t_start"] > 6.0}
    for x in dets:
        said = [t for kw, t in demo_truth if kw == x["keyword"]]
        assert said and min(abs(t - x["t_start"]) for t in said) < 0.6, (x, demo_truth)
    # One warning per outage and one line on each recovery, nothing per attempt.
    msgs = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == SUPERVISOR_LOG]
    assert [lvl for lvl, _ in msgs] == [logging.WARNING, logging.INFO] * 2, msgs
    assert pa.violations == [] and pa.open_streams == 0


class NotifyReceiver(threading.Thread):
    """systemd's end of ``$NOTIFY_SOCKET``, drained continuously so the daemon never waits."""

    def __init__(self, path: Path) -> None:
        super().__init__(name="notify", daemon=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.seen: list[tuple[float, str]] = []
        self.done = threading.Event()

    def run(self) -> None:
        with self.sock:
            while not self.done.is_set():
                with contextlib.suppress(TimeoutError):
                    self.seen.append((time.monotonic(), self.sock.recv(4096).decode()))

    def fields(self, key: str) -> list[tuple[float, str]]:
        return [(t, line[len(key) + 1:]) for t, m in self.seen for line in m.split("\n")
                if line.startswith(key + "=")]


def test_daemon_keeps_systemd_informed_and_stops_promptly_while_retrying(
    tmp_path, monkeypatch, demo_audio
) -> None:
    notify = NotifyReceiver(tmp_path / "notify.sock")
    notify.start()
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    fake_portaudio(monkeypatch, ["unopenable"], demo_audio)
    d = DaemonThread(tmp_path, "mic:fake", retry_max_s=5.0)
    d.start()
    try:
        wait_until(lambda: any(s.get("source_retries", 0) >= 2 for s in d.statuses()), 15,
                   "two failed reopen attempts")
        # The backoff is now 2 s and growing; stopping must not wait for it.
    finally:
        took = d.stop()
        notify.done.set()
        notify.join(5)
    assert took < 2.0 and d.rc == 0
    final = d.statuses()[-1]
    assert final["final"] is True and final["source_state"] == RETRYING
    assert "Device unavailable" in final["source_error"] and final["audio_seconds"] == 0
    # READY at once (the daemon runs, even without its device), STATUS says why nothing is
    # heard, and the watchdog is petted every 0.2 s throughout the retrying.
    assert notify.fields("READY")
    assert any("mic:fake: unavailable, retrying" in v and "Device unavailable" in v
               for _, v in notify.fields("STATUS"))
    pets = [t for t, _ in notify.fields("WATCHDOG")]
    assert len(pets) >= 5 and max(np.diff(pets)) < 0.4


def test_files_still_end_the_run_and_report_no_source_state(tmp_path, demo_audio) -> None:
    wav = write_wav(tmp_path / "short.wav", demo_audio[: 2 * SAMPLE_RATE])
    d = DaemonThread(tmp_path, f"wav:{wav}", realtime=False).start()
    d.thread.join(60)
    assert d.rc == 0 and d.daemon.supervisor is None
    final = d.statuses()[-1]
    assert final["final"] is True and "source_state" not in final


def stdin_daemon(tmp_path: Path, **audio: Any) -> tuple[DaemonThread, int]:
    """The daemon on stdin, fed through a pipe whose write end the test holds."""
    from streamkws.audio.stdin import StdinSource

    read_fd, write_fd = os.pipe()
    d = DaemonThread(tmp_path, "-", **audio)
    d.daemon.source = StdinSource(stream=os.fdopen(read_fd, "rb", buffering=0))
    return d, write_fd


def test_stdin_whose_producer_goes_quiet_is_reported_stalled_then_ok_again(
    tmp_path, monkeypatch, caplog, demo_audio
) -> None:
    """``arecord | streamkws run --source -`` with arecord hung: a pipe cannot be reopened,
    but the daemon must not look healthy while nothing comes."""

    from streamkws.audio.stall import STALLED
    caplog.set_level(logging.INFO, logger="streamkws.audio.stall")
    notify = NotifyReceiver(tmp_path / "notify.sock")
    notify.start()
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    d, write_fd = stdin_daemon(tmp_path, stall_timeout_s=1.0)
    pcm = (demo_audio[: 3 * SAMPLE_RATE] * 32767).astype("<i2").tobytes()
    d.start()
    try:
        os.write(write_fd, pcm[: len(pcm) // 2])
        stalled = wait_until(lambda: [s for s in d.statuses()
                                      if s.get("source_state") == STALLED], 10, "a stall")[0]
        # Reported within the status poll (at most 1 s) of the timeout, not at the next
        # regular status only.
        assert stalled["audio_seconds"] == 1.5
        assert stalled["source_error"].startswith("stdin has delivered no audio for ")
        os.write(write_fd, pcm[len(pcm) // 2:])
        wait_until(lambda: d.statuses()[-1]["audio_seconds"] == 3.0
                   and d.statuses()[-1]["source_state"] == OK, 10, "audio again")
    finally:
        os.close(write_fd)  # end of file: the end of the stream
        d.thread.join(10)
        notify.done.set()
        notify.join(5)
    assert d.rc == 0
    states = state_runs(d.statuses())
    assert states == [OK, STALLED, OK], states
    final = d.statuses()[-1]
    assert final["final"] is True and "source_error" not in final
    # Once each way in the log, and `systemctl status` says why nothing is heard.
    stall_log = [r for r in caplog.records if r.name == "streamkws.audio.stall"]
    assert [r.levelno for r in stall_log] == [logging.WARNING, logging.INFO], stall_log
    assert "is the program feeding it stuck" in stall_log[0].getMessage()
    assert any(v.startswith("stdin has delivered no audio for") and "producer stuck" in v
               for _, v in notify.fields("STATUS"))


def test_stdin_that_closes_after_a_stall_ends_as_a_clean_stream_not_a_stalled_one(
    tmp_path, caplog, demo_audio
) -> None:

    from streamkws.audio.stall import STALLED
    caplog.set_level(logging.INFO, logger="streamkws.audio.stall")
    d, write_fd = stdin_daemon(tmp_path, stall_timeout_s=1.0)
    d.start()
    try:
        os.write(write_fd, (demo_audio[:SAMPLE_RATE] * 32767).astype("<i2").tobytes())
        wait_until(lambda: any(s.get("source_state") == STALLED for s in d.statuses()), 10,
                   "a stall")
    finally:
        os.close(write_fd)
        d.thread.join(10)
    assert d.rc == 0
    final = d.statuses()[-1]
    assert final["final"] is True and final["source_state"] == OK
    assert "source_error" not in final and final["audio_seconds"] == 1.0
    # The producer's exit is the end of the stream, not audio coming back.
    assert [r.levelno for r in caplog.records if r.name == "streamkws.audio.stall"] == [
        logging.WARNING]


def test_a_stop_just_short_of_the_stall_timeout_is_not_reported_as_a_stall(
    tmp_path, caplog, demo_audio
) -> None:
    """Stopping waits up to 1 s for a reader blocked on the silent pipe; that wait is the
    daemon's, not the producer's."""

    caplog.set_level(logging.INFO, logger="streamkws.audio.stall")
    d, write_fd = stdin_daemon(tmp_path, stall_timeout_s=1.0)
    d.start()
    try:
        os.write(write_fd, (demo_audio[:SAMPLE_RATE] * 32767).astype("<i2").tobytes())
        wait_until(lambda: d.daemon.source.samples_delivered == SAMPLE_RATE, 10, "the audio")
        time.sleep(0.6)
        d.stop()
    finally:
        os.close(write_fd)
    assert d.rc == 0
    final = d.statuses()[-1]
    assert final["final"] is True and final["source_state"] == OK
    assert not [r for r in caplog.records if r.name == "streamkws.audio.stall"]


def test_stdin_stall_reporting_can_be_turned_off(tmp_path, demo_audio) -> None:

    d, write_fd = stdin_daemon(tmp_path, stall_timeout_s=0)
    d.start()
    try:
        time.sleep(1.5)
        os.write(write_fd, (demo_audio[:SAMPLE_RATE] * 32767).astype("<i2").tobytes())
    finally:
        os.close(write_fd)
        d.thread.join(10)
    assert d.rc == 0 and d.daemon.stall is None
    assert all("source_state" not in s for s in d.statuses())


def test_input_the_driver_lost_is_counted_in_status_and_warned_of_once_a_minute(
    tmp_path, monkeypatch, caplog, demo_audio
) -> None:
    """PortAudio flags a block whose input overflowed (the system was too busy): audio was
    lost before the daemon saw it, and an operator must be able to see that."""
    caplog.set_level(logging.WARNING, logger="streamkws.daemon")
    # The device stops after 1 s and is reopened: the count goes on across the outage.
    pa = fake_portaudio(monkeypatch, ["dies", "ok"], demo_audio, dies_after_s=1.0)
    pa.overflow_every = 10  # every 200 ms
    d = DaemonThread(tmp_path, "mic:fake", retry_max_s=1.0).start()
    try:
        wait_until(lambda: any(s.get("source_retries", 0) >= 1 and s["source_state"] == OK
                               and s["source_overflows"] >= 8 for s in d.statuses()), 20,
                   "overflows in status after a reopen")
    finally:
        d.stop()
    counts = [s["source_overflows"] for s in d.statuses()]
    assert counts == sorted(counts), counts  # never reset by the reopen
    final = d.statuses()[-1]
    assert final["final"] is True and 8 <= final["source_overflows"] <= pa.blocks // 10
    lost = [r.getMessage() for r in caplog.records if "lost input" in r.getMessage()]
    assert len(lost) == 1 and "the audio driver of mic:fake lost input" in lost[0], lost
    assert (f"input lost in the driver {final['source_overflows']} times"
            in d.daemon._status_line())


def test_a_missing_portaudio_library_still_fails_at_start(tmp_path, monkeypatch) -> None:
    import streamkws.audio.mic as mic

    def missing() -> None:
        raise AudioError("PortAudio library not found: install libportaudio2")

    monkeypatch.setattr(mic, "_sounddevice", missing)
    with pytest.raises(AudioError, match="PortAudio library not found"):
        DaemonThread(tmp_path, "mic")  # no retrying can install a library


@pytest.mark.parametrize(("key", "value"), [("retry_max_s", 0.1), ("retry_max_s", 7200.0),
                                            ("stall_timeout_s", 0.5),
                                            ("stall_timeout_s", -1.0)])
def test_bad_retry_settings_name_their_key(key: str, value: float) -> None:
    from streamkws import config

    with pytest.raises(ConfigError, match=rf"audio\.{key}"):
        config.parse({"audio": {key: value}})
    assert config.parse({"audio": {"stall_timeout_s": 0}}).audio.stall_timeout_s == 0


# -- the daemon as a subprocess on PulseAudio ---------------------------------------------


def _sink_module(server: Any) -> str | None:
    r = server.pactl("list", "short", "modules")
    for line in r.stdout.splitlines():
        fields = line.split("\t")
        if len(fields) >= 3 and fields[1] == "module-null-sink" \
                and f"sink_name={server.sink}" in fields[2]:
            return fields[0]
    return None


def remove_sink(server: Any) -> None:
    """Unload the null sink: its monitor, the source we capture, vanishes with it."""
    index = _sink_module(server)
    assert index is not None, "the null sink is already gone"
    r = server.pactl("unload-module", index)
    assert r.returncode == 0, r.stderr


def restore_sink(server: Any) -> None:
    """Load the null sink again, as the fixture had it (other tests share the server)."""
    import pulse

    if _sink_module(server) is not None:
        return
    r = server.pactl("load-module", "module-null-sink", f"sink_name={server.sink}",
                     "rate=16000", "channels=1")
    assert r.returncode == 0, r.stderr
    server.pactl("set-default-source", server.source)
    pulse._keep_monitor_busy(server)  # its recorder died with the old sink


@pytest.fixture
def removable_sink(pulse_server: Any) -> Iterator[Any]:
    try:
        yield pulse_server
    finally:
        restore_sink(pulse_server)


class DaemonProcess:
    def __init__(self, tmp_path: Path, device: str) -> None:
        cfg = tmp_path / "recovery.toml"
        cfg.write_text("[audio]\nretry_max_s = 1.0\nstall_timeout_s = 3.0\n"
                       "[publish]\nstatus_interval_s = 0.2\n")
        endpoint = f"ipc://{tmp_path}/pub.sock"
        self.sub = Subscriber(endpoint, timeout=120)
        self.sub.start()
        self.log_path = tmp_path / "daemon.log"
        with open(self.log_path, "w") as log:  # a file, not a pipe nobody drains meanwhile
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "streamkws", "run", "--config", str(cfg),
                 "--source", f"mic:{device}", "--publish", endpoint, "--quiet",
                 "--wait-subscribers", "1"],
                stdout=subprocess.DEVNULL, stderr=log)

    def statuses(self) -> list[tuple[dict, float]]:
        return [(m, t) for topic, m, t in list(self.sub.messages) if topic == "status"]

    def wait_status(self, pred: Callable[[dict], bool], timeout: float, what: str) -> dict:
        def found() -> dict | None:
            assert self.proc.poll() is None, f"daemon exited:\n{self.log()}"
            return next((m for m, _ in self.statuses() if pred(m)), None)

        try:
            return wait_until(found, timeout, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nstatuses: {self.statuses()[-3:]}\n{self.log()}"
                                 ) from None

    def terminate(self) -> dict:
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=10)
        self.sub.join(10)
        assert rc == 0, self.log()
        final = self.sub.messages[-1][1]
        assert final["type"] == "status" and final.get("final") is True
        return final

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def supervisor_lines(self) -> list[str]:
        return [ln for ln in self.log_path.read_text(errors="replace").splitlines()
                if SUPERVISOR_LOG in ln]


@pytest.mark.pulse
def test_daemon_survives_the_sink_being_removed_and_hears_keywords_after_it_returns(
    removable_sink, tmp_path, demo_audio, demo_truth
) -> None:
    server = removable_sink
    # The first 7 s of the demo: "yes", "no", "up".
    words = write_wav(tmp_path / "words.wav", demo_audio[: 7 * SAMPLE_RATE])
    d = DaemonProcess(tmp_path, server.device)
    try:
        d.wait_status(lambda s: s["source_state"] == OK and s["audio_seconds"] > 0.5, 30,
                      "audio from the sink's monitor")
        t_removed = time.monotonic()
        remove_sink(server)
        down = d.wait_status(lambda s: s["source_state"] == RETRYING, 10, "retrying")
        assert "stopped unexpectedly" in down["source_error"]
        # Keep it gone for a few failed attempts (opens fail with an I/O error meanwhile).
        d.wait_status(lambda s: s.get("source_retries", 0) >= 3, 10, "three failed attempts")
        restore_sink(server)
        absent_s = time.monotonic() - t_removed
        heard_before = max(s["audio_seconds"] for s, _ in d.statuses())
        d.wait_status(lambda s: s["source_state"] == OK and s["audio_seconds"] > heard_before
                      + 0.3, 15, "capture to resume")
        player = server.play(words)
        _, err = player.communicate(timeout=20)
        assert player.returncode == 0, err
        wait_until(lambda: len(d.sub.detections()) >= 2, 5, "the played words")
        final = d.terminate()
    finally:
        d.kill()
    assert final["source_state"] == OK and final["source_retries"] >= 3
    # Each failed open prints ~6 ALSA and ~6 PortAudio lines straight to stderr; repeated
    # attempts are silenced so an outage does not flood the journal.
    native = [ln for ln in d.log_path.read_text(errors="replace").splitlines()
              if "pa_linux_alsa.c" in ln or "pcm_pulse.c" in ln]
    assert len(native) < 6, native
    statuses = [s for s, _ in d.statuses()]
    assert state_runs(statuses) == [OK, RETRYING, OK]
    audio = [s["audio_seconds"] for s in statuses]
    assert audio == sorted(audio)
    assert final["audio_seconds"] < final["uptime"] - absent_s + 0.5  # the outage is unheard
    said = {kw for kw, t in demo_truth if t < 7.0}
    heard = {x["keyword"] for x in d.sub.detections()}
    assert len(heard & said) >= 2, (heard, said)
    # Positions were advanced over the outage: audio time stays on the wall clock's pace.
    # The first status went out as capture started, so its wall time is stream time 0.
    t0 = next(t for _, m, t in d.sub.messages if m["type"] == "status")
    for x in d.sub.detections():
        assert abs(x["wall_time"] - x["t_emit"] - t0) < 1.0, (x, t0)
    lines = d.supervisor_lines()
    assert len(lines) == 2 and "WARNING" in lines[0] and "is back" in lines[1], lines


@pytest.mark.pulse
def test_daemon_started_before_the_device_exists_captures_once_it_appears(
    removable_sink, tmp_path
) -> None:
    server = removable_sink
    remove_sink(server)
    d = DaemonProcess(tmp_path, server.device)
    try:
        first = d.wait_status(lambda s: True, 30, "the first status")
        assert first["source_state"] == RETRYING and first["audio_seconds"] == 0
        assert "Input/output error" in first["source_error"]
        d.wait_status(lambda s: s.get("source_retries", 0) >= 2, 10, "two failed attempts")
        restore_sink(server)
        d.wait_status(lambda s: s["source_state"] == OK and s["audio_seconds"] > 1.0, 15,
                      "capture once the device appeared")
        final = d.terminate()
    finally:
        d.kill()
    assert final["source_state"] == OK and "source_error" not in final
    lines = d.supervisor_lines()
    assert len(lines) == 2 and "WARNING" in lines[0] and "is back" in lines[1], lines
