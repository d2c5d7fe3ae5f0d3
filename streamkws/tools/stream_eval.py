"""``streamkws stream-eval``: how the daemon does on a long recording, not on isolated clips.

A recording and its label file (CSV ``keyword,start,end`` in seconds) go through the very
:class:`~streamkws.daemon.Pipeline` the daemon runs (front end, VAD gate, model, smoother),
as fast as the CPU allows. The report gives, per keyword and overall: recall and
false-reject rate, false alarms per hour, and latency (decision time minus the end of the
utterance).

The model runs once; every window's posteriors are kept, so other thresholds (the DET curve,
calibration) are decided again by the same :class:`~streamkws.detect.Smoother` without
running it again. Detections are located with a VAD timeline of the whole recording built
by the daemon's own gate, so a re-decided detection is the one the daemon would publish.

Counting rules, so figures from different recordings compare:
- a *hit* is a detection of the labelled keyword whose ``[t_start, t_end]`` overlaps the
  utterance; each utterance counts once, and further detections of it are *duplicates*;
- every other detection is a *false alarm*, charged to the keyword it reported;
- false alarms per hour divide by the hours of audio outside keyword utterances.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamkws import SAMPLE_RATE
from streamkws.bundle import Bundle, load_bundle
from streamkws.config import Config, DetectConfig, dumps, load_default
from streamkws.detect import Detection, Smoother
from streamkws.errors import StreamKWSError, no_folder
from streamkws.tools.outputs import PICTURES, check_output
from streamkws.tools.streams import HELDOUT_SPLIT
from streamkws.vad import VadGate, make_vad

log = logging.getLogger(__name__)

THRESHOLDS = np.round(np.concatenate([np.arange(0.05, 0.9, 0.05), np.arange(0.9, 0.995, 0.01),
                                      [0.995, 0.999]]), 3)
"""The thresholds a DET curve and calibration try (denser near 1, where operating points lie)."""

MAX_PER_KEYWORD = 500
MAX_UNKNOWN = 5000

SNR_RANGE = (-20.0, 60.0)
"""The --snr a built recording can honour. Words are placed near -26 dBFS: 60 dB under them
the noise bed is at the 16-bit floor and rounds away; at -20 dB the bed is near full scale
already, and anything lower only scales the words down towards that floor (at -1000 they
vanish, and NaN writes silence), while the labels still promise keywords."""


@dataclass(frozen=True)
class Utterance:
    keyword: str
    start: float
    end: float


def read_labels(path: str | Path) -> list[Utterance]:
    """A label file: CSV with a header ``keyword,start,end`` (seconds), one row per word."""
    p = Path(path)
    try:
        f = open(p, newline="", encoding="utf-8")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise StreamKWSError(f"{p}: cannot read label file ({exc.strerror})") from None
    with f:
        reader = csv.DictReader(f)
        missing = {"keyword", "start", "end"} - set(reader.fieldnames or [])
        if missing:
            raise StreamKWSError(f"{p}: label file needs a header 'keyword,start,end' "
                                 f"(missing {', '.join(sorted(missing))})")
        out = []
        for row in reader:
            try:
                u = Utterance(row["keyword"].strip(), float(row["start"]), float(row["end"]))
            except (TypeError, ValueError, AttributeError):
                raise StreamKWSError(f"{p}:{reader.line_num}: expected keyword,start,end "
                                     f"with times in seconds, got {row}") from None
            if not (0 <= u.start < u.end) or not u.keyword:
                raise StreamKWSError(f"{p}:{reader.line_num}: need a keyword and "
                                     f"0 <= start < end (got {u.keyword!r}, {u.start:g}, "
                                     f"{u.end:g})")
            out.append(u)
    return sorted(out, key=lambda u: u.start)


# -- running the pipeline once --------------------------------------------------------------


@dataclass
class Run:
    """What one pass of the pipeline over a recording leaves: enough to decide it again."""

    labels: list[str]
    detections: list[Detection]
    """What the daemon, configured as given, would have published."""
    trace: list[tuple[int, int, np.ndarray | None]]
    timeline: VadGate
    samples: int
    cpu_seconds: float
    inferences: int
    windows: int
    vad_active_ratio: float
    latency_ms: dict[str, float | None]
    calibrated: float | None = None
    """The bundle's calibrated threshold, which the daemon used where the config set none."""

    @property
    def duration(self) -> float:
        return self.samples / SAMPLE_RATE


