"""Progress bars for the offline tools.

tqdm redraws ten times a second; into a log file (``nohup``, a CI log, the journal) each
redraw is kept, so a training run of hours would write megabytes of bars. When stderr is
not a terminal, bars are redrawn at most every :data:`LOG_INTERVAL_S` seconds instead.
"""

from __future__ import annotations

import sys
from typing import Any

LOG_INTERVAL_S = 30.0


def tqdm(*args: Any, **kwargs: Any) -> Any:
    """``tqdm.tqdm(*args, **kwargs)``, redrawn every :data:`LOG_INTERVAL_S` seconds when
    stderr is not a terminal (unless ``mininterval`` is given)."""
    from tqdm import tqdm as _tqdm

    stream = kwargs.get("file") or sys.stderr
    if not (hasattr(stream, "isatty") and stream.isatty()):
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
        # tqdm's monitor thread redraws a bar idle for maxinterval (10 s) regardless.
        kwargs.setdefault("maxinterval", LOG_INTERVAL_S)
    return _tqdm(*args, **kwargs)
