"""Long test recordings built from labelled clips: words at known times over real noise.

The demo recording, the end-to-end replay tests and ``stream-eval --build`` all use this,
so a label file always states exactly where each word was placed.
"""

from __future__ import annotations

import csv
import wave
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamkws.audio.wav import load_audio
from streamkws.bundle import Bundle
from streamkws.data import KEYWORDS, load_dataset, load_noise, speaker_split

SR = 16000


@dataclass(frozen=True)
class Placed:
    word: str
    """The spoken word; keywords are what a detector should report."""
    start: float
    end: float
    source: str


def speech_bounds(x: np.ndarray, frame: int = 160, below_peak_db: float = 30.0,
                  fricative_ms: float = 300.0) -> tuple[int, int]:
    """First and last sample of the word in a clip.

    The core is the frames within ``below_peak_db`` of the loudest frame and at least 12 dB
    above the clip's own noise floor (its quietest tenth), so neither quiet breaths nor a
    noisy recording's background count as the word. Fricatives (the /f/ of "off", the /s/
    of "yes" and "stop") carry a small share of a word's energy, and in a noisy clip they
    fall under that floor: trimmed there, "off" would be cut to "o". So the core grows, up
    to ``fricative_ms`` each way, over adjacent frames whose energy above 2 kHz stands
    10 dB over that band's own floor."""
    frames, e = _frame_db(x, frame)
    n = len(frames)
    if n == 0:
        return 0, len(x)
    threshold = max(e.max() - below_peak_db, np.percentile(e, 10) + 12.0)
    loud = np.flatnonzero(e >= min(threshold, e.max()))
    first, last = int(loud[0]), int(loud[-1])
    spectrum = np.abs(np.fft.rfft(frames * np.hanning(frame), axis=1)) ** 2
    high = 10 * np.log10(spectrum[:, int(2000 * frame / SR):].sum(1) + 1e-12)
    hiss = high > np.percentile(high, 10) + 10.0
    reach = int(fricative_ms * SR / 1000 / frame)
    for _ in range(reach):
        if first == 0 or not hiss[first - 1]:
            break
        first -= 1
    for _ in range(reach):
        if last == n - 1 or not hiss[last + 1]:
            break
        last += 1
    return first * frame, min(len(x), (last + 1) * frame)


def speech_contrast_db(x: np.ndarray, frame: int = 160) -> float:
    """Loudest frame over the quietest tenth, in dB: near 0 for a clip with no word in it."""
    _, e = _frame_db(x, frame)
    if len(e) == 0:
        return 0.0
    return float(e.max() - np.percentile(e, 10))


def _frame_db(x: np.ndarray, frame: int) -> tuple[np.ndarray, np.ndarray]:
    """The clip cut into whole frames ``(n, frame)`` and each frame's energy in dB."""
    n = len(x) // frame
    frames = x[: n * frame].reshape(n, frame).astype(np.float64)
    return frames, 10 * np.log10((frames**2).mean(1) + 1e-12)


def audible(items: list, min_contrast_db: float = 20.0) -> list:
    """The dataset items whose word stands at least ``min_contrast_db`` above their own
    background: a near-silent clip placed in a stream would be an unfair miss."""
    return [it for it in items if speech_contrast_db(load_audio(it.path)) >= min_contrast_db]