def run_pipeline(cfg: Config, bundle: Bundle, audio: str | Path, progress: bool = True) -> Run:
    """Replay ``audio`` through the daemon's pipeline as fast as possible."""
    from streamkws.audio.wav import WavSource
    from streamkws.daemon import Pipeline

    source = WavSource(audio, realtime=False, block_frames=cfg.audio.block_ms * 16)
    pipeline = Pipeline(cfg, bundle)
    pipeline.trace = []
    # The daemon's gate keeps 3 s of decisions; a second one over the whole recording lets
    # any re-decided detection be located exactly as the daemon would have located it.
    timeline = VadGate(make_vad(cfg.vad), cfg.vad.min_speech_ms,
                       history_ms=int(source.info.duration * 1000) + 2000)
    detections: list[Detection] = []
    bar = _bar(source.info.duration, progress)
    t0 = time.process_time()
    for chunk in source.chunks():
        timeline.push(chunk)
        detections += pipeline.process(chunk)
        bar.update(len(chunk.samples) / SAMPLE_RATE)
    detections += pipeline.finish()
    cpu = time.process_time() - t0
    bar.close()
    return Run(bundle.labels, detections, pipeline.trace, timeline, pipeline.samples, cpu,
               pipeline.inferences, pipeline.windows, pipeline.vad_active_ratio,
               {"p50": pipeline.latency.percentile(50), "p99": pipeline.latency.percentile(99)},
               bundle.threshold)


def _bar(total_s: float, enabled: bool):
    from streamkws.progress import tqdm

    return tqdm(total=round(total_s, 1), unit="s audio", disable=not enabled, leave=False,
                bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s audio [{elapsed}<{remaining}]")


def decide(run: Run, detect: DetectConfig) -> list[Detection]:
    """The detections the daemon would publish on this recording with ``detect`` settings
    (an unset threshold is the model's calibrated one, as in the daemon)."""
    smoother = Smoother(run.labels, detect.for_model(run.calibrated))
    out = []
    for start, end, probs in run.trace:
        det = smoother.push(probs, start, end)
        if det is not None:
            span = run.timeline.speech_span(det.start, det.end)
            if span is not None:
                det = Detection(det.keyword, det.score, span[0], span[1], det.emit)
            out.append(det)
    return out


# -- scoring ---------------------------------------------------------------------------------


def score(detections: Sequence[Detection], truth: Sequence[Utterance], keywords: Sequence[str],
          duration_s: float) -> dict:
    """Recall, false alarms and latency per keyword and overall (rules in the module doc)."""
    from streamkws.tools.streams import match

    kw_truth = [u for u in truth if u.keyword in keywords]
    m = match([(d.keyword, d.start / SAMPLE_RATE, d.end / SAMPLE_RATE) for d in detections],
              [(u.keyword, u.start, u.end) for u in kw_truth])
    hit_by = {i: detections[j] for i, j in m.hits.items()}
    false = [detections[j] for j in m.false]
    dups = [detections[j] for j in m.duplicates]
    keyword_s = sum(u.end - u.start for u in kw_truth)
    hours = max(duration_s - keyword_s, 1e-9) / 3600.0

    def summary(utts: list[int], fa: list[Detection], dups: int) -> dict:
        hits = [i for i in utts if i in hit_by]
        lat = [(hit_by[i].emit / SAMPLE_RATE - kw_truth[i].end) * 1000.0 for i in hits]
        n = len(utts)
        return {
            "utterances": n, "hits": len(hits),
            "recall": round(len(hits) / n, 4) if n else None,
            "frr": round(1 - len(hits) / n, 4) if n else None,
            "false_alarms": len(fa), "fa_per_hour": round(len(fa) / hours, 3),
            "duplicates": dups,
            "latency_ms": _percentiles(lat),
        }

    per_keyword = {}
    for kw in keywords:
        utts = [i for i, u in enumerate(kw_truth) if u.keyword == kw]
        per_keyword[kw] = summary(utts, [d for d in false if d.keyword == kw],
                                  sum(d.keyword == kw for d in dups))
    overall = summary(list(range(len(kw_truth))), false, len(dups))
    overall["missed"] = [dataclasses.asdict(kw_truth[i]) for i in range(len(kw_truth))
                         if i not in hit_by]
    overall["false"] = [_detection_dict(d) for d in false]
    return {"duration_s": round(duration_s, 3), "non_keyword_hours": round(hours, 5),
            "overall": overall, "per_keyword": per_keyword}


def _detection_dict(d: Detection) -> dict:
    """Times as the daemon publishes them (seconds of audio, millisecond resolution)."""
    return {"keyword": d.keyword, "score": round(d.score, 4),
            "t_start": round(d.start / SAMPLE_RATE, 3), "t_end": round(d.end / SAMPLE_RATE, 3),
            "t_emit": round(d.emit / SAMPLE_RATE, 3)}


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "max": None}
    v = np.asarray(values)
    return {"p50": round(float(np.percentile(v, 50)), 1),
            "p90": round(float(np.percentile(v, 90)), 1), "max": round(float(v.max()), 1)}


