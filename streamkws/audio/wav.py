"""Reading audio files: a small RIFF/WAVE parser plus conversion to 16 kHz mono float32.

The daemon reads WAV with no dependency beyond numpy and soxr (it targets small boards),
and handles what ``wave`` from the standard library refuses: float samples, 24-bit and
WAVE_FORMAT_EXTENSIBLE headers. Other formats (FLAC, Ogg, ...) are read through
``soundfile`` when the ``train`` extra is installed.
"""

from __future__ import annotations

import logging
import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from streamkws import SAMPLE_RATE
from streamkws.audio.base import ThreadedSource
from streamkws.errors import AudioError

log = logging.getLogger(__name__)

_PCM = 1
_FLOAT = 3
_EXTENSIBLE = 0xFFFE
_UNKNOWN_SIZES = (0, 0xFFFFFFFF)  # written by tools that stream a WAV of unknown length
# Other writers put a large placeholder instead: sox to a pipe writes 0x7FFFF000, arecord
# about 2 GiB. Bigger than the file, such a size means "to end of file", not truncation.
_PLACEHOLDER_MIN = 0x7FFFF000
_FMT_MAX = 1024  # 'fmt ' is 16 to 40 bytes; never trust its size field for an allocation
RATE_RANGE = (1000, 768_000)
"""Sample rates accepted. Far below, resampling to 16 kHz would multiply a small file into
gigabytes (a 1 Hz header asks for 16000 output samples per input frame)."""

# Recognised so the error says what the file is, not only what it is not.
_MAGIC = ((b"ID3", "MP3"), (b"\xff\xfb", "MP3"), (b"\xff\xf3", "MP3"), (b"\xff\xf2", "MP3"),
          (b"OggS", "Ogg"), (b"fLaC", "FLAC"), (b"FORM", "AIFF"), (b".snd", "Sun/NeXT audio"),
          (b"RF64", "RF64 (64-bit WAV)"))


@dataclass(frozen=True)
class WavInfo:
    sample_rate: int
    channels: int
    bits: int
    is_float: bool
    data_offset: int
    data_bytes: int  # whole frames only

    @property
    def block_align(self) -> int:
        return self.channels * self.bits // 8

    @property
    def frames(self) -> int:
        return self.data_bytes // self.block_align

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate


def read_wav_info(f: BinaryIO, name: str) -> WavInfo:
    """Parse the header of an open WAV file, leaving ``f`` at the start of the samples."""
    st = os.fstat(f.fileno())
    if not stat.S_ISREG(st.st_mode):
        # Sizes and seeking need a regular file; raw audio streams through `--source -`.
        raise AudioError(f"{name}: not a regular file (pipe raw s16le 16 kHz mono audio "
                         "to `--source -` instead)")
    size = st.st_size
    head = f.read(12)
    if len(head) == 0:
        raise AudioError(f"{name}: empty file")
    if len(head) < 12 or head[:4] not in (b"RIFF", b"RIFX") or head[8:12] != b"WAVE":
        kind = next((k for magic, k in _MAGIC if head.startswith(magic)), None)
        if kind is None and head[4:8] == b"ftyp":
            kind = "MP4/M4A"
        what = f"it looks like {kind}; convert it to WAV" if kind else "no RIFF/WAVE header"
        raise AudioError(f"{name}: not a WAV file ({what})")
    if head[:4] == b"RIFX":
        raise AudioError(f"{name}: big-endian (RIFX) WAV is not supported")
    fmt: tuple[int, int, int, int] | None = None
    while True:
        hdr = f.read(8)
        if len(hdr) < 8:
            what = "no 'data' chunk" if fmt else "no 'fmt ' chunk"
            raise AudioError(f"{name}: truncated or malformed WAV ({what})")
        cid, clen = struct.unpack("<4sI", hdr)
        if cid == b"fmt ":
            body = f.read(min(clen, _FMT_MAX))
            if len(body) < 16:
                raise AudioError(f"{name}: truncated or malformed WAV ('fmt ' chunk too short)")
            f.seek(clen + (clen & 1) - len(body), os.SEEK_CUR)  # the rest and the pad byte
            tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
            if tag == _EXTENSIBLE and len(body) >= 26:
                tag = struct.unpack("<H", body[24:26])[0]  # first two bytes of the GUID
            fmt = (tag, channels, rate, bits)
        elif cid == b"data":
            if fmt is None:
                raise AudioError(f"{name}: malformed WAV ('data' before 'fmt ')")
            offset = f.tell()
            present = size - offset
            if clen in _UNKNOWN_SIZES or (clen >= _PLACEHOLDER_MIN and clen > present):
                clen = present
            elif clen > present:
                raise AudioError(
                    f"{name}: truncated WAV: header promises {clen} bytes of audio, "
                    f"the file holds {present}"
                )
            return _make_info(name, fmt, offset, clen)
        else:
            f.seek(clen + (clen & 1), os.SEEK_CUR)


