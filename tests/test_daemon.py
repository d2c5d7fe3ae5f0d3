"""The daemon's lifecycle: start-up errors, signals, reload, and the systemd protocol."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.e2e import Subscriber, free_port


class NotifySocket:
    """The socket systemd would listen on, so the test sees what the daemon reports."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.seen: list[tuple[float, str]] = []

    def wait_for(self, field: str, timeout: float = 20.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, msg in self.seen:
                if field in msg.split("\n"):
                    return t
            with contextlib.suppress(TimeoutError):
                self.seen.append((time.monotonic(), self.sock.recv(4096).decode()))
        raise AssertionError(f"no {field} in {[m for _, m in self.seen]}")

    def messages(self) -> list[str]:
        self.sock.settimeout(0.05)
        try:
            while True:
                self.seen.append((time.monotonic(), self.sock.recv(4096).decode()))
        except TimeoutError:
            pass
        return [m for _, m in self.seen]


def wait_until_handled(proc: subprocess.Popen, sig: int, timeout: float = 30.0) -> None:
    """Until ``proc`` ignores or catches ``sig`` (``/proc/PID/status``), so a test can send
    it at the earliest moment the real program could survive it, however slow start-up is."""
    bit = 1 << (sig - 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the process ended before it handled the signal"
        fields = dict(line.split(":\t", 1)
                      for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines())
        if (int(fields["SigIgn"], 16) | int(fields["SigCgt"], 16)) & bit:
            return
        time.sleep(0.005)
    raise AssertionError(f"signal {sig} not handled within {timeout} s")


def start(tmp_path: Path, *args: str, watchdog_usec: int = 1_000_000, stdout=subprocess.PIPE):
    notify = NotifySocket(tmp_path / "notify.sock")
    endpoint = f"ipc://{tmp_path}/pub.sock"
    sub = Subscriber(endpoint, timeout=60)
    sub.start()
    env = {**os.environ, "NOTIFY_SOCKET": str(notify.path),
           "WATCHDOG_USEC": str(watchdog_usec), "PYTHONUNBUFFERED": "1"}
    # SIGHUP as systemd leaves it, even when the tests run under nohup (which ignores it,
    # and the child would inherit that, making the start-up SIGHUP test test nothing).
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamkws", "run", "--publish", endpoint,
         *(["--quiet"] if stdout == subprocess.PIPE else []), "--wait-subscribers", "1", *args],
        stdout=stdout, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    return proc, sub, notify


def test_sigterm_stops_within_two_seconds_with_a_final_status(tmp_path):
    proc, sub, notify = start(tmp_path, "--source", "demo", "--realtime")
    notify.wait_for("READY=1")
    notify.wait_for("WATCHDOG=1", timeout=5)
    time.sleep(1.0)
    t = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)
    assert time.monotonic() - t < 2.0
    assert proc.returncode == 0
    sub.join(5)
    last = sub.messages[-1][1]
    assert last["type"] == "status" and last["final"] is True
    assert 0.5 < last["audio_seconds"] < 10
    assert any("STOPPING=1" in m for m in notify.messages())


def test_a_stopped_daemon_leaves_without_interpreter_teardown(tmp_path):
    """Tearing down an interpreter with torch loaded takes ~0.5 s of CPU here (seconds on a
    small or busy board); once the final status is out, the process must just end."""
    times = []
    for trial in range(3):  # the median, so one scheduling hiccup does not decide
        run_dir = tmp_path / str(trial)
        run_dir.mkdir()
        proc, sub, notify = start(run_dir, "--source", "demo", "--realtime")
        notify.wait_for("READY=1")
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        t = time.monotonic()
        proc.wait(timeout=10)
        times.append(time.monotonic() - t)
        assert proc.returncode == 0
        sub.join(5)
        assert sub.messages[-1][1].get("final") is True
    assert sorted(times)[1] < 0.3, times


