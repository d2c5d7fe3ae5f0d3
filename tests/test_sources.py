"""File and stdin sources: any WAV format converted to 16 kHz mono, clear errors otherwise."""

import io
import struct
import threading
import time
from itertools import pairwise

import numpy as np
import pytest

from streamkws.audio.ring import RingBuffer
from streamkws.audio.sources import open_source
from streamkws.audio.stdin import StdinSource
from streamkws.audio.wav import WavSource, load_audio
from streamkws.errors import AudioError
from tests.conftest import clip_paths, write_wav


@pytest.fixture(scope="module")
def clip(speech_dir):
    return load_audio(clip_paths(speech_dir, "yes", 1)[0])


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_every_pcm_width_reads_back(tmp_path, clip, width):
    x = load_audio(write_wav(tmp_path / "a.wav", clip, width=width))
    tol = {1: 1 / 64, 2: 1e-4, 3: 1e-6, 4: 1e-6}[width]
    assert len(x) == len(clip) and np.abs(x - clip).max() <= tol


def _write_float_wav(path, x: np.ndarray, rate=16000, extensible=False):
    data = x.astype("<f4").tobytes()
    if extensible:
        guid = struct.pack("<H", 3) + b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
        fmt = struct.pack("<HHIIHHHHI", 0xFFFE, 1, rate, rate * 4, 4, 32, 22, 32, 4) + guid
    else:
        fmt = struct.pack("<HHIIHH", 3, 1, rate, rate * 4, 4, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"LIST" + struct.pack("<I", 5) + b"hello\x00"  # odd chunk: padding byte
    body += b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


@pytest.mark.parametrize("extensible", [False, True])
def test_float_and_extensible_wav_read_exactly(tmp_path, clip, extensible):
    x = load_audio(_write_float_wav(tmp_path / "f.wav", clip, extensible=extensible))
    assert np.array_equal(x, clip)


def test_stereo_is_mixed_down(tmp_path, clip):
    x = load_audio(write_wav(tmp_path / "s.wav", clip, channels=2))
    assert x.ndim == 1 and np.abs(x - clip).max() < 1e-4


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_other_rates_are_resampled_to_16k(tmp_path, clip, rate):
    import soxr

    other = soxr.resample(clip, 16000, rate)
    x = load_audio(write_wav(tmp_path / "r.wav", other, rate=rate))
    assert abs(len(x) - len(clip)) <= 2
    # 8 kHz audio has lost everything above 4 kHz, so compare the band both share.
    ref = soxr.resample(soxr.resample(clip, 16000, 8000), 8000, 16000) if rate == 8000 else clip
    assert _corr(x, ref) > 0.98


def test_wav_source_streams_in_fast_mode_with_positions(tmp_path, speech_stream):
    path = write_wav(tmp_path / "s.wav", speech_stream)
    chunks = list(WavSource(path, realtime=False, block_frames=1000).chunks())
    assert [c.start for c in chunks] == list(range(0, len(speech_stream), 1000))
    got = np.concatenate([c.samples for c in chunks])
    assert np.abs(got - speech_stream).max() < 1e-4


def test_wav_source_resamples_as_a_stream(tmp_path, speech_stream):
    import soxr

    path = write_wav(tmp_path / "s.wav", soxr.resample(speech_stream, 16000, 44100), rate=44100)
    chunks = list(WavSource(path, block_frames=441).chunks())
    got = np.concatenate([c.samples for c in chunks])
    assert abs(len(got) - len(speech_stream)) <= 2 and _corr(got, speech_stream) > 0.99
    assert all(a.end == b.start for a, b in pairwise(chunks))


def test_realtime_replay_is_paced_like_a_microphone(tmp_path, speech_stream):
    path = write_wav(tmp_path / "s.wav", speech_stream[:8000])  # 0.5 s
    t = time.monotonic()
    list(WavSource(path, realtime=True, block_frames=800).chunks())
    assert 0.45 <= time.monotonic() - t <= 0.8


def test_fast_replay_through_a_small_ring_loses_nothing(tmp_path, speech_stream):
    source = open_source(f"wav:{write_wav(tmp_path / 's.wav', speech_stream)}", realtime=False)
    ring = RingBuffer(3000)  # far smaller than the file: the reader must wait, not drop
    source.start(lambda c: ring.write(c, block=True))
    got = []
    while not (source.finished.is_set() and ring.available == 0):
        c = ring.read(timeout=0.05)
        if c is not None:
            got.append(c.samples)
    assert source.error is None and ring.overruns == 0
    assert np.abs(np.concatenate(got) - speech_stream).max() < 1e-4


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty file"),
        (b"ID3\x03\x00\x00\x00" + bytes(200), "not a WAV file"),
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", "truncated or malformed"),
    ],
)
def test_unreadable_files_are_one_clear_error(tmp_path, content, message):
    p = tmp_path / "bad.wav"
    p.write_bytes(content)
    with pytest.raises(AudioError, match=message):
        WavSource(p)