def keywords_of(run: Run, detect: DetectConfig) -> list[str]:
    return [lb for lb in run.labels if lb not in detect.ignore]


def sweep(run: Run, truth: Sequence[Utterance], detect: DetectConfig,
          thresholds: Sequence[float] = tuple(THRESHOLDS)) -> list[tuple[float, dict]]:
    """``(threshold, score)`` for each threshold: the recording re-decided with the same
    threshold for every keyword (per-keyword thresholds dropped), the rest of ``detect`` kept."""
    kws = keywords_of(run, detect)
    out = []
    for t in thresholds:
        d = dataclasses.replace(detect, threshold=float(t), thresholds={})
        out.append((float(t), score(decide(run, d), truth, kws, run.duration)))
    return out


def pool(sweeps: Sequence[list[tuple[float, dict]]]) -> list[tuple[float, int, int, int, float]]:
    """Several recordings' sweeps over the same thresholds, summed: ``(threshold, hits,
    utterances, false_alarms, non_keyword_minutes)`` per threshold. Counts, not rates, so
    a confidence rule can weigh how much audio vouches for them."""
    rows = []
    for points in zip(*sweeps, strict=True):
        if len({t for t, _ in points}) != 1:
            raise ValueError(f"sweeps over different thresholds: {sorted({t for t, _ in points})}")
        scores = [s for _, s in points]
        rows.append((points[0][0], sum(s["overall"]["hits"] for s in scores),
                     sum(s["overall"]["utterances"] for s in scores),
                     sum(s["overall"]["false_alarms"] for s in scores),
                     sum(s["non_keyword_hours"] * 60.0 for s in scores)))
    return rows


def det_curve(run: Run, truth: Sequence[Utterance], detect: DetectConfig,
              thresholds: Sequence[float] = tuple(THRESHOLDS)) -> list[dict]:
    """False-reject rate against false alarms per hour, one point per threshold (the same
    threshold for every keyword), overall and per keyword."""
    return [{
        "threshold": t, "frr": s["overall"]["frr"], "fa_per_hour": s["overall"]["fa_per_hour"],
        "per_keyword": {k: [v["frr"], v["fa_per_hour"]] for k, v in s["per_keyword"].items()},
    } for t, s in sweep(run, truth, detect, thresholds)]


# -- calibration -------------------------------------------------------------------------------


def _keyword_false_alarms(run: Run, truth: Sequence[Utterance], detect: DetectConfig, kw: str,
                          threshold: float) -> int:
    """False alarms of one keyword deciding alone (every other keyword ignored).

    Alone, no rival can take an utterance from it, so this bounds from above what it does
    next to the others; the joint check afterwards sees the interactions."""
    others = [lb for lb in run.labels if lb != kw]
    d = dataclasses.replace(detect, threshold=threshold, thresholds={}, ignore=others)
    s = score(decide(run, d), truth, [kw], run.duration)
    return s["per_keyword"][kw]["false_alarms"]


def calibrate(run: Run, truth: Sequence[Utterance], detect: DetectConfig, target_fa_per_hour:
              float, min_threshold: float = 0.5, progress: bool = True) -> dict:
    """Per-keyword thresholds whose false alarms on this recording fit the budget.

    The budget is shared equally: each of K keywords may raise ``target / K`` false alarms
    per hour. Each keyword gets the lowest threshold (so the best recall) that keeps within
    its share; then all keywords are decided together and, while the total still exceeds
    the target, the keyword with the most false alarms is raised one step."""
    from streamkws.progress import tqdm

    kws = keywords_of(run, detect)
    grid = [float(t) for t in THRESHOLDS if t >= min_threshold]
    hours = score([], truth, kws, run.duration)["non_keyword_hours"]
    allowed = target_fa_per_hour / len(kws) * hours
    chosen: dict[str, float] = {}
    for kw in tqdm(kws, desc="calibrating", disable=not progress, leave=False):
        chosen[kw] = grid[-1]
        for t in grid:
            if _keyword_false_alarms(run, truth, detect, kw, t) <= allowed:
                chosen[kw] = t
                break
    while True:
        tuned = dataclasses.replace(detect, thresholds=dict(chosen))
        s = score(decide(run, tuned), truth, kws, run.duration)
        if s["overall"]["fa_per_hour"] <= target_fa_per_hour:
            break
        worst = sorted((v["false_alarms"], k) for k, v in s["per_keyword"].items()
                       if chosen[k] < grid[-1])
        if not worst or worst[-1][0] == 0:
            break
        k = worst[-1][1]
        chosen[k] = grid[min(grid.index(chosen[k]) + 1, len(grid) - 1)]
    met = s["overall"]["fa_per_hour"] <= target_fa_per_hour
    return {"thresholds": chosen, "target_fa_per_hour": target_fa_per_hour,
            "met": met, "hours": hours, "report": s}