def test_watchdog_is_petted_at_half_the_timeout(tmp_path):
    proc, sub, notify = start(tmp_path, "--source", "demo", "--realtime",
                              watchdog_usec=400_000)
    notify.wait_for("READY=1")
    time.sleep(2.0)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)
    notify.messages()
    pets = [t for t, m in notify.seen if "WATCHDOG=1" in m.split("\n")]
    assert len(pets) >= 6  # every 0.2 s over 2 s
    gaps = [b - a for a, b in zip(pets, pets[1:], strict=False)]
    assert max(gaps) < 0.4


def test_sighup_reloads_and_a_broken_config_keeps_the_old_one_running(tmp_path):
    cfg = tmp_path / "streamkws.toml"
    cfg.write_text("[detect]\nthreshold = 0.8\n")
    proc, sub, notify = start(tmp_path, "--config", str(cfg), "--source", "demo",
                              "--realtime")
    notify.wait_for("READY=1")
    time.sleep(1.0)
    cfg.write_text('[detect]\nthreshold = 0.85\n[model]\nname = "default-float"\n')
    proc.send_signal(signal.SIGHUP)
    notify.wait_for("RELOADING=1")
    time.sleep(1.0)
    cfg.write_text("[detect]\nthreshold = 7\n")
    proc.send_signal(signal.SIGHUP)
    time.sleep(1.5)
    assert proc.poll() is None, "a broken config must not stop the daemon"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert "with model default, threshold 0.8 (the config's)" in err
    assert "reloaded configuration; model default-float" in err
    assert "threshold 0.85 (the config's)" in err
    assert "reload rejected" in err and "detect.threshold" in err
    sub.join(5)
    statuses = [m for t, m, _ in sub.messages if t == "status"]
    # Capture never stopped: audio time only grows, and the last status is final.
    audio = [s["audio_seconds"] for s in statuses]
    assert audio == sorted(audio) and statuses[-1]["final"] is True
    assert statuses[-1]["audio_seconds"] > 3.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--source", "wav:/nonexistent.wav"], "error: /nonexistent.wav: cannot open"),
        (["--source", "bogus"], "error: unknown audio source 'bogus'"),
        (["--model", "/nonexistent.skw"], "error: /nonexistent.skw: no such model bundle"),
        (["--publish", "udp://x"], "error: --publish: must start with tcp:// or ipc://"),
    ],
)
def test_start_up_errors_are_one_line_without_traceback(args, message):
    r = subprocess.run([sys.executable, "-m", "streamkws", "run", "--quiet", "--fast",
                        "--publish", f"tcp://127.0.0.1:{free_port()}", *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_an_endpoint_that_may_be_bound_later_exits_75_for_systemd_to_retry():
    """At boot the address to publish on may not exist yet (DHCP) or a port still be held;
    exit 2 is left failed by the unit (RestartPreventExitStatus=2), 75 is retried."""
    import socket as sockets

    cases = []
    with sockets.socket() as foreign:  # a documentation address; some hosts bind any
        try:
            foreign.bind(("192.0.2.1", 0))
        except OSError:
            cases.append(("tcp://192.0.2.1:5556", "no such local address"))
    with sockets.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for endpoint, reason in ((f"tcp://127.0.0.1:{port}", "address in use"), *cases):
            r = subprocess.run([sys.executable, "-m", "streamkws", "run", "--quiet", "--fast",
                                "--source", "demo", "--publish", endpoint],
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 75, r.stderr
            assert r.stderr.strip().splitlines() == [
                f"streamkws run: error: cannot publish on {endpoint}: {reason}"
                + (" (is another streamkws running?)" if reason == "address in use" else "")]


@pytest.mark.parametrize(("toml", "message"), [
    ('[audio]\nsource = "bogus"\n', "config key 'audio.source': unknown audio source 'bogus'"),
    ('[audio]\nsource = "wav:/nonexistent.wav"\n',
     "config key 'audio.source': /nonexistent.wav: cannot"),
    ('[model]\nname = "/nonexistent.skw"\n',
     "config key 'model.name': /nonexistent.skw: no such model bundle"),
])
def test_a_config_value_that_names_nothing_usable_is_named_by_its_key(tmp_path, toml,
                                                                       message):
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml)
    r = subprocess.run([sys.executable, "-m", "streamkws", "run", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr


def test_a_bad_config_key_is_named(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[vad]\naggressiveness = 9\n")
    r = subprocess.run([sys.executable, "-m", "streamkws", "run", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "vad.aggressiveness" in r.stderr
    assert "Traceback" not in r.stderr


def test_demo_prints_detections_as_json_lines(tmp_path):
    r = subprocess.run([sys.executable, "-m", "streamkws", "run", "--source", "demo", "--fast",
                        "--publish", f"tcp://127.0.0.1:{free_port()}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    import json

    found = [json.loads(line)["keyword"] for line in r.stdout.splitlines()]
    # demo.csv lists the ten keywords; a newcomer should see nearly all of them.
    assert len(set(found)) >= 8, found


def test_a_reader_that_leaves_stops_the_daemon_cleanly(tmp_path):
    """`streamkws run | head -1`: the daemon stops as a pipeline's producer does, with no
    traceback, exit 0, and its final status still published."""
    endpoint = f"ipc://{tmp_path}/pub.sock"
    sub = Subscriber(endpoint, timeout=60)
    sub.start()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamkws", "run", "--source", "demo", "--realtime",
         "--publish", endpoint, "--wait-subscribers", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()
    assert json.loads(first)["type"] == "detection"
    proc.stdout.close()  # the reader leaves; the next detection meets a broken pipe
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "WARNING" not in err and "ERROR" not in err, err
    assert "standard output was closed; stopping" in err
    sub.join(10)
    detections = [m for _, m, _ in sub.messages if m["type"] == "detection"]
    last = sub.messages[-1][1]
    assert last["type"] == "status" and last["final"] is True and "error" not in last
    # It stopped at the second detection, not at the end of the 25-s recording.
    assert len(detections) == 2 and last["audio_seconds"] < 20


def test_a_reader_that_stops_reading_stalls_neither_detection_nor_the_stop(tmp_path):
    """`streamkws run | consumer` with the consumer suspended: once its pipe is full, a
    blocking write there would stop detection, statuses and the watchdog alike."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    for size in (65536, 1):  # fill the pipe to the last byte
        with contextlib.suppress(BlockingIOError):
            while True:
                os.write(w, b"x" * size)
    os.set_blocking(w, True)
    proc, sub, notify = start(tmp_path, "--source", "demo", "--realtime", stdout=w)
    os.close(w)
    try:
        notify.wait_for("READY=1")
        deadline = time.monotonic() + 20
        while len(sub.detections()) < 3 and time.monotonic() < deadline:
            notify.messages()  # as systemd reads them: a full queue would slow the sender
        assert len(sub.detections()) >= 3, "detection stalled behind a full stdout"
        t = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
        assert time.monotonic() - t < 2.0 and proc.returncode == 0, err
        sub.join(5)
        assert sub.messages[-1][1].get("final") is True
        assert "detection lines not written to standard output: " in err
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(r)


def test_a_stdout_that_cannot_be_written_fails_the_run(tmp_path):
    """A full disk under `streamkws run > detections.jsonl`: an error and exit 1, not a
    clean end with the lines silently lost."""
    endpoint = f"ipc://{tmp_path}/pub.sock"
    sub = Subscriber(endpoint, timeout=60)
    sub.start()
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "streamkws", "run", "--source", "demo",
                            "--fast", "--publish", endpoint, "--wait-subscribers", "1"],
                           stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "standard output failed: No space left on device; stopping" in r.stderr
    assert "Traceback" not in r.stderr
    sub.join(10)
    last = sub.messages[-1][1]
    assert last["final"] is True and last["error"].startswith("standard output failed")

# -- reloads that lose nothing --------------------------------------------------------------

def _replay(cfgs, reload_every: int, step: int = 1600):
    """The demo recording through the daemon's pipeline in ``step``-sample chunks, replaced
    by a new pipeline (cycling through ``cfgs``) every ``reload_every`` chunks, as SIGHUP
    does: returns every window's (start, end, top class or None) and the detections."""
    import soundfile as sf

    from streamkws.audio.chunk import Chunk
    from streamkws.audio.sources import DEMO_WAV
    from streamkws.bundle import load_bundle
    from streamkws.daemon import Pipeline

    audio, _ = sf.read(DEMO_WAV, dtype="float32")
    bundle = load_bundle("default")
    p = Pipeline(cfgs[0], bundle)
    trace = p.trace = []
    dets, reloads = [], 0
    for k, s in enumerate(range(0, len(audio), step)):
        if reload_every and k and k % reload_every == 0:
            reloads += 1
            q = Pipeline(cfgs[reloads % len(cfgs)], bundle)
            q.trace = trace
            dets += q.take_over(p)
            p = q
        dets += p.process(Chunk(audio[s:s + step], s))
    dets += p.flush()
    assert p.samples == len(audio)
    windows = [(s, e, None if pr is None else int(pr.argmax())) for s, e, pr in trace]
    return windows, [(d.keyword, d.start, d.end, d.emit) for d in dets], p


@pytest.mark.parametrize("every", [3, 7, 13])
def test_a_reload_to_the_same_settings_changes_no_window_and_no_detection(every):
    from streamkws.config import Config

    windows, dets, _ = _replay([Config()], 0)
    assert len(dets) >= 8  # nearly all of the demo's ten keywords: something to compare
    again, dets_again, p = _replay([Config()], every)
    assert again == windows and dets_again == dets
    assert p.frontend.windows == len(windows)  # counters carried across reloads


def _utterance(det) -> int | None:
    """Which line of the demo's labels a detection ``(keyword, start, end, emit)`` is."""
    import csv

    from streamkws.audio.sources import DEMO_WAV

    with open(DEMO_WAV.with_suffix(".csv")) as f:
        rows = list(csv.DictReader(f))
    keyword, start, end = det[0], det[1] / 16000, det[2] / 16000
    for i, row in enumerate(rows):
        if row["keyword"] == keyword and start < float(row["end"]) and end > float(row["start"]):
            return i
    return None


@pytest.mark.parametrize("change", ["vad", "hop"])
def test_a_reload_to_other_settings_loses_no_window_and_decides_none_twice(change):
    """A new front end rebuilds its state from the latest audio: windows go on at most one
    hop apart, a word spoken across a reload is still heard once."""
    import dataclasses

    from streamkws.config import Config

    base = Config()
    other = (base.replace(vad=dataclasses.replace(base.vad, kind="webrtc")) if change == "vad"
             else base.replace(windows=dataclasses.replace(base.windows, hop_ms=50)))
    # 333-sample chunks leave windows held for VAD decisions at most reloads.
    for step in (1600, 333):
        _, dets, _ = _replay([base], 0, step)
        for every in (3, 7):
            windows, dets_again, p = _replay([base, other], every, step)
            ends = [e for _, e, _ in windows]
            assert ends == sorted(set(ends)), "a window decided twice or out of order"
            assert max(b - a for a, b in zip(ends, ends[1:], strict=False)) <= 1600
            # Each detection is a spoken keyword, heard once; none the plain run heard is
            # lost. (The other window grid may tip a faint word over the threshold.)
            heard = [_utterance(d) for d in dets_again]
            assert None not in heard and len(set(heard)) == len(heard)
            assert {_utterance(d) for d in dets} <= set(heard)
            # The held windows are decided before the counters move over, not after.
            assert p.inferences == sum(top is not None for *_, top in windows)


def test_a_reload_keeps_the_audio_and_publish_settings_it_says_need_a_restart(tmp_path,
                                                                               caplog):
    from streamkws.config import load_default
    from streamkws.daemon import Daemon

    cfg_file = tmp_path / "streamkws.toml"
    cfg_file.write_text(f'[publish]\nendpoint = "ipc://{tmp_path}/p.sock"\n')
    daemon = Daemon(load_default(cfg_file), config_path=cfg_file, echo=None)
    try:
        before = daemon.cfg
        cfg_file.write_text(f'[publish]\nendpoint = "ipc://{tmp_path}/p.sock"\n'
                            'status_interval_s = 0.2\n[audio]\nring_seconds = 7\n'
                            '[detect]\nthreshold = 0.9\n')
        assert daemon.reload()
        assert daemon.cfg.publish == before.publish and daemon.cfg.audio == before.audio
        assert daemon.pipeline.cfg.detect.threshold == 0.9  # the rest does take effect
        assert "[publish] changes take effect only after a restart" in caplog.text
        assert "[audio] changes take effect only after a restart" in caplog.text
    finally:
        daemon.publisher.close()
        daemon._restore_signals()


# -- stopping, whatever happens -----------------------------------------------------------

def test_sighup_during_start_up_does_not_kill_the_daemon(tmp_path):
    proc, sub, notify = start(tmp_path, "--source", "demo", "--realtime")
    # Once the process no longer dies of SIGHUP (the command's first step), and while it is
    # still importing and loading the model, long before any handler of the daemon's.
    wait_until_handled(proc, signal.SIGHUP)
    proc.send_signal(signal.SIGHUP)
    notify.wait_for("READY=1")
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)
    assert proc.returncode == 0
    sub.join(5)
    assert sub.messages[-1][1].get("final") is True


def test_sigterm_while_waiting_for_subscribers_stops_at_once(tmp_path):
    endpoint = f"ipc://{tmp_path}/pub.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamkws", "run", "--publish", endpoint, "--quiet",
         "--source", "demo", "--fast", "--wait-subscribers", "1", "--wait-timeout", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "pub.sock").exists():  # bound: now it waits for a subscriber
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    time.sleep(0.5)
    t = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    assert time.monotonic() - t < 2.0
    assert proc.returncode == 0
    assert "starting anyway" not in err and "listening on" not in err
    assert not (tmp_path / "pub.sock").exists()  # the socket file goes with the daemon


def demo_daemon_heard(tmp_path):
    """A daemon replaying the demo recording in this process, and a subscriber to it."""
    from streamkws.config import load_default
    from streamkws.daemon import Daemon, Overrides, apply_overrides

    endpoint = f"ipc://{tmp_path}/pub.sock"
    sub = Subscriber(endpoint, timeout=30)
    sub.start()
    cfg = apply_overrides(load_default(None), Overrides(source="demo", realtime=False,
                                                        publish=endpoint))
    return Daemon(cfg, echo=None, wait_subscribers=1), sub


def test_a_source_that_breaks_ends_the_run_with_the_error_in_the_final_status(tmp_path,
                                                                             monkeypatch):
    """A recording cut short while read: subscribers must not take its end for a clean one."""
    from streamkws.audio.wav import WavSource
    from streamkws.errors import AudioError

    real_blocks = WavSource.blocks

    def breaking_blocks(self):
        for i, block in enumerate(real_blocks(self)):
            if i == 30:
                raise AudioError("demo.wav: file ended early (was it truncated while read?)")
            yield block

    monkeypatch.setattr(WavSource, "blocks", breaking_blocks)
    daemon, sub = demo_daemon_heard(tmp_path)
    assert daemon.run() == 1
    sub.join(5)
    last = sub.messages[-1][1]
    assert last["type"] == "status" and last["final"] is True
    assert last["error"] == ("audio source stopped: demo.wav: file ended early (was it "
                             "truncated while read?)")


def test_a_failure_in_processing_still_sends_the_final_status_with_the_error(tmp_path,
                                                                             monkeypatch):
    from streamkws.bundle import Bundle

    calls = []
    real_predict = Bundle.predict

    def failing_predict(self, features):
        calls.append(1)
        if len(calls) == 20:
            time.sleep(0.5)  # meanwhile the fast replay fills the ring and waits for room
            raise RuntimeError("model exploded")
        return real_predict(self, features)

    monkeypatch.setattr(Bundle, "predict", failing_predict)
    handlers = {sig: signal.getsignal(sig)
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    daemon, sub = demo_daemon_heard(tmp_path)
    assert signal.getsignal(signal.SIGHUP) != handlers[signal.SIGHUP]
    assert daemon.run() == 1
    sub.join(5)
    last = sub.messages[-1][1]
    assert last["type"] == "status" and last["final"] is True
    assert last["error"] == "RuntimeError: model exploded"
    assert daemon.source.finished.is_set() and daemon.publisher.closed
    # The replay's reader, waiting for room in the full ring, was told to give up too.
    assert not daemon.source._thread.is_alive()
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers  # handed back


def test_a_daemon_made_on_the_main_thread_may_run_on_another(tmp_path):
    """As an embedding program might: the run ends normally; the handlers, which only the
    main thread may change, are handed back when it asks."""
    from streamkws.config import load_default
    from streamkws.daemon import Daemon, Overrides, apply_overrides

    before = signal.getsignal(signal.SIGTERM)
    cfg = apply_overrides(load_default(None), Overrides(
        source="demo", publish=f"ipc://{tmp_path}/pub.sock"))
    daemon = Daemon(cfg, echo=None)
    daemon.request_stop()
    result = []

    def run() -> None:
        try:
            result.append(daemon.run())
        except Exception as exc:  # the test's own report, not the daemon's
            result.append(exc)

    runner = threading.Thread(target=run)
    runner.start()
    runner.join(30)
    assert result == [0]
    daemon._restore_signals()
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_stop_signal_landing_inside_the_rings_wait_cannot_hang_the_daemon(tmp_path):
    """The loop spends its idle time in the ring's Event.wait, holding that event's lock;
    a handler that set the event there itself would wait for ever on its own lock."""
    from streamkws.config import load_default
    from streamkws.daemon import Daemon, Overrides, apply_overrides

    cfg = apply_overrides(load_default(None), Overrides(
        source="demo", publish=f"ipc://{tmp_path}/pub.sock"))
    daemon = Daemon(cfg, echo=None)
    handler = signal.getsignal(signal.SIGTERM)
    returned = threading.Event()

    def main_thread_inside_the_rings_wait():
        with daemon.ring._data._cond:
            handler(signal.SIGTERM, None)
        returned.set()

    # A thread stands in for the main thread, so a hang fails the test, not the run.
    threading.Thread(target=main_thread_inside_the_rings_wait, daemon=True).start()
    assert returned.wait(2), "the SIGTERM handler waited for a lock its own thread holds"
    assert daemon._stop.wait(2)
    assert daemon.run() == 0  # a stop before serving: the final status, handlers restored


@pytest.mark.parametrize("value", ["nan", "-1", "inf"])
def test_a_wait_timeout_that_is_not_a_duration_is_one_line(value, capsys):
    from streamkws.cli import main

    handlers = {sig: signal.getsignal(sig)
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    assert main(["run", "--source", "demo", "--wait-subscribers", "1",
                 f"--wait-timeout={value}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--wait-timeout must be 0-86400" in err
    # In process, the caller gets its signal handlers back (Ctrl-C still interrupts).
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers


def test_sigterm_during_start_up_is_a_clean_stop_not_a_kill(tmp_path):
    """Before the daemon's handlers exist (torch still importing), SIGTERM is remembered:
    the daemon then stops as it would later (exit 0, STOPPING=1), without starting audio.
    (Its final status goes out too, before a subscriber could have connected.)"""
    proc, sub, notify = start(tmp_path, "--source", "demo", "--realtime")
    time.sleep(0.4)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "listening on" not in err
    assert any("STOPPING=1" in m for m in notify.messages())
    sub.join(0.1)


def test_giving_up_on_subscribers_counts_connections_not_their_subscriptions(tmp_path,
                                                                              caplog):
    """One subscriber to both topics sends two subscriptions; waiting for two subscribers
    must still say that only one came."""
    import zmq

    from streamkws.config import load_default
    from streamkws.daemon import Daemon, Overrides, apply_overrides

    endpoint = f"ipc://{tmp_path}/pub.sock"
    cfg = apply_overrides(load_default(None), Overrides(source="demo", realtime=False,
                                                        publish=endpoint))
    daemon = Daemon(cfg, echo=None, wait_subscribers=2, wait_timeout=1.0)
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    try:
        sub.connect(endpoint)
        for topic in (b"detection", b"status"):
            sub.setsockopt(zmq.SUBSCRIBE, topic)
        assert daemon.run() == 0
    finally:
        sub.close(linger=0)
        ctx.term()
    assert "only 1 of 2 subscribers connected after 1 s; starting anyway" in caplog.text


def test_statuses_keep_to_their_grid_and_a_stall_brings_one_not_a_burst():
    from streamkws.daemon import StatusSchedule

    sched = StatusSchedule(5.0, now=100.0)
    assert sched.wait(100.0) == 5.0 and not sched.due(104.99)
    assert sched.due(105.3)  # published 0.3 s late...
    assert sched.wait(105.3) == pytest.approx(4.7)  # ...the next is not pushed back
    assert not sched.due(109.9) and sched.due(110.0)
    assert sched.due(131.0)  # a 21 s stall: one status now,
    assert not sched.due(131.0) and sched.next == 136.0  # then every 5 s from here
    sched.at_once(133.0)  # news (a microphone lost) goes out at once
    assert sched.due(133.0) and sched.next == 138.0
    sched.greet(133.1)  # a new subscriber, 0.1 s after a status: greeted at 133.5,
    assert sched.wait(133.1) == pytest.approx(0.4)
    sched.greet(133.3)  # and one more meanwhile by the same status
    assert not sched.due(133.49) and sched.due(133.5) and sched.next == 138.5
    sched.greet(140.0)  # long after the last: at once
    assert sched.due(140.0)


def test_a_new_subscriber_to_status_hears_one_at_once_not_at_the_next_interval(tmp_path):
    """ZeroMQ gives a subscriber only what is sent after it subscribed: without a greeting,
    one that connects (or reconnects to a restarted daemon) waits up to 5 s to learn how
    the daemon is doing."""
    proc, first, notify = start(tmp_path, "--source", "demo", "--realtime")
    endpoint = f"ipc://{tmp_path}/pub.sock"
    extra: list[Subscriber] = []
    notified = threading.Event()

    def read_as_systemd_does() -> None:  # a full queue (10) would hold each STATUS= 1 s
        while not notified.wait(0.05):
            notify.messages()

    threading.Thread(target=read_as_systemd_does, daemon=True).start()

    def statuses_at_first() -> list[float]:
        return [at for t, m, at in first.messages if t == "status"]

    def subscribe(topic: bytes) -> Subscriber:
        sub = Subscriber(endpoint, timeout=30, topics=(topic,))
        sub.start()
        extra.append(sub)
        return sub

    try:
        deadline = time.monotonic() + 30
        while not statuses_at_first():
            assert time.monotonic() < deadline, "no first status"
            time.sleep(0.01)
        t0 = statuses_at_first()[0]
        time.sleep(0.5)
        subscribe(b"detection")  # no status wanted: no greeting
        time.sleep(1.5)
        assert len(statuses_at_first()) == 1
        asked = time.time()
        late = subscribe(b"status")
        while not late.messages:
            assert time.time() - asked < 1.5, "no status within 1.5 s of subscribing"
            time.sleep(0.01)
        greeting = late.messages[0][2]
        assert greeting - t0 < 4.0  # well before the 5-s grid's next
        burst_at = time.time()
        for _ in range(12):  # one every 0.1 s, each its own turn of the loop
            subscribe(b"")
            time.sleep(0.1)
        time.sleep(0.8)  # the last one's greeting may wait 0.5 s for the one before
        span = time.time() - burst_at
        greeted = [at for at in statuses_at_first() if at > burst_at]
        # One per 0.5 s at most, not one per subscriber (12): 5 in the ~2 s the burst takes
        # here (more where starting a subscriber is slow).
        assert 2 <= len(greeted) <= span / 0.5 + 1 < 12, (greeted, span)
        assert all(s.messages for s in extra[2:]), "a subscriber of the burst heard nothing"
    finally:
        notified.set()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        for s in [first, *extra]:
            s.join(5)
    seqs = [m["seq"] for _, m, _ in first.messages]
    assert seqs == list(range(len(seqs)))
