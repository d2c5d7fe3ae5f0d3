"""The operating threshold a shipped model carries: chosen on held-out streams, surely
within the false-alarm budget.

``make_default`` and ``make_accurate`` both calibrate with this one rule, on the same
streams, and store the result as the bundle's ``detect.threshold``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from streamkws.bundle import Bundle
from streamkws.errors import StreamKWSError

CALIBRATION_SEEDS = (1, 2, 3, 4, 5, 6)
"""Held-out streams for the threshold; the end-to-end test's stream (seed 0) stays out."""

GRID = tuple(round(float(t), 2) for t in np.arange(0.50, 0.99, 0.02))

FA_BUDGET_PER_5_MIN = 1.0

FA_CONFIDENCE = 0.9
"""How sure the calibration must be that a threshold keeps within the false-alarm budget."""


def poisson_upper(k: int, confidence: float = FA_CONFIDENCE) -> float:
    """The one-sided upper confidence limit of a Poisson mean after ``k`` events: the mean
    under which ``k`` or fewer events would have had probability ``1 - confidence``."""
    def at_most_k(mean: float) -> float:
        # Summed in logs: exp(-mean) alone underflows to 0 beyond a mean of ~745.
        if mean <= 0:
            return 1.0
        logs = [i * math.log(mean) - mean - math.lgamma(i + 1) for i in range(k + 1)]
        top = max(logs)
        return math.exp(top) * math.fsum(math.exp(v - top) for v in logs)

    lo, hi = 0.0, k + 10.0 * math.sqrt(k + 1) + 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if at_most_k(mid) > 1 - confidence else (lo, mid)
    return hi


def choose_threshold(tradeoff: list, budget: float = FA_BUDGET_PER_5_MIN,
                     confidence: float = FA_CONFIDENCE) -> tuple:
    """The row with the most recall whose false-alarm rate is within ``budget`` per 5 minutes
    with ``confidence``, not merely on average.

    A threshold is judged on some twenty minutes of other words, where 3 false alarms
    (0.7 per 5 minutes) are as consistent with a true rate of 1.5 as with 0.5; the rate
    counted is the Poisson upper limit of the false alarms seen. Ties go to the higher
    threshold: the same recall with a margin against false alarms.
    """
    within = [r for r in tradeoff if poisson_upper(r[4], confidence) / r[5] * 5 <= budget]
    if not within:
        need = poisson_upper(0, confidence) * 5 / budget
        raise StreamKWSError(
            f"no threshold up to {tradeoff[-1][0]} keeps false alarms within {budget:g} per "
            f"5 minutes with {confidence:.0%} confidence on the calibration streams "
            f"({tradeoff[-1][5]:.1f} min of other audio; even with no false alarm that "
            f"takes {need:.1f} min)")
    return max(within, key=lambda r: (r[1], r[0]))


def stream_tradeoff(bundle: Bundle, data: Path, seeds: tuple[int, ...] = CALIBRATION_SEEDS,
                    thresholds: tuple[float, ...] = GRID) -> list:
    """Recall and false alarms per 5 minutes across thresholds, on held-out streams.

    Each stream holds 30 keywords and 45 other words of validation-split speakers over real
    noise (``streams.heldout_stream``); the end-to-end test uses seed 0, kept out of this.
    Each runs once through the daemon's pipeline (``stream_eval``), then every threshold
    is re-decided with its smoother.
    """
    import tempfile

    from streamkws.config import Config
    from streamkws.tools.stream_eval import Utterance, pool, run_pipeline, sweep
    from streamkws.tools.streams import heldout_split_problem, heldout_stream

    problem = heldout_split_problem(bundle)
    if problem:
        raise StreamKWSError(f"cannot calibrate on held-out streams: {problem}")
    cfg = Config().validate()
    streams = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            wav, placed = heldout_stream(data, Path(tmp) / f"{seed}.wav", 3, 45, seed=seed)
            truth = [Utterance(p.word, p.start, p.end) for p in placed]
            streams.append((run_pipeline(cfg, bundle, wav, progress=False), truth))
    # One sweep per stream, then pooled: the Poisson rule needs counts, not rates.
    return [(thr, hits / n, hits, n, false, minutes) for thr, hits, n, false, minutes
            in pool([sweep(run, truth, cfg.detect, thresholds) for run, truth in streams])]


def detect_meta(row: tuple) -> dict:
    """What a bundle stores of its calibration (``meta["detect"]``)."""
    thr, recall, _, _, false, minutes = row
    return {"threshold": thr,
            "calibration": (f"most recall within {FA_BUDGET_PER_5_MIN:g} false alarm per 5 min "
                            f"({FA_CONFIDENCE:.0%} upper limit) on held-out streams (seeds "
                            f"{', '.join(map(str, CALIBRATION_SEEDS))}): recall {recall:.3f}, "
                            f"{false} false in {minutes:.1f} min")}


def rule_in_words() -> str:
    return (f"the most recall whose false alarms stay within {FA_BUDGET_PER_5_MIN:g} per "
            f"5 minutes with {FA_CONFIDENCE:.0%} confidence (the Poisson upper limit of the "
            "count seen, last column; ties to the higher threshold) on "
            f"{len(CALIBRATION_SEEDS)} held-out streams (30 keywords and 45 other words each, "
            "from validation-split speakers, each word at -26 +- 3 dBFS over real noise at "
            "20 dB SNR; seeds " + ", ".join(map(str, CALIBRATION_SEEDS)) +
            ", the end-to-end test's stream kept out)")


def table(tradeoff: list, stored: float) -> list[str]:
    """The tradeoff as a model card's markdown table."""
    return ["| threshold | recall | false alarms | per 5 min of other audio | "
            f"{FA_CONFIDENCE:.0%} upper limit |",
            "|---|---|---|---|---|",
            *[f"| {t:.2f}{' (stored)' if t == stored else ''} | {r:.3f} ({h}/{n}) | {f} in "
              f"{m:.1f} min | {f / m * 5:.2f} | {poisson_upper(f) / m * 5:.2f} |"
              for t, r, h, n, f, m in tradeoff]]


def print_tradeoff(tradeoff: list, stored: float) -> None:
    for t, r, h, k, f, m in tradeoff:
        mark = "  <- stored" if t == stored else ""
        print(f"threshold {t:.2f}: recall {r:.3f} ({h}/{k}), {f} false in {m:.1f} min "
              f"({f / m * 5:.2f} per 5 min, upper {poisson_upper(f) / m * 5:.2f}){mark}")