def build_stream(
    clips: list[tuple[str, Path]],
    noise: list[np.ndarray],
    gap_s: tuple[float, float] = (1.0, 2.5),
    snr_db: float | None = 20.0,
    noise_dbfs: float = -45.0,
    seed: int = 0,
    lead_s: float = 1.0,
    word_dbfs: float | None = -26.0,
    word_jitter_db: float = 3.0,
    context_ms: float = 150.0,
    label_pad_ms: float = 50.0,
) -> tuple[np.ndarray, list[Placed]]:
    """Concatenate ``(word, path)`` clips, each cut down to its word and some of its own
    recording around it, with random gaps, over a noise bed.

    Each word keeps ``context_ms`` of its own recording either side of what
    :func:`speech_bounds` finds, because an energy rule misjudges the weakest sounds: with
    50 ms, 5 of the 486 audible held-out keyword clips lost a sound the model needs (a
    faint /f/ cut from "off" leaves "o"), with 150 ms none did. The label is what
    :func:`speech_bounds` finds and ``label_pad_ms`` around it, so overlap and latency are
    measured from the word, not from room tone; where the rule misses a faint final sound
    (that "off"'s /f/), the label ends before it, and latency reads that much longer.

    Each word is brought to ``word_dbfs`` +- ``word_jitter_db`` (RMS of its speech), as a
    speaker at a fixed distance from a microphone would be; None keeps the recordings'
    own levels, which in Speech Commands span 30 dB. ``snr_db`` sets the noise bed below
    the speech level; None uses a fixed ``noise_dbfs``."""
    rng = np.random.default_rng(seed)
    pieces, placed = [], []
    pos = int(lead_s * SR)
    words = []
    for word, path in clips:
        x = load_audio(path)
        a, b = speech_bounds(x)
        # The label keeps the soft onset and release around the loud part.
        pad = int(label_pad_ms * SR / 1000)
        la, lb = max(0, a - pad), min(len(x), b + pad)
        context = max(pad, int(context_ms * SR / 1000))
        ca, cb = max(0, a - context), min(len(x), b + context)
        x, la, lb = x[ca:cb], la - ca, lb - ca  # the label, within the kept audio
        if word_dbfs is not None:
            target = word_dbfs + rng.uniform(-word_jitter_db, word_jitter_db)
            word_rms = np.sqrt(np.mean(x[la:lb].astype(np.float64) ** 2)) + 1e-9
            x = x * (10 ** (target / 20) / word_rms)
        words.append((word, path, x.astype(np.float32), la, lb))
    for word, path, x, la, lb in words:
        pieces.append((pos, x))
        placed.append(Placed(word, (pos + la) / SR, (pos + lb) / SR, str(path)))
        pos += len(x) + int(rng.uniform(*gap_s) * SR)
    total = pos
    out = np.zeros(total, np.float32)
    for at, x in pieces:
        out[at : at + len(x)] += x
    if noise:
        bed = _noise_bed(noise, total, rng)
        if snr_db is None:
            level = 10 ** (noise_dbfs / 20)
        else:
            speech = np.concatenate([x[la:lb] for _, _, x, la, lb in words])
            speech_rms = np.sqrt(np.mean(speech**2))
            level = speech_rms * 10 ** (-snr_db / 20)
        out += bed * (level / (np.sqrt(np.mean(bed**2)) + 1e-12))
    peak = np.abs(out).max()
    if peak > 0.99:
        out *= 0.99 / peak
    return out, placed


def _noise_bed(noise: list[np.ndarray], n: int, rng: np.random.Generator) -> np.ndarray:
    parts, have = [], 0
    while have < n:
        rec = noise[int(rng.integers(len(noise)))]
        start = int(rng.integers(0, max(1, len(rec) - SR)))
        seg = rec[start : start + min(n - have, len(rec) - start)]
        parts.append(seg)
        have += len(seg)
    return np.concatenate(parts)[:n].astype(np.float32)


