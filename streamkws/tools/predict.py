"""``streamkws predict`` and ``streamkws audit-data``: a model's view of single files.

A recording is rarely a 1-s clip with the word in the middle, and a keyword model trained
on centred words misjudges an off-centre one; so ``predict`` first locates the word with
the VAD and centres a 1-s crop on it, as the daemon's windows would eventually.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamkws.audio.wav import load_audio
from streamkws.bundle import Bundle
from streamkws.data import AUDIO_SUFFIXES, CLIP_SAMPLES, ClipCache, load_dataset
from streamkws.errors import AudioError, StreamKWSError
from streamkws.features import LogMel
from streamkws.tools.evaluate import predict_clips
from streamkws.vad import VadConfig, make_vad

log = logging.getLogger(__name__)


def centre_on_speech(x: np.ndarray, n: int = CLIP_SAMPLES) -> tuple[np.ndarray, int]:
    """A crop of ``n`` samples centred on the speech in ``x``, and the crop's start. In a
    recording longer than two crops, on the loudest speech: the centre of all of it would
    fall between words."""
    vad = make_vad(VadConfig(kind="webrtc", aggressiveness=2, hangover_ms=0))
    fs = vad.frame_samples
    frames = len(x) // fs
    if frames == 0:
        return np.pad(x, (0, n - len(x))), 0
    speech = vad.process(x[: frames * fs])
    energy = (x[: frames * fs].reshape(frames, fs).astype(np.float64) ** 2).mean(1)
    weights = energy * speech if speech.any() else energy
    if weights.sum() <= 0:
        weights = np.ones(frames)
    w = n // fs
    if len(x) > 2 * n and frames > w:
        sums = np.convolve(weights, np.ones(w), mode="valid")
        first = int(sums.argmax())
        if sums[first] > 0:
            mask = np.zeros(frames)
            mask[first : first + w] = 1.0
            weights = weights * mask
    centre = int(((np.arange(frames) + 0.5) * fs * weights).sum() / weights.sum())
    start = centre - n // 2
    padded = np.pad(x, (n, n))
    return padded[start + n : start + 2 * n], start


@dataclass
class Prediction:
    path: str
    label: str
    confidence: float
    crop_start_s: float
    probabilities: dict[str, float]


def predict_files(bundle: Bundle, paths: list[Path]) -> tuple[list[Prediction], list[str]]:
    logmel = LogMel(bundle.frontend)
    out, errors = [], []
    for p in paths:
        try:
            audio = load_audio(p)
            if len(audio) == 0:
                # Padding would make it a confident _silence_: say there was nothing.
                raise AudioError(f"{p}: holds no audio (0 samples)")
            crop, start = centre_on_speech(audio)
            if len(audio) > 2 * CLIP_SAMPLES:
                log.warning("%s: %.1f s long; predict labels the one second around its "
                            "loudest speech (for recordings, stream-eval or run --source "
                            "wav:%s)", p, len(audio) / 16000, p)
        except AudioError as exc:
            errors.append(str(exc))
            continue
        probs = bundle.predict(logmel(crop)[: bundle.frontend.window_frames])
        k = int(probs.argmax())
        out.append(Prediction(str(p), bundle.labels[k], round(float(probs[k]), 4),
                              round(start / 16000, 3),
                              {lb: round(float(v), 4) for lb, v in zip(bundle.labels, probs,
                                                                       strict=True)}))
    return out, errors


def expand_paths(specs: list[str]) -> list[Path]:
    paths: list[Path] = []
    for s in specs:
        p = Path(s)
        if p.is_dir():
            paths += sorted(q for q in p.rglob("*") if q.suffix.lower() in AUDIO_SUFFIXES)
        elif p.exists():
            paths.append(p)
        else:
            raise StreamKWSError(f"{p}: no such file or folder")
    if not paths:
        raise StreamKWSError("no audio files found")
    return paths


def plot_prediction(bundle: Bundle, pred: Prediction, out: Path) -> None:
    from streamkws.tools import pyplot

    plt = pyplot()

    crop, _ = centre_on_speech(load_audio(pred.path))
    feats = LogMel(bundle.frontend)(crop)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    im = ax.imshow(feats.T, origin="lower", aspect="auto", cmap="magma",
                   extent=(0, len(feats) * bundle.frontend.hop_ms / 1000, 0, feats.shape[1]))
    ax.set_xlabel("time (s)")
    ax.set_ylabel("mel bin")
    ax.set_title(f"{Path(pred.path).name}: {pred.label} ({pred.confidence:.2f})")
    fig.colorbar(im, ax=ax, label="log mel energy")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def audit(bundle: Bundle, data: Path, top: int = 30) -> dict:
    """Training clips most likely mislabelled or broken, for a person to listen to.

    Ranked by the model's loss on the given label; a confident disagreement, a near-silent
    keyword clip and a clipped recording are called out as such.
    """
    ds = load_dataset(data, bundle.labels)
    x, ds = ClipCache().load_all(ds, progress=True)
    if len(ds) == 0:  # as evaluate: "0 clips" with exit 0 would read as a clean data set
        raise StreamKWSError(f"{data}: no readable clips")
    probs = predict_clips(bundle, x)
    y = ds.targets()
    p_true = probs[np.arange(len(y)), y]
    loss = -np.log(np.maximum(p_true, 1e-9))
    pred = probs.argmax(1)
    rms_db = 20 * np.log10(np.sqrt((x.astype(np.float64) ** 2).mean(1)) + 1e-9)
    clipped = (np.abs(x) >= 0.999).sum(1)
    rows = []
    for i in np.argsort(-loss)[:top]:
        reasons = []
        if pred[i] != y[i] and probs[i, pred[i]] >= 0.8:
            reasons.append(f"model is {probs[i, pred[i]]:.0%} sure it is "
                           f"'{bundle.labels[pred[i]]}'")
        if ds.items[i].label not in ("_silence_",) and rms_db[i] < -50:
            reasons.append(f"nearly silent ({rms_db[i]:.0f} dBFS)")
        if clipped[i] > 20:
            reasons.append(f"clipped ({clipped[i]} samples at full scale)")
        if not reasons:
            # The list is by rank, and a large --top reaches clips the model gets right:
            # "high loss" only where the label gets less than even odds.
            reasons.append("high loss" if p_true[i] < 0.5 else
                           f"no sign of a problem (the label at {p_true[i]:.0%})")
        rows.append({"path": str(ds.items[i].path), "label": ds.items[i].label,
                     "predicted": bundle.labels[pred[i]],
                     "confidence": round(float(probs[i, pred[i]]), 4),
                     "loss": round(float(loss[i]), 3), "why": "; ".join(reasons)})
    return {"model": bundle.name, "data": str(data), "clips": len(ds),
            "disagreements": int((pred != y).sum()), "suspects": rows,
            "unreadable": ds.skipped}
