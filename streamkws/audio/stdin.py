"""Raw audio on standard input: signed 16-bit little-endian, 16 kHz, mono."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np

from streamkws.audio.base import ThreadedSource

log = logging.getLogger(__name__)


class StdinSource(ThreadedSource):
    """Reads s16le until end of file, which ends the stream cleanly.

    By default a replay (it waits for the consumer, nothing is skipped); ``live=True`` for a
    producer that captures in real time and cannot be made to wait."""

    name = "stdin"
    # A pipe cannot be reopened, but a producer that hangs (arecord on a wedged device)
    # must not look like a quiet room: the daemon reports the stall.
    reports_stalls = True

    def __init__(
        self, stream: BinaryIO | None = None, realtime: bool = False, block_frames: int = 1600,
        live: bool = False,
    ):
        super().__init__(realtime=realtime)
        # Live: a full ring drops (and counts) audio like a microphone's instead of making
        # the producer wait, so the daemon treats the stream as live and skips windows.
        self.blocks_on_full_ring = not live
        self.stream = stream if stream is not None else sys.stdin.buffer
        self.block_bytes = block_frames * 2

    def blocks(self) -> Iterator[np.ndarray]:
        carry = b""
        while True:
            # read1 returns what a pipe has now instead of waiting for a full block, so a
            # live producer (arecord | streamkws run --source -) is not delayed.
            reader = getattr(self.stream, "read1", self.stream.read)
            data = reader(self.block_bytes)
            if not data:
                break
            data = carry + data
            usable = len(data) - len(data) % 2
            carry = data[usable:]
            if usable:
                yield np.frombuffer(data[:usable], dtype="<i2").astype(np.float32) / 32768.0
        if carry:
            log.warning("stdin ended with half a sample (odd byte count); ignored it")