def _make_info(name: str, fmt: tuple[int, int, int, int], offset: int, nbytes: int) -> WavInfo:
    tag, channels, rate, bits = fmt
    if tag not in (_PCM, _FLOAT):
        raise AudioError(f"{name}: unsupported WAV encoding (format tag {tag}); use PCM or float")
    if channels < 1:
        raise AudioError(f"{name}: invalid WAV header (0 channels)")
    if not RATE_RANGE[0] <= rate <= RATE_RANGE[1]:
        lo, hi = RATE_RANGE
        raise AudioError(f"{name}: unsupported sample rate {rate} Hz (must be {lo} to {hi} Hz)")
    if (tag == _PCM and bits not in (8, 16, 24, 32)) or (tag == _FLOAT and bits not in (32, 64)):
        kind = "float" if tag == _FLOAT else "PCM"
        raise AudioError(f"{name}: unsupported sample width ({bits}-bit {kind})")
    align = channels * bits // 8
    if nbytes % align:
        log.warning("%s: ignoring %d trailing bytes (a partial frame)", name, nbytes % align)
    return WavInfo(rate, channels, bits, tag == _FLOAT, offset, nbytes - nbytes % align)


def decode_frames(raw: bytes, info: WavInfo) -> np.ndarray:
    """Bytes of whole frames -> float32 array of shape (frames, channels) in [-1, 1]."""
    return _decode(raw, info)[0]


def sanitize(x: np.ndarray) -> tuple[np.ndarray, int]:
    """Float audio clipped to [-1, 1] with NaN and infinities made silence (0).

    Returns the cleaned float32 array and how many samples were not finite. A float file
    can hold anything; one NaN would otherwise turn every feature frame and posterior it
    touches into NaN, and values far beyond full scale overflow the power spectrum.
    """
    bad = ~np.isfinite(x)
    n_bad = int(np.count_nonzero(bad))
    if n_bad:
        x = np.where(bad, 0.0, x)
    # Clipping before the cast: float64 samples can lie beyond the float32 range.
    return np.clip(x, -1.0, 1.0).astype(np.float32), n_bad


def _decode(raw: bytes, info: WavInfo) -> tuple[np.ndarray, int]:
    """Like :func:`decode_frames`, also counting the non-finite samples replaced."""
    n_bad = 0
    if info.is_float:
        x, n_bad = sanitize(np.frombuffer(raw, dtype="<f4" if info.bits == 32 else "<f8"))
    elif info.bits == 8:  # 8-bit WAV is unsigned
        x = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif info.bits == 16:
        x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    elif info.bits == 24:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = np.where(v >= 1 << 23, v - (1 << 24), v)
        x = v.astype(np.float32) / float(1 << 23)
    else:
        x = np.frombuffer(raw, dtype="<i4").astype(np.float32) / float(1 << 31)
    return x.reshape(-1, info.channels), n_bad


def to_mono(frames: np.ndarray) -> np.ndarray:
    if frames.ndim == 1:
        return frames.astype(np.float32, copy=False)
    if frames.shape[1] == 1:
        return np.ascontiguousarray(frames[:, 0], dtype=np.float32)
    return frames.mean(axis=1, dtype=np.float32)


