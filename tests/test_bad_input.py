"""Bad input files and a closing stdin, end to end through ``streamkws run``.

A file the daemon cannot play is refused when it is opened, as one line on stderr
(``streamkws run: error: <path>: ...``) and exit code 2, never a traceback or a failure
half-way through the stream. Streamed WAVs whose header says "length unknown" play to the
end of the file, and stdin closing mid-stream is a clean end.

Every bad file goes through the command's ``main`` in this process; a process per case
would spend ~2 s each importing torch to exercise the same error path. A few
representative cases (one per place a file can fail: opening, the RIFF header, the format
chunk, the data size) and the streamed WAVs also run as real processes, concurrently and
started once per module; their speed is judged by CPU time, which does not depend on how
busy the machine is. (A missing path is covered by
``test_daemon.test_start_up_errors_are_one_line_without_traceback``.)
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

from tests.e2e import Subscriber, free_port

RUN = [sys.executable, "-m", "streamkws", "run", "--quiet"]
CONCURRENT = 4  # the machine is shared; more would only queue for the same cores


def _wav(*, tag: int = 1, channels: int = 1, rate: int = 16000, bits: int = 16,
         data: bytes = b"", data_size: int | None = None, with_data: bool = True) -> bytes:
    align = channels * bits // 8
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * align, align, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    if with_data:
        size = len(data) if data_size is None else data_size
        body += b"data" + struct.pack("<I", size) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _s16(x: np.ndarray) -> bytes:
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


# id -> (what to write at the path, or None for a directory; what the error must say)
BAD_FILES: dict[str, tuple[Callable[[], bytes] | None, str]] = {
    "truncated": (lambda: _wav(data=bytes(32000), data_size=64000),
                  "truncated WAV: header promises 64000 bytes of audio, the file holds 32000"),
    "empty": (lambda: b"", "empty file"),
    "text": (lambda: b"yes no up down\n" * 20, "not a WAV file (no RIFF/WAVE header)"),
    "random_bytes": (lambda: np.random.default_rng(3).bytes(5000), "not a WAV file"),
    "mp3": (lambda: b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes(2000), "it looks like MP3"),
    "ogg": (lambda: b"OggS\x00\x02" + bytes(2000), "it looks like Ogg"),
    "mu_law": (lambda: _wav(tag=7, bits=8, data=bytes(1600)),
               "unsupported WAV encoding (format tag 7)"),
    "a_law": (lambda: _wav(tag=6, bits=8, data=bytes(1600)),
              "unsupported WAV encoding (format tag 6)"),
    "ima_adpcm": (lambda: _wav(tag=0x11, bits=4, data=bytes(1600)),
                  "unsupported WAV encoding (format tag 17)"),
    "zero_channels": (lambda: _wav(channels=0, data=bytes(1600)), "0 channels"),
    "zero_hz": (lambda: _wav(rate=0, data=bytes(1600)), "unsupported sample rate 0 Hz"),
    "12_bit": (lambda: _wav(bits=12, data=bytes(1600)), "unsupported sample width (12-bit PCM)"),
    "no_data_chunk": (lambda: _wav(with_data=False), "no 'data' chunk"),
    "directory": (None, "cannot open (Is a directory)"),
}

IN_A_PROCESS = ["directory", "text", "mu_law", "truncated"]

PLACEHOLDER_SIZES = {"zero": 0, "all_ones": 0xFFFFFFFF, "sox": 0x7FFFF000}


def _make(root, key: str):
    content = BAD_FILES[key][0]
    path = root / f"{key}.wav"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content())
    return path


@dataclass
class Outcome:
    rc: int
    stderr: str
    cpu_s: float
    statuses: list[dict] = field(default_factory=list)


def _run_concurrently(jobs: dict[str, tuple[list[str], Subscriber | None]],
                      timeout: float = 180.0) -> dict[str, Outcome]:
    """Run each job's command, at most CONCURRENT at once; reap with wait4 for CPU time."""
    waiting = list(jobs.items())
    running: dict[str, subprocess.Popen] = {}
    done: dict[str, Outcome] = {}
    deadline = time.monotonic() + timeout
    while (waiting or running) and time.monotonic() < deadline:
        while waiting and len(running) < CONCURRENT:
            key, (cmd, sub) = waiting.pop(0)
            if sub is not None:
                sub.start()
            running[key] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.PIPE, text=True)
        for key, proc in list(running.items()):
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == 0:
                continue
            proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
            assert proc.stderr is not None
            sub = jobs[key][1]
            if sub is not None:
                sub.join(10)
            done[key] = Outcome(proc.returncode, proc.stderr.read(),
                                usage.ru_utime + usage.ru_stime,
                                [m for t, m, _ in sub.messages if t == "status"] if sub else [])
            del running[key]
        time.sleep(0.05)
    for proc in running.values():  # hung: the test of that case fails on its missing entry
        proc.kill()
        proc.wait()
    return done


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, speech_stream) -> dict[str, Outcome]:
    root = tmp_path_factory.mktemp("bad_input")
    jobs: dict[str, tuple[list[str], Subscriber | None]] = {}
    for key in IN_A_PROCESS:
        jobs[key] = ([*RUN, "--fast", "--source", f"wav:{_make(root, key)}",
                      "--publish", f"tcp://127.0.0.1:{free_port()}"], None)
    audio = _s16(speech_stream[:48000])
    for key, size in PLACEHOLDER_SIZES.items():
        path = root / f"streamed_{key}.wav"
        path.write_bytes(_wav(data=audio, data_size=size))
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        jobs[f"streamed_{key}"] = ([*RUN, "--fast", "--source", f"wav:{path}", "--publish",
                                    endpoint, "--wait-subscribers", "1"],
                                   Subscriber(endpoint, timeout=120))
    results = _run_concurrently(jobs)
    for r in results.values():
        r.stderr = r.stderr.replace(str(root), "<root>")
    return results


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_an_unplayable_file_is_one_error_line_naming_it_and_exit_2(tmp_path, capsys, case):
    from streamkws.cli import main

    path = _make(tmp_path, case)
    rc = main(["run", "--quiet", "--fast", "--source", f"wav:{path}",
               "--publish", f"tcp://127.0.0.1:{free_port()}"])
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert rc == 2 and out == ""
    assert len(lines) == 1 and lines[0].startswith(f"streamkws run: error: {path}: "), err
    assert BAD_FILES[case][1] in lines[0]


