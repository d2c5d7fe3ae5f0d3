"""Fault tolerance: the daemon under load, overload, subscriber churn and signals."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from streamkws.audio.sources import DEMO_WAV
from streamkws.audio.wav import load_audio
from streamkws.config import Config, dumps
from streamkws.daemon import Daemon, Overrides, apply_overrides
from streamkws.tools.streams import write_wav
from tests.e2e import Subscriber, free_port


def config_file(path: Path, **sections) -> Path:
    cfg = Config().validate()
    for name, values in sections.items():
        cfg = cfg.replace(**{name: dataclasses.replace(getattr(cfg, name), **values)})
    path.write_text(dumps(cfg))
    return path


@pytest.fixture(scope="module")
def long_speech(tmp_path_factory) -> Path:
    """Ten minutes of real speech (the demo recording, repeated)."""
    x = load_audio(DEMO_WAV)
    path = tmp_path_factory.mktemp("faults") / "long.wav"
    write_wav(path, np.tile(x, int(600 / (len(x) / 16000)) + 1))
    return path


def daemon(*args: str, endpoint: str, subscribers: int = 1) -> subprocess.Popen:
    """The daemon, holding its audio until ``subscribers`` have subscribed: every test
    subscriber must be counted, or the first to arrive starts the audio before the others
    hear ``seq`` 0."""
    return subprocess.Popen(
        [sys.executable, "-m", "streamkws", "run", "--publish", endpoint, "--quiet",
         "--wait-subscribers", str(subscribers), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def statuses(sub: Subscriber) -> list[dict]:
    return [m for t, m, _ in sub.messages if t == "status"]


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_under_full_load_a_broken_reload_is_rejected_and_sigterm_stops_within_two_seconds(
        long_speech, tmp_path):
    """The model runs on every window (VAD off) of a fast replay: the processing thread
    never idles, yet signals are handled at once."""
    cfg = config_file(tmp_path / "load.toml", vad={"kind": "off"},
                      publish={"status_interval_s": 0.5})
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    sub = Subscriber(endpoint, timeout=120)
    sub.start()
    proc = daemon("--config", str(cfg), "--source", f"wav:{long_speech}", "--fast",
                  endpoint=endpoint)
    wait_until(lambda: len(statuses(sub)) >= 3, 60, "the replay to be under way")
    cfg.write_text("[vad]\nkind = 'sometimes'\n")
    proc.send_signal(signal.SIGHUP)
    before = statuses(sub)[-1]["audio_seconds"]
    wait_until(lambda: statuses(sub)[-1]["audio_seconds"] > before + 5, 30,
               "processing to go on after the rejected reload")
    assert proc.poll() is None
    t = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)
    assert time.monotonic() - t < 2.0
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert "reload rejected" in err and "vad.kind" in err
    sub.join(5)
    last = statuses(sub)[-1]
    assert last["final"] is True
    assert 5 < last["audio_seconds"] < 600, "stopped mid-stream, not at the end of the file"
    assert last["inferences"] > 0 and last["vad_active_ratio"] == 1.0


class Churn(threading.Thread):
    """Subscribers that connect, take a message or two, and leave, one after another."""

    def __init__(self, endpoint: str, n: int) -> None:
        super().__init__(daemon=True)
        self.endpoint, self.n, self.done, self.received = endpoint, n, 0, 0
        self.ctx = zmq.Context()

    def run(self) -> None:
        for i in range(self.n):
            s = self.ctx.socket(zmq.SUB)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SUBSCRIBE, b"")
            s.connect(self.endpoint)
            if s.poll(150 + 50 * (i % 3)):
                s.recv_multipart()
                self.received += 1
            s.close()
            self.done += 1
        self.ctx.term()


def test_churning_subscribers_and_a_stalled_one_cost_the_pipeline_nothing(tmp_path):
    """Realtime replay (a live source: falling behind would drop windows) while 100
    subscribers come and go and one never reads: nothing is dropped, and the reading
    subscriber gets every message."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    sub = Subscriber(endpoint, timeout=90)
    sub.start()
    ctx = zmq.Context()
    stalled = ctx.socket(zmq.SUB)
    stalled.setsockopt(zmq.RCVHWM, 1)
    stalled.setsockopt(zmq.RCVBUF, 1024)
    stalled.setsockopt(zmq.SUBSCRIBE, b"")
    stalled.setsockopt(zmq.LINGER, 0)
    stalled.connect(endpoint)
    cfg = config_file(tmp_path / "churn.toml", publish={"status_interval_s": 0.2,
                                                        "high_water_mark": 100})
    proc = daemon("--config", str(cfg), "--source", "demo", "--realtime", endpoint=endpoint,
                  subscribers=2)
    wait_until(lambda: sub.messages, 30, "the first status")
    churn = Churn(endpoint, 100)
    churn.start()
    churn.join(60)
    out, err = proc.communicate(timeout=60)
    sub.join(10)
    stalled.close()
    ctx.term()
    assert proc.returncode == 0, err
    assert churn.done == 100 and churn.received > 50
    last = statuses(sub)[-1]
    assert last["final"] is True
    assert last["dropped_windows"] == 0 and last["overruns"] == 0
    seqs = [m["seq"] for _, m, _ in sub.messages]
    assert seqs == list(range(len(seqs)))
    assert last["detections"] == len(sub.detections()) >= 8


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_model_slower_than_the_hop_drops_whole_windows_loses_no_audio_and_stays_flat(
        tmp_path):
    """Each inference takes 250 ms, 2.5 windows' worth: the daemon skips windows (counted),
    the ring never overflows, every sample is accounted for, memory does not grow."""
    x = load_audio(DEMO_WAV)[: 12 * 16000]
    wav = tmp_path / "twelve.wav"
    write_wav(wav, x)
    cfg = Config().validate()
    cfg = cfg.replace(vad=dataclasses.replace(cfg.vad, kind="off"))
    cfg = apply_overrides(cfg, Overrides(source=f"wav:{wav}", realtime=True,
                                         publish=f"ipc://{tmp_path}/pub.sock"))
    d = Daemon(cfg, echo=None)
    real_predict = d.bundle.predict

    def slow_predict(features):
        time.sleep(0.25)
        return real_predict(features)

    d.bundle.predict = slow_predict
    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample_memory() -> None:
        while not stop.wait(0.25):
            samples.append((time.monotonic(), rss_mb()))

    sampler = threading.Thread(target=sample_memory, daemon=True)
    t0 = time.monotonic()
    sampler.start()
    try:
        assert d.run() == 0
    finally:
        stop.set()
        sampler.join()
    c = d.counters()
    assert c["dropped_windows"] > 0.5 * (c["inferences"] + c["dropped_windows"])
    assert c["inferences"] > 0
    assert c["overruns"] == 0 and d.ring.overrun_samples == 0
    assert c["audio_seconds"] == pytest.approx(12.0, abs=0.01)
    # Paced by the source, not by the slow model: it kept up with real time (deciding
    # every window would take 30 s). The file's end adds its last second's ten windows,
    # decided in full so that a word there is heard (Pipeline.finish): 2.5 s more.
    assert time.monotonic() - t0 < 12 + 3 + 10 * 0.25
    steady = [mb for t, mb in samples if t - t0 > 3]
    assert max(steady) - min(steady) < 3.0, f"RSS grew: {steady}"