# -- building recordings -------------------------------------------------------------------------


def build(out: Path, data: Sequence[Path], noise: Path | None, per_keyword: int, unknown: int,
          snr_db: float | None, gap_s: tuple[float, float], seed: int, speakers: str,
          negative: bool, min_contrast_db: float,
          keywords: Sequence[str] | None = None, labels_out: Path | None = None,
          split: tuple[float, int] = HELDOUT_SPLIT) -> dict:
    """A recording of labelled clips at random spacing over real noise, and its label file
    (keyword utterances only; other words are in it as distractors) at ``labels_out``
    (default: ``out`` as .csv). ``keywords``: the words that are keywords (default: the ten
    Speech Commands words); every other word may be a distractor, never one of these.
    ``split``: the validation fraction and split seed whose validation speakers ``speakers
    == "heldout"`` keeps (default: ``train``'s default split)."""
    from streamkws.data import (
        SILENCE,
        UNKNOWN,
        labels_for,
        load_dataset,
        load_noise,
        missing_keywords,
        speaker_split,
    )
    from streamkws.tools.streams import audible, build_stream, write_labels, write_wav

    labels = labels_for(keywords)
    ds = None
    for d in data:
        part = load_dataset(d, labels)
        ds = part if ds is None else ds + part
    assert ds is not None
    if speakers == "heldout":
        # The validation speakers of `streamkws train` with that split (by default, the
        # bundled models'): words no such model has trained on.
        ds = speaker_split(ds, *split)[1]
    rng = np.random.default_rng(seed)
    missing = missing_keywords(ds) if not negative and keywords is not None else []
    if missing:
        raise StreamKWSError(f"no clips of {', '.join(missing)} in --data "
                             f"({'held-out speakers' if speakers == 'heldout' else 'all'})")
    keywords = sorted({it.label for it in ds.items} - {SILENCE, UNKNOWN})
    if not negative and not keywords:
        raise StreamKWSError("--data holds none of the keywords; name yours with --keywords "
                             "(or --model, whose keywords are used)")

    clips: list[tuple[str, Path]] = []
    if not negative:
        for kw in keywords:
            items = audible([it for it in ds.items if it.label == kw], min_contrast_db)
            clips += [(kw, it.path) for it in _draw(items, per_keyword, rng, f"'{kw}'")]
    others = [it for it in ds.items if it.label == UNKNOWN]
    clips += [(it.word, it.path) for it in _draw(others, unknown, rng, "other words")]
    if not clips:
        raise StreamKWSError("no clips to build a recording from (check --data and the counts)")
    clips = [clips[i] for i in rng.permutation(len(clips))]
    noise_clips = load_noise(noise) if noise else []
    audio, placed = build_stream(clips, noise_clips, gap_s=gap_s, snr_db=snr_db, seed=seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_wav(out, audio)
    labels = labels_out or out.with_suffix(".csv")
    write_labels(labels, placed, keywords=set(keywords))
    n_kw = sum(p.word in keywords for p in placed)
    return {"audio": str(out), "labels": str(labels), "duration_s": round(len(audio) / SAMPLE_RATE,
                                                                           3),
            "keyword_utterances": n_kw, "other_words": len(placed) - n_kw,
            "keywords": keywords, "snr_db": snr_db, "seed": seed, "speakers": speakers}


def _draw(items: list, n: int, rng: np.random.Generator, what: str) -> list:
    """``n`` items in random order; when there are fewer, each is used again (it lands at
    another level over other noise) before any is used a third time."""
    if not items or n <= 0:
        if n > 0:
            log.warning("no clips of %s", what)
        return []
    if n > len(items):
        log.warning("%d clips of %s for %d places: some are used more than once",
                    len(items), what, n)
    out: list = []
    while len(out) < n:
        out += [items[i] for i in rng.permutation(len(items))]
    return out[:n]


# -- the command ----------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("audio", type=Path, metavar="REC.wav",
                   help="the recording to evaluate (or, with --build, to write)")
    p.add_argument("--labels", type=Path, metavar="CSV",
                   help="keyword,start,end per keyword utterance (default: REC.csv beside "
                        "it); with --build, where to write them")
    p.add_argument("--negative", action="store_true",
                   help="the recording holds no keywords (no label file needed); with "
                        "--build, place only other words")
    p.add_argument("--model", metavar="M", help="bundle path or name (default: the config's)")
    p.add_argument("--config", metavar="F", help="daemon config to evaluate with")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--plot", metavar="PNG", help="draw the DET curve")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    c = p.add_argument_group("calibration")
    c.add_argument("--target-fa-per-hour", type=float, metavar="X",
                   help="pick per-keyword thresholds for at most X false alarms per hour")
    c.add_argument("--write-config", type=Path, metavar="F",
                   help="with --target-fa-per-hour: write the tuned daemon config here")
    c.add_argument("--min-threshold", type=float, default=0.5,
                   help="never calibrate a threshold below this (default 0.5)")
    b = p.add_argument_group("building a recording (--build)")
    b.add_argument("--build", action="store_true",
                   help="write REC.wav and its labels (REC.csv, or --labels) from labelled "
                        "clips instead of evaluating")
    b.add_argument("--data", type=Path, action="append", metavar="DIR",
                   help="labelled clip folders (DIR/<label>/*.wav); repeatable")
    b.add_argument("--keywords", metavar="W,W,...",
                   help="the words that are keywords (default: --model's, else the ten "
                        "Speech Commands words); no other word is placed as one, and none "
                        "of these as a distractor")
    b.add_argument("--noise", type=Path, metavar="DIR",
                   help="noise recordings for the bed (without it, the words sit in digital "
                        "silence, which no microphone hears)")
    b.add_argument("--snr", type=float,
                   help=f"speech over noise, dB, within {SNR_RANGE[0]:g}..{SNR_RANGE[1]:g} "
                        "(default 20; needs --noise)")
    b.add_argument("--gap", default="1.5:3.5", metavar="MIN:MAX",
                   help="seconds between placed words (each keeps 150 ms of its recording "
                        "either side), drawn uniformly (default 1.5:3.5)")
    b.add_argument("--per-keyword", type=int, default=10,
                   help=f"utterances of each keyword, 1..{MAX_PER_KEYWORD} (default 10)")
    b.add_argument("--unknown", type=int, default=50,
                   help=f"other words as distractors, 0..{MAX_UNKNOWN} (default 50)")
    b.add_argument("--speakers", choices=("all", "heldout"), default="all",
                   help="heldout: only the validation speakers of --model's training split "
                        "(without --model: of train's default split)")
    b.add_argument("--min-contrast-db", type=float, default=20.0,
                   help="skip keyword clips whose word stands less than this above their "
                        "own background (some recordings hold no audible word)")
    b.add_argument("--seed", type=int, default=0,
                   help="which clips, in which order and spacing (default 0)")


