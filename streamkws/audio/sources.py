"""Turning a source string (``mic:1``, ``wav:x.wav``, ``-``, ``demo``) into a source."""

from __future__ import annotations

from pathlib import Path

from streamkws.audio.base import AudioSource
from streamkws.errors import AudioError

DEMO_WAV = Path(__file__).resolve().parent.parent / "data" / "demo.wav"


def open_source(
    spec: str, realtime: bool = True, block_ms: int = 20, stdin_live: bool = False
) -> AudioSource:
    """Parse a source string and open it (files are checked now, devices opened on start).

    ``realtime`` paces files; ``stdin_live`` makes stdin a live stream (see
    ``AudioConfig.stdin_live``)."""
    block = max(1, 16 * block_ms)
    if not realtime:
        # Replayed as fast as possible, a file's block size only sets per-call overhead.
        block = max(block, 1600)
    if spec == "-":
        from streamkws.audio.stdin import StdinSource

        return StdinSource(realtime=False, block_frames=block, live=stdin_live)
    if spec.startswith("wav:") or spec == "demo":
        from streamkws.audio.wav import WavSource

        if spec == "demo":
            if not DEMO_WAV.is_file():
                raise AudioError(f"the demo recording is missing from the package ({DEMO_WAV})")
            path = DEMO_WAV
        else:
            if not spec[4:]:
                raise AudioError("wav: needs a file's path, e.g. wav:meeting.wav")
            path = Path(spec[4:])
        source = WavSource(path, realtime=realtime, block_frames=block)
        if spec == "demo":
            source.name = "demo"
        return source
    if spec == "mic" or spec.startswith("mic:"):
        from streamkws.audio.mic import MicSource

        device = spec[4:] if spec.startswith("mic:") else None
        return MicSource(device=device, block_ms=block_ms)
    raise AudioError(
        f"unknown audio source {spec!r}: use mic, mic:<index or name>, wav:<path>, - or demo"
    )