def live_stdin_daemon(tmp_path: Path, **audio) -> tuple[Daemon, int]:
    """A daemon on ``audio.stdin_live`` stdin, fed through a pipe the test writes, whose
    model takes 250 ms per window (2.5 hops)."""
    from streamkws.audio.stdin import StdinSource

    cfg = Config().validate()
    cfg = cfg.replace(vad=dataclasses.replace(cfg.vad, kind="off"),
                      audio=dataclasses.replace(cfg.audio, source="-", stdin_live=True,
                                                **audio)).validate()
    cfg = apply_overrides(cfg, Overrides(publish=f"ipc://{tmp_path}/pub.sock"))
    d = Daemon(cfg, echo=None)
    d._restore_signals()  # it runs on a thread: signals stay with pytest
    read_fd, write_fd = os.pipe()
    d.source = StdinSource(os.fdopen(read_fd, "rb", buffering=0), live=True)
    real_predict = d.bundle.predict

    def slow_predict(features):
        time.sleep(0.25)
        return real_predict(features)

    d.bundle.predict = slow_predict
    return d, write_fd


def test_live_stdin_skips_windows_behind_a_slow_model_instead_of_stalling_its_producer(
        tmp_path):
    """``arecord | streamkws run --source -`` on a board too slow for the model: arecord is
    never made to wait (it would drop audio uncounted); whole windows are skipped instead."""
    pcm = (load_audio(DEMO_WAV)[: 10 * 16000] * 32767).astype("<i2").tobytes()
    d, write_fd = live_stdin_daemon(tmp_path, ring_seconds=1.0)
    rc: list[int] = []
    runner = threading.Thread(target=lambda: rc.append(d.run()), daemon=True)
    runner.start()
    waits: list[float] = []
    t0 = time.monotonic()
    piece = 3200  # 100 ms, written when a microphone would have captured it
    try:
        for i in range(0, len(pcm), piece):
            time.sleep(max(0.0, t0 + i / 32000 - time.monotonic()))
            t = time.monotonic()
            os.write(write_fd, pcm[i:i + piece])
            waits.append(time.monotonic() - t)
        late = time.monotonic() - t0 - len(pcm) / 32000
    finally:
        os.close(write_fd)
        runner.join(30)
    assert rc == [0]
    c = d.counters()
    # Replayed, every window would be decided (25 s of model time) and the 1-s ring plus
    # the pipe would have held the producer back within the first seconds.
    assert late < 1.0, f"the producer fell {late:.2f} s behind, waiting {sum(waits):.2f} s"
    # 2.5 hops per decision leaves ~40 % of the live windows decided; the last second's
    # ten are all decided at the end of the stream (Pipeline.finish).
    assert c["dropped_windows"] > (c["inferences"] + c["dropped_windows"]) / 3
    assert c["overruns"] == 0 and c["audio_seconds"] == pytest.approx(10.0, abs=0.01)


