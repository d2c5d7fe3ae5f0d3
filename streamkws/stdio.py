"""What a command does when the reader of its standard output goes away."""

from __future__ import annotations

import os
import sys
from typing import TextIO


def silence_stdout(out: TextIO) -> None:
    """After a ``BrokenPipeError`` on ``out`` (``streamkws run | head -1``): point the real
    stdout at /dev/null, so Python's flush at exit does not complain about the pipe."""
    if out is sys.stdout:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
