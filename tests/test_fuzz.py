"""No input crashes the daemon: property tests over configs, WAV files, stdin and audio.

Every input either works or raises the project's own error naming what is wrong; never
another exception, a hang, a huge allocation or NaN features. Example counts are kept
modest so the file runs in seconds; hunt harder with ``STREAMKWS_FUZZ_EXAMPLES=5000``.
"""

from __future__ import annotations

import dataclasses
import io
import os
import struct
import tracemalloc
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamkws import config
from streamkws.audio.chunk import Chunk
from streamkws.audio.stdin import StdinSource
from streamkws.audio.wav import WavSource, iter_wav, load_audio, read_wav_info
from streamkws.bundle import Bundle, load_bundle
from streamkws.config import Config
from streamkws.daemon import Pipeline
from streamkws.errors import AudioError, ConfigError, ConfigFileError, StreamKWSError
from streamkws.frontend import FrontEnd, GatedWindow
from streamkws.vad import VadConfig

# Whole-file deadlines would flake on a loaded 2-core runner; a per-example deadline of
# seconds still turns a hang into a failure.
EXAMPLES = int(os.environ.get("STREAMKWS_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=10_000,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

# -- configuration -----------------------------------------------------------------------

SECTIONS = {name: [f.name for f in dataclasses.fields(tp)]
            for name, tp in typing.get_type_hints(Config).items()}

_scalars = st.one_of(
    st.none(), st.booleans(),
    # Beyond int64, as no TOML file holds; 10**400 overflows float().
    st.integers(-10, 70_000), st.integers(), st.sampled_from([1 << 63, -(1 << 64), 10**400]),
    st.floats(), st.floats(-1e4, 1e5), st.sampled_from([float("nan"), float("inf"), -0.0]),
    st.text(max_size=12), st.sampled_from(["mic", "", "tcp://*:1", "webrtc", "htk", "x" * 500]),
    st.datetimes(), st.dates(), st.binary(max_size=4),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=6) | st.sampled_from(["yes", "no", "go"]), inner,
                      max_size=3),
    max_leaves=6,
)


@st.composite
def _config_dicts(draw: st.DrawFn) -> dict[Any, Any]:
    """Mostly real section and key names with wrong-typed or out-of-range values; some
    random keys, non-string keys and sections that are not tables."""
    data: dict[Any, Any] = {}
    for _ in range(draw(st.integers(1, 3))):
        section = draw(st.sampled_from(sorted(SECTIONS)) | st.text(max_size=6)
                       | st.integers(-2, 2))
        if draw(st.integers(0, 9)) == 0:
            data[section] = draw(_values)
            continue
        known = SECTIONS.get(section, ["x"])
        body = {}
        for _ in range(draw(st.integers(0, 3))):
            key = draw(st.sampled_from(known) | st.text(max_size=8) | st.just(7))
            body[key] = draw(_values)
        data[section] = body
    return data


def _paths(data: Any, prefix: str = "") -> set[str]:
    out = set()
    if isinstance(data, dict):
        for k, v in data.items():
            p = f"{prefix}{k if isinstance(k, str) else config._short(k)}"
            out.add(p)
            out |= _paths(v, p + ".")
    return out


def _assert_names_a_key(exc: ConfigError, data: dict) -> None:
    msg = str(exc)
    assert exc.key in msg
    assert any(p in msg for p in _paths(data)), (msg, data)


@FUZZ
@given(data=_config_dicts())
def test_any_nested_config_dict_parses_or_raises_a_config_error_naming_its_key(data):
    try:
        cfg = config.parse(data)
    except ConfigError as exc:
        _assert_names_a_key(exc, data)
    else:
        assert isinstance(cfg, Config)
        assert cfg == cfg.validate()