@contextmanager
def _written_beside(path: str | Path) -> Iterator[Path]:
    """A temporary name beside ``path`` to write, renamed over ``path`` once written: a
    link at ``path`` is replaced, never written through (it may point at a clip of the
    data set itself), and a failed write leaves neither a half file nor the temporary."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_wav(path: str | Path, x: np.ndarray) -> None:
    with _written_beside(path) as tmp, wave.open(str(tmp), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes((np.clip(x, -1, 1) * 32767).round().astype("<i2").tobytes())


def write_labels(path: str | Path, placed: list[Placed], keywords: set[str] | None = None) -> None:
    """CSV ``keyword,start,end`` (seconds), one row per keyword utterance."""
    with _written_beside(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["keyword", "start", "end"])
        for p in placed:
            if keywords is None or p.word in keywords:
                w.writerow([p.word, f"{p.start:.3f}", f"{p.end:.3f}"])


def read_labels(path: str | Path) -> list[Placed]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [Placed(r["keyword"], float(r["start"]), float(r["end"]), "") for r in rows]


HELDOUT_SPLIT = (0.15, 0)
"""Validation fraction and split seed of ``train``'s default split, which the bundled models
were trained with: held-out streams are built from its validation speakers."""


def heldout_split_problem(bundle: Bundle) -> str | None:
    """Why held-out streams would hold speakers ``bundle`` trained on, or None."""
    frac, seed = HELDOUT_SPLIT
    theirs = bundle.validation_fraction, bundle.split_seed
    if (theirs[0] is not None and abs(theirs[0] - frac) > 1e-9) or \
            (theirs[1] is not None and theirs[1] != seed):
        share = "an unrecorded share" if theirs[0] is None else f"{theirs[0]:.0%}"
        return (f"held-out streams come from the validation speakers of the default split "
                f"({frac:.0%}, split seed {seed}); {bundle.name} was validated on {share} "
                f"with split seed {theirs[1]}, so it trained on some of them")
    return None


def heldout_stream(data_dir: Path, out: Path, n_per_keyword: int = 3, n_unknown: int = 40,
                   seed: int = 0) -> tuple[Path, list[Placed]]:
    """Keywords at known times from speakers the default model never trained on (its
    validation split), shuffled with other words, over the real noise recordings."""
    _, val = speaker_split(load_dataset(data_dir / "speech_commands_v2_real"), *HELDOUT_SPLIT)
    rng = np.random.default_rng(seed)
    clips = []
    for kw in KEYWORDS:
        items = audible([it for it in val.items if it.label == kw])
        for k in rng.permutation(len(items))[:n_per_keyword]:
            clips.append((kw, items[k].path))
    unknown = [it for it in val.items if it.label == "_unknown_"]
    for k in rng.permutation(len(unknown))[:n_unknown]:
        clips.append((unknown[k].word, unknown[k].path))
    clips = [clips[i] for i in rng.permutation(len(clips))]
    noise = load_noise(data_dir / "noise")
    audio, placed = build_stream(clips, noise, gap_s=(1.5, 3.5), snr_db=20.0, seed=seed)
    write_wav(out, audio)
    return out, placed


Span = tuple[str, float, float]
"""(word, start, end), times in seconds."""


@dataclass
class Matches:
    hits: dict[int, int]
    """Utterance index -> index of the detection matched to it (normally its first)."""
    duplicates: list[int]
    """Indices of further detections of utterances already hit."""
    false: list[int]
    """Indices of detections that hit no utterance."""


def match(detections: list[Span], utterances: list[Span]) -> Matches:
    """The one matching rule of every stream score: a detection can hit an utterance of the
    same word whose span it overlaps, each utterance is hit at most once, and as many
    utterances are hit as such pairs allow (a maximum matching, so the order of detections
    cannot decide recall). A detection that overlaps none is a false one; one that overlaps
    only utterances hit by others is a duplicate, not a false one."""
    overlaps = [[i for i, (w, start, end) in enumerate(utterances)
                 if w == word and t0 < end and t1 > start]
                for word, t0, t1 in detections]
    hits: dict[int, int] = {}

    def place(j: int, seen: set[int]) -> bool:  # Kuhn's augmenting path
        for i in overlaps[j]:
            if i not in seen:
                seen.add(i)
                if i not in hits or place(hits[i], seen):
                    hits[i] = j
                    return True
        return False

    for j in range(len(detections)):
        place(j, set())
    placed = set(hits.values())
    duplicates = [j for j in range(len(detections)) if overlaps[j] and j not in placed]
    false = [j for j in range(len(detections)) if not overlaps[j]]
    return Matches(hits, duplicates, false)


def score(detections: list[dict], truth: list[Placed], keywords=KEYWORDS,
          duration_s: float | None = None) -> dict:
    """Published detections (seconds, as subscribers receive them) against a stream's
    placed words, by :func:`match`. ``duration_s``: the recording's length (default: one
    second past its last word, which undercounts a longer tail of noise)."""
    kw_truth = [p for p in truth if p.word in keywords]
    m = match([(d["keyword"], d["t_start"], d["t_end"]) for d in detections],
              [(p.word, p.start, p.end) for p in kw_truth])
    total = duration_s if duration_s is not None else (truth[-1].end + 1.0 if truth else 0.0)
    keyword_seconds = sum(p.end - p.start for p in kw_truth)
    return {"utterances": len(kw_truth), "hits": len(m.hits),
            "recall": len(m.hits) / len(kw_truth) if kw_truth else None,
            "false": [detections[j] for j in m.false], "duplicates": len(m.duplicates),
            "non_keyword_minutes": (total - keyword_seconds) / 60.0,
            "missed": [p for i, p in enumerate(kw_truth) if i not in m.hits]}