def _duration(hours: float) -> str:
    return f"{hours * 60:.0f} min" if hours < 1 else f"{hours:.1f} h"


def _warn_word_folders(data: Sequence[Path], labels: Sequence[str]) -> None:
    """Say so when ``data`` holds word folders that are not among ``labels``: built without
    --model or --keywords, they become other words, which for a user's own keywords is the
    opposite of what they are."""
    from streamkws.data import NOISE_DIR_NAMES, UNKNOWN, word_to_label

    # As the loader reads folders: YES/ is "yes", dot folders and noise are skipped.
    extra = sorted({p.name for d in data for p in d.iterdir()
                    if p.is_dir() and not p.name.startswith((".", "_"))
                    and p.name not in NOISE_DIR_NAMES and word_to_label(p.name, labels) == UNKNOWN})
    if extra:
        log.warning("%s: not keywords here (neither --model nor --keywords was given, so the "
                    "keywords are the ten Speech Commands words); placed as other words. "
                    "For your own keywords, give --model or --keywords", ", ".join(extra))


def _gap(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(":"))
    except ValueError:
        raise StreamKWSError(f"--gap: expected MIN:MAX seconds, got {text!r}") from None
    if not 0 <= lo <= hi:
        raise StreamKWSError(f"--gap: need 0 <= MIN <= MAX, got {text!r}")
    return lo, hi