def test_truncated_wav_is_refused_with_its_sizes(tmp_path, clip):
    p = write_wav(tmp_path / "t.wav", clip)
    p.write_bytes(p.read_bytes()[:-5000])
    with pytest.raises(AudioError, match=r"truncated WAV: header promises 32000 bytes"):
        WavSource(p)


def test_streamed_wav_of_unknown_length_reads_to_the_end(tmp_path, clip):
    p = write_wav(tmp_path / "u.wav", clip)
    raw = bytearray(p.read_bytes())
    raw[40:44] = b"\xff\xff\xff\xff"  # as `arecord` writes to a pipe
    p.write_bytes(bytes(raw))
    assert np.abs(load_audio(p) - clip).max() < 1e-4


def test_compressed_wav_is_refused(tmp_path):
    fmt = struct.pack("<HHIIHH", 2, 1, 16000, 8000, 256, 4)  # MS ADPCM
    body = b"WAVEfmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", 4) + bytes(4)
    p = tmp_path / "adpcm.wav"
    p.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    with pytest.raises(AudioError, match="unsupported WAV encoding"):
        load_audio(p)


def test_missing_file_and_unknown_source_are_clear_errors(tmp_path):
    with pytest.raises(AudioError, match="cannot open"):
        open_source(f"wav:{tmp_path / 'nope.wav'}")
    with pytest.raises(AudioError, match="unknown audio source 'http://x'"):
        open_source("http://x")


def test_stdin_source_reads_s16le_until_eof(clip):
    raw = (clip * 32767).astype("<i2").tobytes()
    src = StdinSource(io.BufferedReader(io.BytesIO(raw + b"\x01")), block_frames=777)
    chunks = list(src.chunks())
    got = np.concatenate([c.samples for c in chunks])
    assert len(got) == len(clip) and np.abs(got - clip).max() < 1e-4
    assert chunks[1].start == len(chunks[0].samples)


def test_stdin_closed_mid_stream_ends_the_source_cleanly(clip):
    import os

    r, w = os.pipe()
    src = StdinSource(os.fdopen(r, "rb"), block_frames=1600)
    ring = RingBuffer(32000)
    src.start(lambda c: ring.write(c, block=True))
    os.write(w, (clip[:8000] * 32767).astype("<i2").tobytes())
    time.sleep(0.1)
    assert not src.finished.is_set()
    os.close(w)
    assert src.finished.wait(2.0) and src.error is None
    assert ring.available == 8000


def test_stdin_input_wait_counts_a_silent_producer_not_a_busy_consumer(clip):
    """What the daemon's stall report rests on: a fast replay blocked on a full ring is
    waiting for the daemon, not for its producer."""
    import os

    r, w = os.pipe()
    src = StdinSource(os.fdopen(r, "rb"), block_frames=1600)
    release, in_sink = threading.Event(), threading.Event()

    def slow_sink(chunk) -> None:
        in_sink.set()
        release.wait(5)

    src.start(slow_sink)
    try:
        time.sleep(0.5)  # nothing written yet: waiting for input
        assert src.input_wait(time.monotonic()) >= 0.3
        os.write(w, (clip[:1600] * 32767).astype("<i2").tobytes())
        assert in_sink.wait(2)
        time.sleep(0.3)  # held in the sink: not a wait for input
        assert src.input_wait(time.monotonic()) == 0.0
        release.set()
        time.sleep(0.5)
        assert 0.2 <= src.input_wait(time.monotonic()) < 1.5
    finally:
        release.set()
        os.close(w)
    assert src.finished.wait(2) and src.input_wait(time.monotonic()) == 0.0


def test_source_errors_in_the_reader_thread_are_reported_not_lost(tmp_path, clip):
    p = write_wav(tmp_path / "x.wav", clip)
    src = WavSource(p)
    p.write_bytes(p.read_bytes()[:100])  # shrinks after the header was checked
    done = threading.Event()
    src.start(lambda c: done.set())
    assert src.finished.wait(2.0)
    assert isinstance(src.error, AudioError)