def test_live_stdin_faster_than_real_time_overflows_the_ring_counted_not_waited_for(
        tmp_path, caplog):
    pcm = (load_audio(DEMO_WAV)[: 8 * 16000] * 32767).astype("<i2").tobytes()
    d, write_fd = live_stdin_daemon(tmp_path, ring_seconds=1.0)
    rc: list[int] = []
    runner = threading.Thread(target=lambda: rc.append(d.run()), daemon=True)
    runner.start()
    t = time.monotonic()
    try:
        with os.fdopen(write_fd, "wb") as w:  # all at once, as `cat file.raw |` would
            w.write(pcm)
        took = time.monotonic() - t
    finally:
        runner.join(30)
    assert rc == [0]
    c = d.counters()
    assert took < 2.0, f"the producer waited {took:.2f} s"
    assert c["overruns"] > 0 and d.ring.overrun_samples > 0
    # What was not overrun was heard; nothing is counted twice.
    heard = c["audio_seconds"] * 16000
    assert heard + d.ring.overrun_samples == pytest.approx(8 * 16000, abs=1)
    # Said in the log too, once (not once per overrun), with the likely cause.
    lost = [r.getMessage() for r in caplog.records if "of audio lost so far" in r.getMessage()]
    assert len(lost) == 1 and "stdin fed faster than real time" in lost[0], lost
    # And the closing line gives the total, which the warning could not.
    assert f"{d.ring.overrun_samples / 16000:.2f} s audio lost to overruns" in d._status_line()


def test_the_cpu_and_latency_extras_in_status_are_the_daemons_own(tmp_path):
    endpoint = f"ipc://{tmp_path}/pub.sock"
    sub = Subscriber(endpoint, timeout=60)
    sub.start()
    proc = daemon("--source", "demo", "--fast", endpoint=endpoint)
    out, err = proc.communicate(timeout=60)
    sub.join(10)
    assert proc.returncode == 0, err
    first, last = statuses(sub)[0], statuses(sub)[-1]
    assert 0 < first["cpu_seconds"] < last["cpu_seconds"]
    assert 0 < last["inference_ms_p50"] <= last["inference_ms_p99"] < 1000
    assert os.cpu_count()
