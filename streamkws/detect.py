"""From per-window posteriors to detections: smoothing, thresholds, one event per utterance.

Overlapping windows see one spoken word several times (a 1-s window every 100 ms), so a
keyword's smoothed posterior stays high for a run of windows. A run fires once, when it
has lasted ``min_windows``; it cannot fire again until the posterior falls back below the
threshold, and the same keyword then stays quiet for ``refractory_ms``. While one
keyword's run is firing, other keywords cannot fire: one utterance, one detection.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from streamkws.config import DetectConfig


@dataclass(frozen=True)
class Detection:
    keyword: str
    score: float
    start: int
    """Stream sample where the utterance is estimated to start."""
    end: int
    """Stream sample where it is estimated to end."""
    emit: int
    """Stream sample at which the decision was made (the end of the deciding window)."""


class Smoother:
    """Feed one window at a time (probabilities, or None when the model did not run)."""

    def __init__(self, labels: list[str], cfg: DetectConfig, sample_rate: int = 16000) -> None:
        cfg = cfg.for_model(None).validate()  # the daemon passes the model's threshold in
        self.labels = list(labels)
        self.cfg = cfg
        self.sample_rate = sample_rate
        self.keywords = [i for i, lb in enumerate(labels) if lb not in cfg.ignore]
        unknown = set(cfg.thresholds) - {labels[i] for i in self.keywords}
        if unknown:
            from streamkws.errors import ConfigError

            name = sorted(unknown)[0]
            if name in labels:
                raise ConfigError(f"detect.thresholds.{name}",
                                  f"'{name}' is in detect.ignore, so it never publishes")
            raise ConfigError(f"detect.thresholds.{name}",
                              f"the model has no keyword '{name}' (it knows: "
                              f"{', '.join(labels[i] for i in self.keywords)})")
        self.thresholds = np.array([cfg.thresholds.get(labels[i], cfg.threshold)
                                    for i in self.keywords])
        self.refractory = int(cfg.refractory_ms * sample_rate / 1000)
        self.reset()

    def reset(self) -> None:
        k = len(self.keywords)
        self._history: deque[np.ndarray] = deque(maxlen=self.cfg.average_windows)
        self._run = np.zeros(k, dtype=np.int64)
        self._run_first: list[tuple[int, int] | None] = [None] * k
        self._run_last: list[tuple[int, int] | None] = [None] * k
        self._run_peak = np.zeros(k)
        self._fired = np.zeros(k, dtype=bool)
        self._quiet_until = np.full(k, -(1 << 62), dtype=np.int64)

    def carry_over(self, old: Smoother) -> None:
        """Go on from ``old``'s state (a reload), so that an utterance it was hearing or
        had just reported is not reported again. With other keywords, only the quiet
        periods of the keywords both have carry over."""
        mine = [self.labels[k] for k in self.keywords]
        theirs = [old.labels[k] for k in old.keywords]
        shift = self.refractory - old.refractory  # the new length, from the old detection
        if mine == theirs:
            self._history = deque(old._history, maxlen=self.cfg.average_windows)
            self._run, self._run_peak = old._run.copy(), old._run_peak.copy()
            self._run_first, self._run_last = list(old._run_first), list(old._run_last)
            self._fired = old._fired.copy()
            self._quiet_until = old._quiet_until + shift
            return
        for i, label in enumerate(mine):
            if label in theirs:
                self._quiet_until[i] = old._quiet_until[theirs.index(label)] + shift

    def push(self, probs: np.ndarray | None, start: int, end: int) -> Detection | None:
        """One window's class probabilities (None: gate closed); maybe a detection."""
        kw = np.zeros(len(self.keywords)) if probs is None else probs[self.keywords]
        self._history.append(kw)
        smoothed = np.mean(self._history, axis=0)
        above = smoothed >= self.thresholds
        # Runs end when the posterior falls below threshold; only then can a keyword
        # that already fired fire again.
        ended = ~above
        self._run[ended] = 0
        self._fired[ended] = False
        self._run_peak[ended] = 0.0
        in_utterance = self._fired.any()
        for i in np.flatnonzero(above):
            if self._run[i] == 0:
                self._run_first[i] = (start, end)
                # A rival rising while a detection's run lasts is the same utterance.
                self._fired[i] = in_utterance
            self._run[i] += 1
            self._run_last[i] = (start, end)
            self._run_peak[i] = max(self._run_peak[i], smoothed[i])
        if self._fired.any():
            return None
        ready = above & (self._run >= self.cfg.min_windows) & (end >= self._quiet_until)
        if not ready.any():
            return None
        i = int(np.argmax(np.where(ready, smoothed, -1.0)))
        self._fired[above] = True  # the utterance belongs to the winner, not to rivals
        self._quiet_until[i] = end + self.refractory
        first, last = self._run_first[i], self._run_last[i]
        assert first is not None and last is not None
        # The word lies in every window that recognised it: their intersection.
        lo, hi = last[0], first[1]
        if lo >= hi:  # a long run: fall back to the span of the latest window
            lo, hi = last
        return Detection(self.labels[self.keywords[i]], float(self._run_peak[i]), lo, hi, end)