@pytest.mark.parametrize("case", IN_A_PROCESS)
def test_an_unplayable_file_fails_a_real_process_at_once_with_one_clean_line(outcomes, case):
    assert case in outcomes, f"streamkws run on the {case} file did not finish"
    r = outcomes[case]
    lines = r.stderr.strip().splitlines()
    assert r.rc == 2, r.stderr
    assert len(lines) == 1, f"expected one line, got:\n{r.stderr}"
    assert lines[0].startswith(f"streamkws run: error: <root>/{case}.wav: "), lines[0]
    assert BAD_FILES[case][1] in lines[0]
    # Refused while opening, before any audio flows: the cost is start-up alone (~1.5 s
    # of CPU, mostly importing torch), not a replay that fails half-way.
    assert r.cpu_s < 6.0


@pytest.mark.parametrize("size", sorted(PLACEHOLDER_SIZES))
def test_a_streamed_wav_of_unknown_length_plays_to_the_end_of_the_file(outcomes, size):
    r = outcomes[f"streamed_{size}"]
    assert r.rc == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.statuses and r.statuses[-1].get("final") is True
    assert r.statuses[-1]["audio_seconds"] == pytest.approx(3.0, abs=0.01)


def _feed_stdin(proc: subprocess.Popen, data: bytes, pieces: list[int]) -> None:
    """Write ``data`` in pieces of the given sizes, a little apart, then close the pipe."""
    assert proc.stdin is not None
    i, k = 0, 0
    while i < len(data):
        n = pieces[k % len(pieces)]
        proc.stdin.write(data[i : i + n])
        proc.stdin.flush()
        i, k = i + n, k + 1
        time.sleep(0.002)
    proc.stdin.close()


@pytest.mark.parametrize("odd", [False, True], ids=["even_bytes", "odd_bytes"])
def test_stdin_closing_mid_stream_is_a_clean_shutdown_with_exact_audio_time(
        tmp_path, speech_stream, odd):
    # Part of a real recording, cut mid-word, in pipe writes of awkward sizes.
    data = _s16(speech_stream[:52345]) + (b"\x01" if odd else b"")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    sub = Subscriber(endpoint, timeout=90)
    sub.start()
    # Files, not pipes, for the output: nothing reads them while the writer runs.
    with open(tmp_path / "out", "wb") as out, open(tmp_path / "err", "wb") as err:
        proc = subprocess.Popen([*RUN, "--source", "-", "--publish", endpoint,
                                 "--wait-subscribers", "1"],
                                stdin=subprocess.PIPE, stdout=out, stderr=err)
        writer = threading.Thread(target=_feed_stdin, args=(proc, data, [4097, 333, 1, 8191]))
        writer.start()
        try:
            proc.wait(timeout=90)
        finally:
            proc.kill()
            writer.join(10)
    sub.join(10)
    stderr = (tmp_path / "err").read_text()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    statuses = [m for t, m, _ in sub.messages if t == "status"]
    assert statuses and statuses[-1].get("final") is True
    assert statuses[-1]["audio_seconds"] == pytest.approx(len(data) // 2 / 16000, abs=0.01)
    if odd:
        assert "half a sample" in stderr  # said, not silently dropped
    assert (tmp_path / "out").read_bytes() == b""  # --quiet


def test_the_helper_wav_writer_makes_files_the_reader_accepts(tmp_path):
    from streamkws.audio.wav import load_audio

    x = np.linspace(-0.5, 0.5, 1000)
    p = tmp_path / "ok.wav"
    p.write_bytes(_wav(data=_s16(x)))
    assert np.abs(load_audio(p) - x).max() < 1e-4

