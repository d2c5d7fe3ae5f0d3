"""Training-time augmentation: on the waveform (shift, speed, gain, noise) and on the
log-Mel features (SpecAugment masks).

Every random choice comes from the caller's ``numpy.random.Generator``, so a seeded
training run is repeatable.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from streamkws.features import warp_bands


@dataclass(frozen=True)
class AugmentConfig:
    shift_ms: float = 150.0
    """Random time shift of up to this much either way (zero fill)."""
    speed_range: float = 0.12
    """Speed/pitch factor drawn from [1 - r, 1 + r] (resampling changes both, as tape does)."""
    speed_prob: float = 0.6
    gain_db: float = 8.0
    """Random gain within +-gain_db."""
    noise_prob: float = 0.85
    snr_db: tuple[float, float] = (0.0, 25.0)
    silence_gain_db: tuple[float, float] = (-40.0, 6.0)
    """Level range of _silence_ examples, from near-silent rooms to loud noise."""
    reverse_as_unknown: float = 0.0
    """Share of keyword examples played backwards and relabelled ``_unknown_``: speech with
    a keyword's sounds that is not the keyword, the hardest negatives the data lacks."""
    time_masks: int = 2
    time_mask_frames: int = 12
    freq_masks: int = 2
    freq_mask_bins: int = 6
    warp_range: float = 0.0
    """Vocal-tract length: each example's frequency axis is scaled by a factor drawn from
    [1 - r, 1 + r] (0: off). Unlike ``speed_range`` it leaves timing and pitch alone and
    moves only the formants, as a longer or shorter vocal tract does."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def off(cls) -> AugmentConfig:
        return cls(shift_ms=0, speed_prob=0, gain_db=0, noise_prob=0, time_masks=0,
                   freq_masks=0, silence_gain_db=(0.0, 0.0), reverse_as_unknown=0.0)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x.astype(np.float64) ** 2)) + 1e-9)


def augment_waveforms(
    batch: np.ndarray,
    is_silence: np.ndarray,
    noise: list[np.ndarray],
    cfg: AugmentConfig,
    rng: np.random.Generator,
) -> np.ndarray:
    """Augment a batch of 1-s clips ``(B, n)``; returns a new float32 array."""
    out = np.empty_like(batch)
    n = batch.shape[1]
    grid = np.arange(n, dtype=np.float64)
    max_shift = int(cfg.shift_ms * 16)
    for i, x in enumerate(batch):
        x = x.astype(np.float32, copy=True)
        if not is_silence[i]:
            if cfg.speed_prob and rng.random() < cfg.speed_prob:
                factor = 1.0 + rng.uniform(-cfg.speed_range, cfg.speed_range)
                # Playing faster by `factor` reads the source at factor-spaced points;
                # centring keeps the word where it was before the shift below.
                src = (grid - n / 2) * factor + n / 2
                x = np.interp(src, grid, x, left=0.0, right=0.0).astype(np.float32)
            if max_shift:
                s = int(rng.integers(-max_shift, max_shift + 1))
                x = np.roll(x, s)
                if s > 0:
                    x[:s] = 0
                elif s < 0:
                    x[s:] = 0
            if cfg.gain_db:
                x *= 10 ** (rng.uniform(-cfg.gain_db, cfg.gain_db) / 20)
            if noise and rng.random() < cfg.noise_prob:
                seg = _noise_segment(noise, n, rng)
                snr = rng.uniform(*cfg.snr_db)
                x = x + seg * (_rms(x) / _rms(seg)) * 10 ** (-snr / 20)
        else:
            if noise and rng.random() < 0.5:
                x = _noise_segment(noise, n, rng)
            lo, hi = cfg.silence_gain_db
            target = 10 ** (rng.uniform(lo, hi) / 20) * 0.05
            x = x * (target / _rms(x)) if hi > lo else x
        out[i] = np.clip(x, -1.0, 1.0)
    return out


def _noise_segment(noise: list[np.ndarray], n: int, rng: np.random.Generator) -> np.ndarray:
    rec = noise[int(rng.integers(len(noise)))]
    start = int(rng.integers(0, len(rec) - n + 1))
    return rec[start : start + n]


def warp_frequencies(feats: np.ndarray, centres_hz: np.ndarray, cfg: AugmentConfig,
                     rng: np.random.Generator) -> np.ndarray:
    """Scale the frequency axis of log-Mel features ``(B, T, F)`` by a random factor per
    example, in place: band ``i`` takes the value at ``centres_hz[i] / factor``,
    interpolated between the bands around it (the edges repeat)."""
    if not cfg.warp_range:
        return feats
    for i in range(len(feats)):
        lo, hi, w = warp_bands(centres_hz, 1.0 + rng.uniform(-cfg.warp_range, cfg.warp_range))
        feats[i] = feats[i][:, lo] * (1 - w) + feats[i][:, hi] * w
    return feats


def spec_augment(
    feats: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator, fill: np.ndarray
) -> np.ndarray:
    """Time and frequency masks on features ``(B, T, F)``, in place; masked cells take
    ``fill`` (one value per mel bin)."""
    b, t, f = feats.shape
    for i in range(b):
        for _ in range(cfg.time_masks):
            w = int(rng.integers(0, cfg.time_mask_frames + 1))
            s = int(rng.integers(0, max(1, t - w)))
            feats[i, s : s + w, :] = fill
        for _ in range(cfg.freq_masks):
            w = int(rng.integers(0, cfg.freq_mask_bins + 1))
            s = int(rng.integers(0, max(1, f - w)))
            feats[i, :, s : s + w] = fill[s : s + w]
    return feats