def run(args: argparse.Namespace) -> int:
    if args.build:
        if not args.data:
            raise StreamKWSError("--build needs --data DIR (labelled clip folders)")
        for d in [*args.data, *([args.noise] if args.noise else [])]:
            if not d.is_dir():
                raise no_folder(d, "noise folder" if d is args.noise else "data folder")
        # Values first: a refused run must not leave the folders check_output makes.
        if args.snr is not None and args.noise is None:
            raise StreamKWSError("--snr needs --noise DIR: without a noise bed there is "
                                 "nothing to set the speech against")
        snr = 20.0 if args.snr is None else args.snr
        if not SNR_RANGE[0] <= snr <= SNR_RANGE[1]:  # NaN fails this too
            raise StreamKWSError(f"--snr must be within {SNR_RANGE[0]:g}..{SNR_RANGE[1]:g} dB "
                                 f"of speech over the noise bed (got {snr:g})")
        # Each placed word takes ~4 s with its gap: 10 keywords x 500 + 5000 others is
        # already ~11 hours (1.3 GB); beyond that a typo (100000) fills the disk.
        if not 1 <= args.per_keyword <= MAX_PER_KEYWORD:
            raise StreamKWSError(f"--per-keyword must be within 1..{MAX_PER_KEYWORD} "
                                 f"(got {args.per_keyword})")
        if not 0 <= args.unknown <= MAX_UNKNOWN:
            raise StreamKWSError(f"--unknown must be within 0..{MAX_UNKNOWN} "
                                 f"(got {args.unknown})")
        from streamkws.data import SILENCE, UNKNOWN, labels_for

        model = load_bundle(args.model) if args.model else None
        # The keywords given ("" is a mistake, not the default ten words), else the model's.
        label_set = (labels_for(args.keywords.split(",")) if args.keywords is not None
                     else model.labels if model is not None else None)
        keywords = None if label_set is None else [lb for lb in label_set
                                                   if lb not in (SILENCE, UNKNOWN)]
        split = HELDOUT_SPLIT
        if model is not None and args.speakers == "heldout":
            split = (model.validation_fraction or HELDOUT_SPLIT[0],
                     HELDOUT_SPLIT[1] if model.split_seed is None else model.split_seed)
        out = check_output(args.audio, "REC.wav", suffixes=(".wav",))
        # The suffix keeps a slip (--labels REC.wav) from writing labels over the recording.
        labels = (check_output(args.labels, "--labels", suffixes=(".csv",)) if args.labels
                  else out.with_suffix(".csv"))
        for d in args.data:
            for written in (out, labels):
                if written.resolve().is_relative_to(d.resolve()):
                    raise StreamKWSError(f"{written}: would write into the --data folder {d}")
        # Warnings after every refusal: a refused run says one line.
        if label_set is None:
            _warn_word_folders(args.data, labels_for(None))
        if args.noise is None:
            log.warning("no --noise: the words sit in digital silence, which no microphone "
                        "hears, so recall and false alarms will read better than on a device")
        info = build(args.audio, args.data, args.noise, args.per_keyword, args.unknown,
                     snr if args.noise else None, _gap(args.gap), args.seed, args.speakers,
                     args.negative, args.min_contrast_db, keywords, labels_out=labels,
                     split=split)
        if args.json:
            print(json.dumps(info))
        else:
            print(f"wrote {info['audio']} ({info['duration_s'] / 60:.1f} min, "
                  f"{info['keyword_utterances']} keyword utterances, {info['other_words']} "
                  f"other words) and {info['labels']}")
        return 0
    if args.keywords is not None:
        raise StreamKWSError("--keywords goes with --build (a recording's keywords are its "
                             "model's)")
    if args.write_config and args.target_fa_per_hour is None:
        raise StreamKWSError("--write-config goes with --target-fa-per-hour")
    # NaN wrote 0.999 everywhere (deaf) and inf 0.5 (every budget met): neither is a budget.
    if args.target_fa_per_hour is not None and not 0 < args.target_fa_per_hour < math.inf:
        raise StreamKWSError(f"--target-fa-per-hour must be positive and finite "
                             f"(got {args.target_fa_per_hour:g})")
    if not 0 <= args.min_threshold <= float(THRESHOLDS[-1]):
        raise StreamKWSError(f"--min-threshold must be within 0..{THRESHOLDS[-1]:g}")
    if args.write_config:
        check_output(args.write_config, "--write-config", suffixes=(".toml",),
                     inputs=(args.audio, args.labels, args.config))
    if args.plot:
        check_output(args.plot, "--plot", suffixes=PICTURES)
    cfg = load_default(args.config)
    if args.model:
        cfg = cfg.replace(model=dataclasses.replace(cfg.model, name=args.model))
    truth = _truth(args)
    import torch

    from streamkws.daemon import Overrides, load_model

    torch.set_num_threads(cfg.model.threads)
    bundle = load_model(cfg, Overrides(model=args.model))  # warns of stale thresholds
    written_detect = cfg.detect  # what a written config keeps (an unset threshold unset)
    # Calibration and the report start from the threshold the daemon would use.
    cfg = cfg.replace(detect=cfg.detect.for_model(bundle.threshold))
    r = run_pipeline(cfg, bundle, args.audio, progress=not (args.quiet or args.json))
    late = [u for u in truth if u.start >= r.duration]
    if late:
        # Most likely the labels of another recording: every such row would be a miss.
        raise StreamKWSError(f"{args.labels or args.audio.with_suffix('.csv')}: "
                             f"{len(late)} utterance(s) start after the recording ends "
                             f"({r.duration:.1f} s), the first '{late[0].keyword}' at "
                             f"{late[0].start:.1f} s")
    kws = keywords_of(r, cfg.detect)
    unknown = sorted({u.keyword for u in truth} - set(kws))
    if unknown:
        log.warning("label file words the model does not spot, counted as other audio: %s",
                    ", ".join(unknown))
    report = score(r.detections, truth, kws, r.duration)
    report.update({
        "recording": str(args.audio), "model": bundle.name, "model_sha256": bundle.sha256,
        "thresholds": {k: cfg.detect.thresholds.get(k, cfg.detect.threshold) for k in kws},
        "windows": r.windows, "inferences": r.inferences,
        "vad_active_ratio": round(r.vad_active_ratio, 4),
        "cpu_seconds": round(r.cpu_seconds, 3),
        "cpu_per_audio_second": round(r.cpu_seconds / max(r.duration, 1e-9), 6),
        "inference_ms": {k: None if v is None else round(v, 3) for k, v in r.latency_ms.items()},
        "detections": [_detection_dict(d) for d in r.detections],
    })
    if args.plot:
        report["det"] = det_curve(r, truth, cfg.detect)
        plot_det(report, args.plot)
    if args.target_fa_per_hour is not None:
        cal = calibrate(r, truth, cfg.detect, args.target_fa_per_hour, args.min_threshold,
                        progress=not (args.quiet or args.json))
        report["calibration"] = {k: v for k, v in cal.items() if k != "report"}
        report["calibration"]["overall"] = {k: v for k, v in cal["report"]["overall"].items()
                                            if k not in ("missed", "false")}
        if not cal["met"]:
            log.warning("the budget of %g false alarms per hour cannot be met on this "
                        "recording even at threshold %.3f", args.target_fa_per_hour,
                        THRESHOLDS[-1])
        elif cal["hours"] * args.target_fa_per_hour < 1.0:
            # One false alarm already breaks the budget: "met" means "none were heard".
            log.warning("%s holds %s of other audio, where one false alarm is already "
                        "%.0f per hour: a budget of %g per hour is met only by none at all, "
                        "which says little; %s or more of it (three false alarms' worth) "
                        "measures it", args.audio, _duration(cal["hours"]),
                        1 / max(cal["hours"], 1e-9), args.target_fa_per_hour,
                        _duration(3 / args.target_fa_per_hour))
        if args.write_config:
            # A model given as a path is written absolute: --model was relative to the
            # working directory, but a config file's paths are read from its own folder.
            model = cfg.model
            if bundle.path is not None and Path(model.name).is_file():
                model = dataclasses.replace(model, name=str(Path(model.name).resolve()))
            tuned = cfg.replace(model=model, detect=dataclasses.replace(
                written_detect, thresholds=cal["thresholds"],
                calibrated_for=bundle.sha256[:12]))
            args.write_config.write_text(dumps(tuned, header=(
                f"streamkws daemon config written by `streamkws stream-eval "
                f"--target-fa-per-hour {args.target_fa_per_hour:g}`\n"
                f"thresholds calibrated on {args.audio} ({r.duration / 3600:.2f} h) for model "
                f"{bundle.name} ({bundle.sha256[:12]})")))
            report["calibration"]["config"] = str(args.write_config)
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report))
    return 0


