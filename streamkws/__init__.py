"""streamkws: an always-on streaming keyword spotter for Linux edge devices."""

__version__ = "0.1.0"

SAMPLE_RATE = 16000
"""Every stage after the source works on 16 kHz mono float32 audio in [-1, 1]."""
