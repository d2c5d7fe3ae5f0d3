"""Audio sources, the ring buffer between capture and processing, and file reading."""

from streamkws.audio.base import AudioSource, ThreadedSource
from streamkws.audio.chunk import Chunk
from streamkws.audio.ring import RingBuffer

__all__ = ["AudioSource", "Chunk", "RingBuffer", "ThreadedSource"]