class StreamResampler:
    """Resamples a stream chunk by chunk with soxr, keeping the filter state between calls."""

    def __init__(self, in_rate: int, out_rate: int = SAMPLE_RATE) -> None:
        import soxr

        self.in_rate, self.out_rate = in_rate, out_rate
        self._rs = soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32", quality="HQ")

    def process(self, x: np.ndarray, last: bool = False) -> np.ndarray:
        return self._rs.resample_chunk(np.ascontiguousarray(x, dtype=np.float32), last=last)


def iter_wav(path: str | Path, block_frames: int = 1600) -> Iterator[np.ndarray]:
    """Yield 16 kHz mono float32 blocks of a WAV file, converting rate and channels."""
    name = str(path)
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed in finally, generator-scoped
    except OSError as exc:
        raise AudioError(f"{name}: cannot open ({exc.strerror})") from None
    try:
        info = read_wav_info(f, name)
        rs = StreamResampler(info.sample_rate) if info.sample_rate != SAMPLE_RATE else None
        remaining = info.data_bytes
        step = block_frames * info.block_align
        frames_read = 0
        warned = False
        while remaining > 0:
            raw = f.read(min(step, remaining))
            if not raw:
                raise AudioError(f"{name}: file ended early (was it truncated while read?)")
            remaining -= len(raw)
            usable = len(raw) - len(raw) % info.block_align
            frames, n_bad = _decode(raw[:usable], info)
            if n_bad and not warned:
                log.warning("%s: NaN or infinite samples (first near %.2f s) replaced by "
                            "silence", name, frames_read / info.sample_rate)
                warned = True
            frames_read += len(frames)
            mono = to_mono(frames)
            # Resampling full-scale audio overshoots slightly (Gibbs ringing); clipping
            # keeps every source's samples within [-1, 1].
            yield np.clip(rs.process(mono), -1.0, 1.0) if rs else mono
        if rs:
            yield np.clip(rs.process(np.zeros(0, np.float32), last=True), -1.0, 1.0)
    finally:
        f.close()


def load_audio(path: str | Path) -> np.ndarray:
    """Read a whole audio file as 16 kHz mono float32.

    WAV is parsed here; anything else goes through ``soundfile`` if it is installed.
    """
    p = Path(path)
    try:
        with open(p, "rb") as f:
            is_wav = f.read(4) in (b"RIFF", b"RIFX")
    except FileNotFoundError:
        raise AudioError(f"{p}: no such file") from None
    except OSError as exc:  # a directory, no permission, ...
        raise AudioError(f"{p}: cannot open ({exc.strerror})") from None
    if is_wav or p.suffix.lower() == ".wav":
        blocks = list(iter_wav(p, block_frames=1 << 16))
        return np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
    return _load_with_soundfile(p)


def _load_with_soundfile(p: Path) -> np.ndarray:
    try:
        import soundfile
    except ImportError:
        raise AudioError(
            f"{p}: not a WAV file; reading other formats needs soundfile "
            "(pip install 'streamkws[train]')"
        ) from None
    try:
        data, rate = soundfile.read(str(p), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises several types for unreadable input
        raise AudioError(f"{p}: unreadable audio ({exc})") from None
    if not RATE_RANGE[0] <= rate <= RATE_RANGE[1]:
        raise AudioError(f"{p}: unsupported sample rate {rate} Hz")
    mono, n_bad = sanitize(to_mono(data))
    if n_bad:
        log.warning("%s: %d NaN or infinite samples replaced by silence", p, n_bad)
    if rate != SAMPLE_RATE:
        mono = np.clip(StreamResampler(rate).process(mono, last=True), -1.0, 1.0)
    return mono


class WavSource(ThreadedSource):
    """Replays a WAV file, paced like a microphone (``realtime``) or as fast as possible."""

    def __init__(self, path: str | Path, realtime: bool = False, block_frames: int = 1600):
        super().__init__(realtime=realtime)
        self.path = Path(path)
        self.name = f"wav:{path}"
        self.block_frames = block_frames
        # Fail at construction, not in the reader thread, so a bad file is a clear error.
        try:
            f = open(self.path, "rb")  # noqa: SIM115
        except OSError as exc:
            raise AudioError(f"{self.path}: cannot open ({exc.strerror})") from None
        with f:
            self.info = read_wav_info(f, str(self.path))

    def blocks(self) -> Iterator[np.ndarray]:
        return iter_wav(self.path, self.block_frames)