@FUZZ
@given(section=st.sampled_from(sorted(SECTIONS)), data=st.data())
def test_one_bad_value_in_a_real_section_is_named_by_its_own_key(section, data):
    key = data.draw(st.sampled_from(SECTIONS[section]))
    value = data.draw(_values)
    try:
        config.parse({section: {key: value}})
    except ConfigError as exc:
        # Cross-field checks name the other key too (f_max in f_min's message, windows.hop_ms
        # for frontend.hop_ms), but the key the user set always appears.
        assert key in str(exc), str(exc)


_TOML_LINES = st.sampled_from([
    "[audio]", "[frontend]", "[vad]", "[detect]", "[detect.thresholds]", "[publish]",
    "[windows]", "[model]", "[[audio]]", "block_ms = 20", "block_ms = 0", "hop_ms = 15",
    "n_mels = 99999999999999999999", "f_max = nan", "f_max = inf", "threshold = -0.1",
    "yes = 0.5", "kind = 'energy'", "kind = 5", "source = 1979-05-27T07:32:00Z",
    "realtime = 1", "ignore = ['_silence_', 3]", "endpoint = 'udp://x'", "a = {b = [1, {c = 2}]}",
    "x = " + "[" * 1200 + "]" * 1200, "n_mels = " + "1" * 5000, "= 3", "'''", "\x00", "\ufeff",
])


@FUZZ
@given(content=st.one_of(
    st.lists(_TOML_LINES | st.text(max_size=20), max_size=8).map("\n".join).map(str.encode),
    st.binary(max_size=64),
    st.text(max_size=40).map(lambda t: t.encode("utf-16")),
))
def test_any_config_file_loads_or_raises_an_error_naming_the_file_or_key(tmp_path, content):
    p = tmp_path / "c.toml"
    p.write_bytes(content)
    try:
        cfg = config.load(p)
    except ConfigFileError as exc:
        assert str(exc).startswith(f"{p}: ")
    except ConfigError as exc:
        assert exc.key in str(exc)
    else:
        assert isinstance(cfg, Config)


def test_config_file_errors_are_stream_kws_errors_so_the_cli_reports_them():
    assert issubclass(ConfigFileError, StreamKWSError) and issubclass(ConfigError, StreamKWSError)


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"\xff\xfe[\x00a\x00", "not a text file"),
        (("x = " + "[" * 5000 + "]" * 5000).encode(), "nested too deeply"),
        (("[frontend]\nn_mels = " + "1" * 5000).encode(), "not valid TOML"),
    ],
)
def test_undecodable_or_pathological_config_files_are_file_errors(tmp_path, content, why):
    p = tmp_path / "c.toml"
    p.write_bytes(content)
    with pytest.raises(ConfigFileError, match=why):
        config.load(p)


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"frontend": {"f_max": 10**30}}, "frontend.f_max"),  # float() would overflow
        ({"audio": {"block_ms": 10**5000}}, "audio.block_ms"),  # str() would refuse it
        ({"audio": {"source": 10**5000}}, "audio.source"),
        ({"detect": {"thresholds": {10**5000: 0.5}}}, "detect.thresholds."),
        ({"audio": {3: 1}}, "audio.3"),  # difflib's suggestion needs a string
        ({"frontend": {"f_max": float("nan")}}, "frontend.f_max"),  # not f_min
    ],
)
def test_values_no_toml_file_can_hold_still_give_config_errors(data, key):
    with pytest.raises(ConfigError) as exc:
        config.parse(data)
    assert exc.value.key.startswith(key) and len(str(exc.value)) < 300


# -- WAV files -----------------------------------------------------------------------------


def _wav(*, tag: int = 1, channels: int = 1, rate: int = 16000, bits: int = 16,
         align: int | None = None, data: bytes = b"", data_size: int | None = None,
         fmt_size: int | None = None, fmt_extra: bytes = b"", before_data: bytes = b"",
         with_data: bool = True, riff_size: int | None = None) -> bytes:
    """A RIFF/WAVE file whose every header field can lie."""
    align = channels * bits // 8 if align is None else align
    fmt = struct.pack("<HHIIHH", tag, channels, rate & 0xFFFFFFFF, (rate * align) & 0xFFFFFFFF,
                      align & 0xFFFF, bits) + fmt_extra
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt) if fmt_size is None else fmt_size)
    body += fmt + b"\x00" * (len(fmt) & 1) + before_data
    if with_data:
        body += b"data" + struct.pack("<I", len(data) if data_size is None else data_size) + data
    return b"RIFF" + struct.pack("<I", len(body) if riff_size is None else riff_size) + body