def _truth(args: argparse.Namespace) -> list[Utterance]:
    # The recording first: when it is not audio at all, that is the problem to report, not
    # the label file a user may not have made yet.
    _check_recording(args.audio)
    labels = args.labels or args.audio.with_suffix(".csv")
    if args.negative and args.labels is None:
        try:
            listed = read_labels(labels) if labels.is_file() else []
        except (StreamKWSError, OSError, UnicodeDecodeError, ValueError):
            listed = []  # not a label file of ours: nothing --negative would be ignoring
        if listed:
            log.warning("%s lists %d keyword utterance(s), but --negative counts every "
                        "detection on %s as a false alarm (leave out --negative to score "
                        "against it)", labels, len(listed), args.audio)
        return []
    if not labels.is_file():
        raise StreamKWSError(f"{labels}: no label file (pass --labels, or --negative if the "
                             "recording holds no keywords)")
    return read_labels(labels)


def _check_recording(path: Path) -> None:
    """Refuse, with the reason, a recording the pipeline could not replay."""
    from streamkws.audio.wav import read_wav_info

    if path.is_dir():
        raise StreamKWSError(f"{path}: is a folder; give a recording (a .wav file)")
    if not path.exists():
        raise StreamKWSError(f"{path}: no such recording")
    if not path.is_file():  # opening a pipe would wait for a writer
        raise StreamKWSError(f"{path}: not a regular file; give a recording (a .wav file)")
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise StreamKWSError(f"{path}: cannot open ({exc.strerror})") from None
    with f:
        read_wav_info(f, str(path))