def _pcm(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(-32768, 32768, n, dtype=np.int16).tobytes()


def _valid_audio(x: np.ndarray) -> None:
    assert x.dtype == np.float32 and x.ndim == 1
    assert np.isfinite(x).all() and np.abs(x).max(initial=0) <= 1.0


def _read_every_way(p: Path) -> None:
    """Each reader either returns valid audio or raises AudioError naming the file."""
    size = p.stat().st_size
    # An 8-bit mono file at the lowest accepted rate (1 kHz) upsamples 16-fold; anything
    # more means a lying header made the reader invent audio.
    bound = 16 * size + 2000

    def attempt(fn):
        try:
            return fn()
        except AudioError as exc:
            assert str(p) in str(exc), str(exc)
            return None

    def info():
        with open(p, "rb") as f:
            return read_wav_info(f, str(p))

    i = attempt(info)
    if i is not None:
        assert i.channels >= 1 and i.data_bytes % i.block_align == 0
        assert i.data_offset + i.data_bytes <= size
    x = attempt(lambda: load_audio(p))
    if x is not None:
        _valid_audio(x)
        assert len(x) <= bound
    blocks = attempt(lambda: list(iter_wav(p, block_frames=257)))
    if blocks is not None:
        for b in blocks:
            _valid_audio(b)
        assert sum(map(len, blocks)) <= bound
    src = attempt(lambda: WavSource(p, block_frames=300))
    if src is not None:
        pos = 0
        for c in src.chunks():
            assert c.start == pos
            _valid_audio(c.samples)
            pos = c.end
        assert pos <= bound
    # A header that parses means the whole file reads: truncation is caught at open.
    if i is not None:
        assert x is not None and blocks is not None and src is not None


_TAGS = st.sampled_from([1, 3, 0xFFFE, 0, 2, 6, 7, 0x11, 0x55, 0xFFFF])
_CHANNELS = st.sampled_from([1, 2, 0, 3, 6, 255, 65535]) | st.integers(0, 0xFFFF)
_RATES = (st.sampled_from([16000, 8000, 44100, 48000, 0, 1, 999, 1000, 768000, 768001,
                           0xFFFFFFFF]) | st.integers(0, 0xFFFFFFFF))
_BITS = st.sampled_from([8, 16, 24, 32, 64, 0, 1, 4, 12, 20, 48]) | st.integers(0, 0xFFFF)
_SIZES = (st.sampled_from([0, 1, 3, 0xFFFFFFFF, 0x7FFFF000, 0x7FFFFF00, 0x80000000, 0xFFFFFF00])
          | st.integers(0, 0xFFFFFFFF))


_FORMATS = [(1, 8), (1, 16), (1, 24), (1, 32), (3, 32), (3, 64), (0xFFFE, 16), (0xFFFE, 32)]
_MUTATIONS = ["tag", "channels", "rate", "bits", "align", "data_size", "fmt_size", "fmt_extra",
              "odd_chunk", "no_data", "truncate", "bytes"]


@st.composite
def _wav_files(draw: st.DrawFn) -> bytes:
    """A valid WAV of any supported format (random bytes as float samples give NaN, inf and
    huge values for free), then up to two lies or injuries."""
    tag, bits = draw(st.sampled_from(_FORMATS))
    channels = draw(st.sampled_from([1, 2, 3]))
    align = channels * bits // 8
    frames = draw(st.integers(0, 1500))
    kw: dict[str, Any] = {
        "tag": tag, "channels": channels, "bits": bits,
        "rate": draw(st.sampled_from([16000, 8000, 22050, 44100, 48000])),
        "data": np.random.default_rng(draw(st.integers(0, 99))).bytes(frames * align),
    }
    if tag == 0xFFFE:  # cbSize, valid bits, channel mask, then the sub-format GUID
        sub = 3 if draw(st.booleans()) and bits == 32 else 1
        kw["fmt_extra"] = struct.pack("<HHIH", 22, bits, 0, sub) + bytes(14)
    mutations = draw(st.lists(st.sampled_from(_MUTATIONS), max_size=2))
    for m in mutations:
        if m == "tag":
            kw["tag"] = draw(_TAGS)
        elif m == "channels":
            kw["channels"] = draw(_CHANNELS)
        elif m == "rate":
            kw["rate"] = draw(_RATES)
        elif m == "bits":
            kw["bits"] = draw(_BITS)
        elif m == "align":
            kw["align"] = draw(st.integers(0, 0xFFFF))
        elif m == "data_size":
            kw["data_size"] = draw(_SIZES)
        elif m == "fmt_size":
            kw["fmt_size"] = draw(_SIZES)
        elif m == "fmt_extra":
            kw["fmt_extra"] = draw(st.binary(max_size=30))
        elif m == "odd_chunk":  # an odd-length chunk whose pad byte may be missing
            name = draw(st.sampled_from([b"LIST", b"fact", b"junk", b"data", b"fmt "]))
            n = draw(st.integers(0, 9))
            pad = b"\x00" * (n & 1) if draw(st.booleans()) else b""
            size = draw(st.just(n) | _SIZES)
            kw["before_data"] = name + struct.pack("<I", size) + bytes(n) + pad
        elif m == "no_data":
            kw["with_data"] = False
    raw = _wav(**kw)
    if "truncate" in mutations:
        raw = raw[: len(raw) - draw(st.integers(0, len(raw)))]
    if "bytes" in mutations:
        b = bytearray(raw)
        for _ in range(draw(st.integers(1, 4))):
            if b:
                b[draw(st.integers(0, len(b) - 1))] = draw(st.integers(0, 255))
        raw = bytes(b)
    return raw


@FUZZ
@given(raw=_wav_files())
def test_any_wav_like_file_reads_as_valid_audio_or_raises_an_audio_error(tmp_path, raw):
    p = tmp_path / "x.wav"
    p.write_bytes(raw)
    _read_every_way(p)


@FUZZ
@given(raw=st.binary(max_size=300) | st.text(max_size=100).map(str.encode)
       | st.sampled_from([b"ID3\x03" + bytes(100), b"\xff\xfb\x90\x00" + bytes(50),
                          b"OggS\x00\x02" + bytes(50), b"fLaC" + bytes(40), b"RIFF",
                          b"RIFF\x00\x00\x00\x00WAVE", b"RIFF\xff\xff\xff\xffWAVEdata"]))
def test_random_bytes_read_as_valid_audio_or_raise_an_audio_error(tmp_path, raw):
    for suffix in (".wav", ".bin"):  # other suffixes go through soundfile
        p = tmp_path / f"r{suffix}"
        p.write_bytes(raw)
        _read_every_way(p)


def test_every_truncation_of_a_wav_is_refused_at_open_or_reads_whole(tmp_path):
    full = _wav(data=_pcm(300), before_data=b"LIST\x03\x00\x00\x00abc\x00")
    p = tmp_path / "t.wav"
    for n in range(len(full) + 1):
        p.write_bytes(full[:n])
        _read_every_way(p)
        if 0 < n < len(full):
            with pytest.raises(AudioError):
                WavSource(p)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"fmt_size": 0xFFFFFF00}, "truncated or malformed"),  # was a 4 GiB read
        ({"data_size": 0x7FFFEFFF}, "truncated WAV"),  # just below the placeholders
        ({"rate": 1}, "unsupported sample rate 1 Hz"),  # 16000 output samples per frame
        ({"rate": 0}, "unsupported sample rate 0 Hz"),
        ({"channels": 0}, "0 channels"),
        ({"before_data": b"LIST\x00\xff\xff\xff"}, "no 'data' chunk"),
    ],
)
def test_lying_size_and_rate_fields_never_cause_a_huge_allocation(tmp_path, fields, message):
    p = tmp_path / "lie.wav"
    p.write_bytes(_wav(**{"data": _pcm(1000), **fields}))
    tracemalloc.start()
    try:
        with pytest.raises(AudioError, match=message):
            load_audio(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


@pytest.mark.parametrize("size", [0, 0xFFFFFFFF, 0x7FFFF000])
def test_streaming_placeholder_sizes_read_to_the_end_of_the_file(tmp_path, size):
    # 0 and 0xFFFFFFFF: arecord and ffmpeg writing to a pipe; 0x7FFFF000: sox (checked
    # with `sox -n -t wav - synth 0.1 sine 440 | xxd`).
    data = _pcm(1000)
    p = tmp_path / "s.wav"
    p.write_bytes(_wav(data=data, data_size=size))
    x = load_audio(p)
    assert np.array_equal(x, np.frombuffer(data, "<i2").astype(np.float32) / 32768.0)


def test_a_wav_written_by_sox_to_a_pipe_is_read_whole(tmp_path):
    import shutil
    import subprocess

    if shutil.which("sox") is None:
        pytest.skip("sox is not installed")
    p = tmp_path / "sox.wav"
    # Through a pipe, so sox cannot seek back to fix the sizes.
    out = subprocess.run(["sox", "-q", "-n", "-r", "16000", "-c", "1", "-b", "16", "-t", "wav",
                          "-", "synth", "0.5", "sine", "440"], capture_output=True, check=True)
    p.write_bytes(out.stdout)
    assert p.read_bytes()[40:44] == b"\x00\xf0\xff\x7f"  # the placeholder size
    assert len(load_audio(p)) == 8000


@pytest.mark.parametrize("bits", [32, 64])
def test_float_wav_nan_inf_and_out_of_range_samples_become_finite_and_clipped(
        tmp_path, bits, caplog):
    x = np.array([0.5, np.nan, np.inf, -np.inf, 3.0, -1e30, -0.25] * 100)
    raw = x.astype("<f4" if bits == 32 else "<f8").tobytes()
    p = tmp_path / "f.wav"
    p.write_bytes(_wav(tag=3, bits=bits, data=raw))
    got = load_audio(p)
    _valid_audio(got)
    want = np.tile(np.float32([0.5, 0, 0, 0, 1, -1, -0.25]), 100)
    assert np.array_equal(got, want)
    assert sum("replaced by silence" in r.message for r in caplog.records) == 1


def test_a_directory_or_fifo_is_an_audio_error_not_a_crash(tmp_path):
    import os

    with pytest.raises(AudioError, match="cannot open"):
        load_audio(tmp_path)
    with pytest.raises(AudioError, match="cannot open"):
        WavSource(tmp_path)
    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # a writer, so opening does not block
    try:
        with pytest.raises(AudioError, match="not a regular file"):
            WavSource(fifo)
    finally:
        os.close(fd)


# -- stdin ----------------------------------------------------------------------------------


class Pieces(io.RawIOBase):
    """A pipe that hands over data in the given piece sizes, whatever was asked for."""

    def __init__(self, data: bytes, sizes: list[int]) -> None:
        self.data, self.sizes, self.pos, self.k = data, sizes, 0, 0

    def readable(self) -> bool:
        return True

    def read1(self, n: int = -1) -> bytes:
        want = self.sizes[self.k % len(self.sizes)]
        self.k += 1
        piece = self.data[self.pos : self.pos + min(want, n if n > 0 else want)]
        self.pos += len(piece)
        return piece


@settings(max_examples=EXAMPLES, deadline=None)
@given(data=st.binary(max_size=5000), sizes=st.lists(st.integers(1, 3001), min_size=1,
                                                      max_size=6),
       block=st.integers(1, 2000))
def test_stdin_delivers_exactly_the_whole_samples_with_contiguous_positions(data, sizes, block):
    chunks = list(StdinSource(Pieces(data, sizes), block_frames=block).chunks())
    even = data[: len(data) - len(data) % 2]
    want = np.frombuffer(even, "<i2").astype(np.float32) / 32768.0
    got = np.concatenate([c.samples for c in chunks]) if chunks else np.zeros(0, np.float32)
    assert got.dtype == np.float32 and np.array_equal(got, want)
    assert [c.start for c in chunks] == list(np.cumsum([0] + [len(c.samples) for c in chunks])
                                             [:-1])


# -- front end and pipeline -------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle() -> Iterator[Bundle]:
    import torch

    # One thread, as the daemon runs it: on a busy shared machine torch's default of one
    # thread per core spends more time waiting for a core than computing.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield load_bundle("default")
    finally:
        torch.set_num_threads(threads)


@st.composite
def _nasty_audio(draw: st.DrawFn) -> np.ndarray:
    """Up to ~2.5 s of silence, full-scale noise, clipping square waves, DC, huge values,
    NaN and infinities, in any order."""
    parts = []
    for _ in range(draw(st.integers(1, 5))):
        n = draw(st.integers(0, 12000))
        kind = draw(st.sampled_from(["silence", "noise", "square", "dc", "huge", "nonfinite"]))
        rng = np.random.default_rng(draw(st.integers(0, 99)))
        if kind == "silence":
            x = np.zeros(n)
        elif kind == "noise":
            x = rng.uniform(-1, 1, n)
        elif kind == "square":
            period = draw(st.integers(2, 400))
            amp = draw(st.sampled_from([1.0, 1.5, 32768.0]))
            x = amp * np.where((np.arange(n) // (period // 2 or 1)) % 2, 1.0, -1.0)
        elif kind == "dc":
            x = np.full(n, draw(st.floats(-2, 2)))
        elif kind == "huge":
            x = rng.choice([3e38, -3e38, 1e20, 0.0], n)
        else:
            x = rng.uniform(-0.5, 0.5, n)
            if n:
                idx = rng.integers(0, n, draw(st.integers(1, max(1, n // 50))))
                x[idx] = rng.choice([np.nan, np.inf, -np.inf], len(idx))
        parts.append(x)
    return np.concatenate(parts).astype(np.float32)


def _feed(pipeline: Pipeline, audio: np.ndarray, sizes: list[int], start: int = 0):
    """Feed ``audio`` in chunks cycling through ``sizes``; return detections and windows."""
    windows: list[GatedWindow] = []
    process = pipeline.frontend.process

    def spy(chunk: Chunk) -> list[GatedWindow]:
        out = process(chunk)
        windows.extend(out)
        return out

    pipeline.frontend.process = spy  # type: ignore[method-assign]
    dets = []
    i, k = 0, 0
    while i < len(audio):
        n = sizes[k % len(sizes)]
        dets += pipeline.process(Chunk(audio[i : i + n], start + i))
        i, k = i + n, k + 1
    pipeline.frontend.process = process  # type: ignore[method-assign]
    return dets, windows


def _check_detections(dets, bundle: Bundle, cfg: Config, end: int) -> None:
    detect = cfg.detect.for_model(bundle.threshold)  # unset: the bundle's calibrated one
    for d in dets:
        assert d.keyword in bundle.labels and d.keyword not in detect.ignore
        threshold = detect.thresholds.get(d.keyword, detect.threshold)
        assert np.isfinite(d.score) and threshold <= d.score <= 1.0 + 1e-6
        assert 0 <= d.start < d.end <= d.emit <= end


_CONFIGS = [Config().validate(),
            Config(vad=VadConfig(kind="energy")).validate(),
            Config(vad=VadConfig(kind="off")).validate()]


@settings(max_examples=EXAMPLES // 2, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(audio=_nasty_audio(), sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=5),
       which=st.integers(0, len(_CONFIGS) - 1))
def test_pipeline_survives_any_audio_in_any_chunking_and_its_features_stay_finite(
        bundle, audio, sizes, which):
    if len(audio) > 3000:  # tiny chunks on short audio only: slow, and no more revealing
        sizes = [max(s, 100) for s in sizes]
    cfg = _CONFIGS[which]
    p = Pipeline(cfg, bundle)
    p.trace = []
    dets, windows = _feed(p, audio, sizes)
    _check_detections(dets, bundle, cfg, len(audio))
    with np.errstate(invalid="ignore"):
        invalid = ~(np.abs(audio) <= 1e6)
    assert p.frontend.invalid_samples == np.count_nonzero(invalid)
    for gw in windows:
        assert np.isfinite(gw.window.features).all()
    for _, _, probs in p.trace:
        assert probs is None or (np.isfinite(probs).all() and abs(probs.sum() - 1) < 1e-3)
    # Whatever came before, the stream goes on: new audio still forms finite windows.
    after = np.random.default_rng(0).uniform(-0.3, 0.3, 32000).astype(np.float32)  # 2 s
    dets, windows = _feed(p, after, [1600], start=len(audio))
    _check_detections(dets, bundle, cfg, len(audio) + len(after))
    assert len(windows) >= 10
    assert all(np.isfinite(gw.window.features).all() for gw in windows)


def test_a_nan_sample_is_silenced_and_counted_so_features_equal_those_of_silence(caplog):
    rng = np.random.default_rng(1)
    audio = rng.uniform(-0.5, 0.5, 32000).astype(np.float32)
    poisoned = audio.copy()
    poisoned[[100, 5000, 5001, 20000]] = [np.nan, np.inf, -np.inf, np.nan]
    cleaned = np.where(np.isfinite(poisoned), poisoned, 0).astype(np.float32)

    def windows(x: np.ndarray) -> Iterator[np.ndarray]:
        fe = FrontEnd(Config().frontend, VadConfig(kind="energy"))
        for i in range(0, len(x), 700):
            for gw in fe.process(Chunk(x[i : i + 700], i)):
                yield gw.window.features
        assert fe.invalid_samples == (4 if x is poisoned else 0)

    got, want = list(windows(poisoned)), list(windows(cleaned))
    assert len(got) == len(want) > 0
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
    assert sum("replaced by silence" in r.message for r in caplog.records) == 1
    assert np.isnan(poisoned[100])  # the caller's array is not modified


def test_gate_decisions_do_not_depend_on_where_chunks_end():
    vad = VadConfig(kind="energy", hangover_ms=0, min_speech_ms=30, speech_band_ratio=0.0)
    cfg = Config().validate()
    end = 19120  # the third window's end; 19120 % 480 = 400, so a frame straddles it
    frame = end - end % 480
    audio = np.zeros(40000, np.float32)
    audio[frame : frame + 480] = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(480) / 16000)

    def opened(sizes: list[int]) -> list[int]:
        fe = FrontEnd(cfg.frontend, vad, cfg.windows.hop_frames(cfg.frontend))
        out, i, k = [], 0, 0
        while i < len(audio):
            n = sizes[k % len(sizes)]
            out += [g.window.end for g in fe.process(Chunk(audio[i : i + n], i)) if g.open]
            i, k = i + n, k + 1
        return out + [g.window.end for g in fe.flush() if g.open]

    # The straddling frame is speech: the window ending at `end` must open however the
    # audio was cut, including a chunk ending just after the window (features complete,
    # the frame not yet decided).
    assert end in opened([1600])
    for sizes in ([end, 1600], [end + 80, 1600], [end + 239, 1600], [333], [7, 4000], [40000]):
        assert opened(sizes) == opened([1600]), sizes