def format_report(r: dict) -> str:
    def lat(v: dict) -> str:
        p = v["latency_ms"]
        return "-" if p["p50"] is None else f"{p['p50']:.0f}/{p['p90']:.0f}/{p['max']:.0f}"

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    rows = [f"{'keyword':<10} {'thr':>5} {'utt':>4} {'hits':>4} {'recall':>6} {'FRR':>6} "
            f"{'FA':>4} {'FA/h':>7}  latency ms p50/p90/max"]
    for k, v in r["per_keyword"].items():
        rows.append(f"{k:<10} {r['thresholds'][k]:>5.3g} {v['utterances']:>4} {v['hits']:>4} "
                    f"{pct(v['recall']):>6} {pct(v['frr']):>6} {v['false_alarms']:>4} "
                    f"{v['fa_per_hour']:>7.2f}  {lat(v)}")
    o = r["overall"]
    rows.append(f"{'all':<10} {'':>5} {o['utterances']:>4} {o['hits']:>4} {pct(o['recall']):>6} "
                f"{pct(o['frr']):>6} {o['false_alarms']:>4} {o['fa_per_hour']:>7.2f}  {lat(o)}")
    inf = r["inference_ms"]
    rows.append(
        f"{r['recording']}: {r['duration_s'] / 60:.1f} min ({r['non_keyword_hours'] * 60:.1f} min "
        f"outside keywords), {o['duplicates']} duplicate detections; model {r['model']}; "
        f"VAD open {r['vad_active_ratio']:.0%} of {r['windows']} windows; "
        f"{r['cpu_per_audio_second'] * 100:.2f}% of a core; inference p50 "
        f"{_ms(inf['p50'])} p99 {_ms(inf['p99'])} ms")
    if "calibration" in r:
        c = r["calibration"]
        rows.append(f"calibrated for {c['target_fa_per_hour']:g} FA/h "
                    f"({'met' if c['met'] else 'NOT met'}): recall {pct(c['overall']['recall'])}, "
                    f"{c['overall']['fa_per_hour']:.2f} FA/h; thresholds "
                    + ", ".join(f"{k}={v:g}" for k, v in c["thresholds"].items())
                    + (f"; written to {c['config']}" if "config" in c else ""))
    return "\n".join(rows)


def _ms(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.2f}"


def plot_det(report: dict, path: str | Path) -> None:
    """False-reject rate against false alarms per hour: lower left is better."""
    from streamkws.tools import pyplot

    plt = pyplot()
    pts = report["det"]
    floor = 0.5 / max(report["non_keyword_hours"], 1e-9)  # half of one false alarm
    fig, ax = plt.subplots(figsize=(7, 5))
    for k in report["per_keyword"]:
        xs = [max(p["per_keyword"][k][1], floor) for p in pts]
        ys = [p["per_keyword"][k][0] for p in pts]
        ax.plot(xs, ys, lw=0.8, alpha=0.6, label=k)
    xs = [max(p["fa_per_hour"], floor) for p in pts]
    ax.plot(xs, [p["frr"] for p in pts], "k-", lw=2.2, label="all keywords")
    o = report["overall"]
    ax.plot([max(o["fa_per_hour"], floor)], [o["frr"]], "ro", ms=8,
            label="configured thresholds")
    ax.set_xscale("log")
    ax.set_xlabel(f"false alarms per hour (points at {floor:.2g} had none)")
    ax.set_ylabel("false-reject rate")
    ax.set_title(f"DET: {report['model']} on {Path(report['recording']).name} "
                 f"({report['duration_s'] / 60:.0f} min)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
