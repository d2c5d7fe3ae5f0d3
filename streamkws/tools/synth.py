"""Synthetic keyword utterances (espeak-ng and flite) as a labelled-folder training set.

    python -m streamkws.tools.synth --out DIR [--words yes,no,...] [--unknown-words ...]
                                    [--per-word N] [--seed S] [--jobs 2]

Writes ``OUT/<label>/*.wav`` (16 kHz mono 16-bit PCM, exactly 1.0 s each) for every keyword
and for ``_unknown_`` (``_silence_`` is not made here), plus ``OUT/synth.json``, a manifest
with the settings and the counts. A second run with the same settings finds the manifest and
does nothing.

Synthetic speech is meant to be *mixed with* real Speech Commands clips: a model trained on
a handful of TTS voices learns the voices, not the words. So every utterance draws its own
voice at random, with the seed: one of ~8 espeak-ng English dialects x ~90 voice variants,
or one of the flite voices, each with its own pitch and speed, and the word with or without
punctuation (which changes its intonation). Clips are trimmed, peak-normalised to a random
level and placed at a random offset in the 1-s window.

File names follow the Speech Commands convention, with the voice as a pseudo-speaker so a
speaker-disjoint split keeps a voice out of either train or validation:
``<voice-id>_nohash_<n>.wav`` for keywords and ``<word>_<voice-id>_nohash_<n>.wav`` for
``_unknown_``; voice ids never contain ``_``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import wave
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamkws import SAMPLE_RATE
from streamkws.audio.wav import load_audio
from streamkws.errors import EXIT_USER_ERROR, ArgumentParser, AudioError, os_error_message

log = logging.getLogger(__name__)

KEYWORDS: tuple[str, ...] = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
UNKNOWN_LABEL = "_unknown_"

# The other Speech Commands v2 words: what the real ``_unknown_`` folder is made of.
SPEECH_COMMANDS_OTHER: tuple[str, ...] = (
    "bed", "bird", "cat", "dog", "eight", "five", "four", "happy", "house", "marvin", "nine",
    "one", "seven", "sheila", "six", "three", "tree", "two", "wow", "zero",
    "backward", "forward", "follow", "learn", "visual",
)  # fmt: skip
# Near-misses of the keywords, so the model learns the edges of each keyword, not just
# "some word that is not in the list". Homophones are left out on purpose: "know" sounds
# exactly like "no" and "write" like "right", so labelling them _unknown_ would teach the
# model that identical audio is two different classes.
NEAR_MISSES: tuple[str, ...] = (
    "yet", "yell", "yeah", "note", "nose", "cup", "pup", "town", "lift", "loft", "bright",
    "light", "of", "own", "stock", "top", "goal", "toe", "sop",
)  # fmt: skip
DEFAULT_UNKNOWN: tuple[str, ...] = tuple(dict.fromkeys(SPEECH_COMMANDS_OTHER + NEAR_MISSES))
UNKNOWN_FACTOR = 1.5  # _unknown_ gets per_word * 1.5 clips in all, spread over its words

CLIP_SAMPLES = SAMPLE_RATE  # every clip is exactly 1.0 s
MAX_SPEECH_S = 0.95  # longer utterances cannot sit in the window with any margin
MIN_SPEECH_S = 0.08  # shorter than any real word: a synthesis failure
SHORT_SPEECH_S = 0.22  # shorter than 9 in 10 real "up"s: say it again, slower
LEVEL_DB = (-20.0, -3.0)  # peak level range
MANIFEST = "synth.json"
# Bump when the output for given settings changes, so old caches are regenerated.
FORMAT_VERSION = 1

# espeak-ng: -p is 0..99 (relative to the variant's own base pitch), -s words per minute.
ESPEAK_PITCH = (20, 80)
# Isolated words are said slowly: trimmed keywords in speech_commands_v2_real have a median
# length of ~0.5 s, while 110..200 wpm gave espeak a median of 0.38 s. 95..185 centres it.
ESPEAK_SPEED = (95, 185)
# -a scales the waveform before espeak's 16-bit conversion. Several variants clip hard at
# the default 100 (ed, Gene, Jacky, Storm...), so stay low; loudness itself is set later by
# the peak normaliser, so this only decides whether espeak clips.
ESPEAK_AMPLITUDE = (20, 45)
# Variants left out: "fast" is a test voice (the default one, faster), "Demonic" and
# "announcer" are effects rather than voices. Names with spaces ("Mr serious") are skipped
# by the parser because they cannot be part of a file name token.
ESPEAK_VARIANT_DENY = frozenset({"fast", "Demonic", "announcer"})
FEMALE_SHARE = 0.4  # most espeak variants are male; draw female ones more often than 1 in 5

# flite: duration_stretch > 1 is slower; int_f0_target_mean is the mean pitch in Hz.
FLITE_STRETCH = {
    # kal16's duration model treats "on", "up", "no", "down" as function words and says
    # them in ~0.15 s; a slower range (and render()'s too-short retry) lengthens them.
    "kal16": (1.0, 1.5),
}
FLITE_STRETCH_DEFAULT = (0.8, 1.3)
FLITE_F0 = {"slt": (140.0, 250.0)}  # female voice; the others are male
FLITE_F0_DEFAULT = (80.0, 150.0)
# "kal" is kal16 at 8 kHz, and its phone set maps /ah/ to /aa/, so "up" comes out as "op";
# "*_time" voices are limited-domain (they only say clock times).
FLITE_DENY = frozenset({"kal"})
FLITE_SHARE = 0.25  # flite's few voices are the most natural ones; give them a quarter

# Text variants: punctuation changes espeak's and flite's intonation (statement, exclamation,
# question, continuation). Weights favour the plain word.
TEXT_FORMS: tuple[tuple[str, float], ...] = (
    ("{w}", 0.35), ("{w}.", 0.2), ("{W}!", 0.2), ("{W}?", 0.15), ("{w},", 0.1),
)  # fmt: skip
MAX_ATTEMPTS = 4  # takes per clip: too long is retried faster, too short slower
SPEEDUP = 1.25
SUBPROCESS_TIMEOUT_S = 30

_WORD = re.compile(r"^[a-z][a-z'-]*$")


# --- voices ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Voice:
    """One synthetic pseudo-speaker: an engine voice plus (for espeak) a variant."""

    engine: str  # "espeak" or "flite"
    name: str  # espeak language ("en-gb-scotland") or flite voice ("slt")
    variant: str = ""  # espeak variant file name ("m3", "klatt2"); empty for flite
    female: bool = False

    @property
    def id(self) -> str:
        parts = [self.engine, self.name] + ([self.variant] if self.variant else [])
        # Lower case and '-' only: the id is the speaker token of a Speech Commands style
        # file name, which is split on '_'.
        return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")


def _run_text(cmd: Sequence[str], any_status: bool = False) -> str:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("%s failed: %s", cmd[0], exc)
        return ""
    return res.stdout if res.returncode == 0 or any_status else ""


def espeak_voices() -> list[Voice]:
    """espeak-ng English dialects x voice variants, parsed from ``espeak-ng --voices``."""
    if shutil.which("espeak-ng") is None:
        return []
    dialects: list[str] = []
    for line in _run_text(["espeak-ng", "--voices=en"]).splitlines()[1:]:
        cols = line.split()
        # Only the built-in formant voices ("gmw/..."): the "mb/..." ones need MBROLA and
        # its voice files, which are not part of the espeak-ng package.
        if len(cols) >= 5 and cols[1].startswith("en") and cols[4].startswith("gmw/"):
            dialects.append(cols[1])
    variants: list[tuple[str, bool]] = []
    for line in _run_text(["espeak-ng", "--voices=variant"]).splitlines()[1:]:
        m = re.match(r"\s*\d+\s+variant\s+(\S+)\s+.*?!v/(\S+?)\s*(\(.*\))?\s*$", line)
        if m is None or m.group(2) in ESPEAK_VARIANT_DENY:
            continue
        variants.append((m.group(2), m.group(1).endswith("/F")))
    voices = {
        v.id: v
        for d in dict.fromkeys(dialects)
        for name, female in variants
        for v in [Voice("espeak", d, name, female)]
    }
    return sorted(voices.values(), key=lambda v: v.id)


def flite_voices() -> list[Voice]:
    """The voices built into flite (``flite -lv``), less the limited-domain ones."""
    if shutil.which("flite") is None:
        return []
    out = _run_text(["flite", "-lv"])
    names = out.split(":", 1)[1].split() if ":" in out else []
    keep = [n for n in names if n not in FLITE_DENY and not n.endswith("_time")]
    return sorted((Voice("flite", n, "", n in FLITE_F0) for n in keep), key=lambda v: v.id)


def discover_voices() -> list[Voice]:
    """Every usable voice on this machine, in a stable order (so a seed means the same)."""
    voices = espeak_voices() + flite_voices()
    if not voices:
        raise RuntimeError("no speech synthesiser found: install espeak-ng and/or flite")
    return voices


def engine_versions() -> dict[str, str]:
    """Synthesiser versions, part of the cache key: another version makes other audio."""
    out: dict[str, str] = {}
    if shutil.which("espeak-ng"):
        out["espeak-ng"] = _run_text(["espeak-ng", "--version"]).split("Data at")[0].strip()
    if shutil.which("flite"):
        text = _run_text(["flite", "--version"], any_status=True)  # it exits 1 after printing
        m = re.search(r"version:\s*(\S+)", text)
        out["flite"] = m.group(1) if m else "unknown"
    return out


# --- planning --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """Everything one output clip depends on, drawn up front so the result does not depend
    on how the work is split between threads."""

    label: str
    word: str
    index: int  # unique within the label: the <n> of "_nohash_<n>"
    text: str
    voice: Voice
    pitch: float  # espeak: -p (0..99); flite: int_f0_target_mean (Hz)
    speed: float  # espeak: -s (wpm); flite: duration_stretch
    amplitude: int  # espeak: -a
    level_db: float  # peak level of the written clip
    offset_frac: float  # where the utterance sits in the free part of the window, 0..1

    @property
    def filename(self) -> str:
        stem = self.voice.id if self.label != UNKNOWN_LABEL else f"{self.word}_{self.voice.id}"
        return f"{stem}_nohash_{self.index}.wav"


def unknown_counts(unknown_words: Sequence[str], per_word: int, seed: int) -> dict[str, int]:
    """Spread ``round(per_word * 1.5)`` clips over the unknown words as evenly as possible;
    which words get the remainder is drawn with the seed."""
    if not unknown_words:
        return {}
    total = round(per_word * UNKNOWN_FACTOR)
    base, extra = divmod(total, len(unknown_words))
    order = np.random.default_rng([seed, 1]).permutation(len(unknown_words))
    lucky = set(order[:extra].tolist())
    return {w: base + (i in lucky) for i, w in enumerate(unknown_words)}


def _draw(rng: np.random.Generator, voices: Sequence[Voice]) -> Voice:
    espeak = [v for v in voices if v.engine == "espeak"]
    flite = [v for v in voices if v.engine == "flite"]
    if flite and (not espeak or rng.random() < FLITE_SHARE):
        return flite[rng.integers(len(flite))]
    female = [v for v in espeak if v.female]
    male = [v for v in espeak if not v.female]
    pool = female if female and (not male or rng.random() < FEMALE_SHARE) else male
    return pool[rng.integers(len(pool))]


def _job(rng: np.random.Generator, voices: Sequence[Voice], label: str, word: str,
         index: int) -> Job:
    voice = _draw(rng, voices)
    forms, weights = zip(*TEXT_FORMS, strict=True)
    form = forms[rng.choice(len(forms), p=np.array(weights) / sum(weights))]
    text = form.format(w=word, W=word.capitalize())
    if voice.engine == "espeak":
        pitch = float(rng.integers(ESPEAK_PITCH[0], ESPEAK_PITCH[1] + 1))
        speed = float(rng.integers(ESPEAK_SPEED[0], ESPEAK_SPEED[1] + 1))
        amplitude = int(rng.integers(ESPEAK_AMPLITUDE[0], ESPEAK_AMPLITUDE[1] + 1))
    else:
        lo, hi = FLITE_F0.get(voice.name, FLITE_F0_DEFAULT)
        pitch = round(float(rng.uniform(lo, hi)), 1)
        speed = round(float(rng.uniform(*FLITE_STRETCH.get(voice.name,
                                                          FLITE_STRETCH_DEFAULT))), 3)
        amplitude = 0
    level = round(float(rng.uniform(*LEVEL_DB)), 2)
    return Job(label, word, index, text, voice, pitch, speed, amplitude, level,
               float(rng.random()))


def plan_jobs(words: Sequence[str], unknown_words: Sequence[str], per_word: int, seed: int,
              voices: Sequence[Voice]) -> list[Job]:
    """Draw every clip's voice and parameters. Same arguments, same plan."""
    if not voices:
        raise ValueError("no voices to draw from")
    rng = np.random.default_rng(seed)
    jobs = [_job(rng, voices, w, w, i) for w in words for i in range(per_word)]
    idx = 0
    for word, n in unknown_counts(unknown_words, per_word, seed).items():
        for _ in range(n):
            jobs.append(_job(rng, voices, UNKNOWN_LABEL, word, idx))
            idx += 1
    return jobs


# --- rendering -------------------------------------------------------------------------------


def _synth_cmd(voice: Voice, text: str, pitch: float, speed: float, amplitude: int,
               path: str) -> list[str]:
    if voice.engine == "espeak":
        v = f"{voice.name}+{voice.variant}" if voice.variant else voice.name
        return ["espeak-ng", "-v", v, "-p", str(int(pitch)), "-s", str(int(round(speed))),
                "-a", str(amplitude), "-w", path, text]
    return ["flite", "-voice", voice.name, "--setf", f"duration_stretch={speed:.3f}",
            "--setf", f"int_f0_target_mean={pitch:.1f}", "-t", text, "-o", path]


def trim_silence(x: np.ndarray, frame: int = 160, rel_db: float = -45.0,
                 floor_db: float = -60.0, pad_frames: int = 2) -> np.ndarray:
    """Cut leading and trailing silence: frames (10 ms) quieter than ``rel_db`` below the
    loudest frame (or than ``floor_db`` absolute). Only the ends are cut, so the closure
    silence inside "stop" or "up" stays; a 20 ms margin keeps soft onsets and releases."""
    n = len(x) // frame
    if n == 0:
        return x[:0]
    rms = np.sqrt(np.mean(x[: n * frame].reshape(n, frame).astype(np.float64) ** 2, axis=1))
    thr = max(rms.max() * 10 ** (rel_db / 20), 10 ** (floor_db / 20))
    loud = np.flatnonzero(rms > thr)
    if loud.size == 0:
        return x[:0]
    a = max(0, loud[0] - pad_frames) * frame
    b = min(len(x), (loud[-1] + 1 + pad_frames) * frame)
    return x[a:b]


def place(speech: np.ndarray, level_db: float, offset_frac: float,
          length: int = CLIP_SAMPLES) -> np.ndarray:
    """Peak-normalise ``speech`` to ``level_db`` dBFS and put it into ``length`` zeros,
    ``offset_frac`` of the way through the free space."""
    peak = float(np.abs(speech).max())
    y = speech.astype(np.float32) * np.float32(10 ** (level_db / 20) / peak)
    out = np.zeros(length, np.float32)
    start = int(offset_frac * (length - len(y)))
    out[start : start + len(y)] = y
    return out


def write_pcm16(path: Path, x: np.ndarray, rate: int = SAMPLE_RATE) -> None:
    ints = np.round(np.clip(x, -1.0, 1.0) * 32767.0).astype("<i2")
    tmp = path.with_suffix(".tmp")
    with wave.open(str(tmp), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(ints.tobytes())
    os.replace(tmp, path)  # never leave a half-written .wav that a trainer would read


def render(job: Job, tmp_dir: str) -> tuple[np.ndarray | None, str]:
    """Synthesise and post-process one job: (1-s clip, "") or (None, why it failed).

    An utterance too long for the window is said again faster; one shorter than
    ``SHORT_SPEECH_S`` (flite's kal16 clips "on" and "up" to ~0.15 s) is said again slower,
    keeping the short take should the slower one not fit."""
    fd, path = tempfile.mkstemp(suffix=".wav", dir=tmp_dir)
    os.close(fd)
    tempo, text = 1.0, job.text  # tempo > 1 is faster
    fits: np.ndarray | None = None  # the last take that fits the window
    try:
        for attempt in range(MAX_ATTEMPTS):
            speed = job.speed * tempo if job.voice.engine == "espeak" else job.speed / tempo
            cmd = _synth_cmd(job.voice, text, job.pitch, speed, job.amplitude, path)
            try:
                res = subprocess.run(cmd, capture_output=True, timeout=SUBPROCESS_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                return None, "synthesiser timed out"
            if res.returncode != 0:
                return None, f"{cmd[0]} exit {res.returncode}: {res.stderr[-200:]!r}"
            try:
                audio = load_audio(path)  # resamples espeak's 22.05 kHz with soxr
            except AudioError as exc:
                return None, str(exc)
            speech = trim_silence(audio)
            n = len(speech) / SAMPLE_RATE
            if n < MIN_SPEECH_S:
                return None, "empty"
            if n > MAX_SPEECH_S:
                if fits is not None:  # slowing down overshot: keep the short take
                    break
                # Same voice, faster, and without the punctuation (a question mark
                # stretches the final vowel).
                text, tempo = job.word, tempo * SPEEDUP
                continue
            fits = speech
            if n >= SHORT_SPEECH_S or tempo > 1.0 or attempt == MAX_ATTEMPTS - 1:
                break
            tempo /= SPEEDUP
        if fits is None:
            return None, "too long"
        return place(fits, job.level_db, job.offset_frac), ""
    finally:
        os.unlink(path)


def _make(job: Job, out: Path, tmp_dir: str) -> str:
    """Render one job into ``out/<label>/``; "" when done, else why not. Runs in a worker
    thread, so the clip is written there and never piles up in memory."""
    clip, why = render(job, tmp_dir)
    if clip is not None:
        write_pcm16(out / job.label / job.filename, clip)
    return why


# --- the dataset -----------------------------------------------------------------------------


def _settings(words: Sequence[str], unknown_words: Sequence[str], per_word: int, seed: int,
              voices: Sequence[Voice]) -> dict[str, Any]:
    ids = [v.id for v in voices]
    return {
        "format_version": FORMAT_VERSION,
        "words": list(words),
        "unknown_words": list(unknown_words),
        "per_word": per_word,
        "seed": seed,
        "engines": engine_versions(),
        # The drawing ranges too, so that tuning one of them invalidates an old cache.
        "params": {
            "espeak_pitch": ESPEAK_PITCH, "espeak_speed": ESPEAK_SPEED,
            "espeak_amplitude": ESPEAK_AMPLITUDE, "female_share": FEMALE_SHARE,
            "flite_share": FLITE_SHARE, "flite_stretch": FLITE_STRETCH,
            "flite_stretch_default": FLITE_STRETCH_DEFAULT, "flite_f0": FLITE_F0,
            "flite_f0_default": FLITE_F0_DEFAULT, "text_forms": TEXT_FORMS,
            "level_db": LEVEL_DB, "max_speech_s": MAX_SPEECH_S, "min_speech_s": MIN_SPEECH_S,
            "short_speech_s": SHORT_SPEECH_S, "speedup": SPEEDUP,
        },
        # The voice list decides the draw; a machine with other voices makes another set.
        "n_voices": len(ids),
        "voices_sha1": hashlib.sha1("\n".join(ids).encode()).hexdigest(),
    }


def _read_manifest(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _write_manifest(out: Path, data: dict[str, Any]) -> None:
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, out / MANIFEST)


def _is_complete(out: Path, manifest: dict[str, Any] | None, settings: dict[str, Any]) -> bool:
    # Compare through JSON, as the manifest stores it (tuples come back as lists).
    settings = json.loads(json.dumps(settings))
    if not manifest or not manifest.get("complete") or manifest.get("settings") != settings:
        return False
    return all(
        len(list((out / label).glob("*.wav"))) == n for label, n in manifest["counts"].items()
    )


_OURS = re.compile(r"^(?:[a-z'-]+_)?(?:espeak|flite)-[a-z0-9-]+_nohash_\d+\.(?:wav|tmp)$")
"""The names :attr:`Job.filename` gives (and their temporary files): the only files a new run
may delete from a folder an earlier run made."""


def _prepare(out: Path, manifest: dict[str, Any] | None, labels: Sequence[str]) -> None:
    """Empty the label folders of a previous (other or unfinished) run. A folder that holds
    files but no manifest is not ours, and a file whose name synth does not give was put
    there by someone else: refuse rather than mix or delete someone's data."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out}: is a file, not a folder")
    if out.exists() and manifest is None and any(out.iterdir()):
        raise FileExistsError(f"--out {out}: is not empty and has no {MANIFEST}; use a new "
                              "folder")
    old = set(manifest.get("labels", [])) if manifest else set()
    doomed = []
    for label in sorted(old | set(labels)):
        d = out / label
        if d.is_dir():
            for p in sorted(d.iterdir()):
                if not _OURS.match(p.name):
                    raise FileExistsError(
                        f"{p}: not made by synth, and this run re-makes {d}; move it out, or "
                        "give a new --out")
                doomed.append(p)
    for p in doomed:
        p.unlink()
    for label in labels:
        (out / label).mkdir(parents=True, exist_ok=True)


def _check_words(words: Sequence[str], what: str) -> None:
    for w in words:
        if not _WORD.match(w):
            raise ValueError(f"{what}: {w!r} is not a lower-case word (a-z, ' and -)")


def synthesize(out_dir: str | Path, words: Sequence[str] = KEYWORDS,
               unknown_words: Sequence[str] = DEFAULT_UNKNOWN, per_word: int = 400,
               seed: int = 0, jobs: int = 2, progress: bool = True) -> dict[str, Any]:
    """Make (or find) the synthetic dataset in ``out_dir``; return a summary.

    The summary has ``counts`` (clips per label), ``voices`` (clips per voice id),
    ``engines`` (clips per engine), ``failed`` (jobs that gave no usable clip), ``seconds``
    and ``skipped`` (True when a complete set with these settings was already there).
    """
    from streamkws.progress import tqdm

    words = list(dict.fromkeys(words))
    _check_words(words, "words")
    _check_words(unknown_words, "unknown words")
    # A keyword cannot also be an unknown word (the default list has "one" and "four":
    # a trainer may make those keywords).
    dropped = [w for w in unknown_words if w in words]
    if dropped:
        log.info("not using keywords %s as unknown words", dropped)
    unknown_words = [w for w in dict.fromkeys(unknown_words) if w not in words]
    if per_word < 0 or jobs < 1:
        raise ValueError("per_word must be >= 0 and jobs >= 1")
    out = Path(out_dir)
    voices = discover_voices()
    settings = _settings(words, unknown_words, per_word, seed, voices)
    manifest = _read_manifest(out)
    if _is_complete(out, manifest, settings):
        assert manifest is not None
        log.info("%s already holds this synthetic set; nothing to do", out)
        return {**manifest["summary"], "skipped": True, "seconds": 0.0}

    t0 = time.monotonic()
    plan = plan_jobs(words, unknown_words, per_word, seed, voices)
    labels = list(dict.fromkeys([*words, *([UNKNOWN_LABEL] if unknown_words else [])]))
    _prepare(out, manifest, labels)
    _write_manifest(out, {"settings": settings, "labels": labels, "complete": False})
    log.info("synthesising %d clips with %d voices, %d threads", len(plan), len(voices), jobs)

    counts: Counter[str] = Counter({label: 0 for label in labels})
    used: Counter[str] = Counter()
    engines: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    # Threads, not processes: the work is waiting on espeak-ng/flite subprocesses, and
    # `jobs` threads keep at most `jobs` synthesisers running at once.
    with tempfile.TemporaryDirectory(prefix="streamkws-synth-") as tmp:
        pool = ThreadPoolExecutor(max_workers=jobs)
        try:
            futures = {pool.submit(_make, job, out, tmp): job for job in plan}
            for fut in tqdm(as_completed(futures), total=len(plan), desc="synth", unit="clip",
                            disable=not progress):
                job = futures[fut]
                why = fut.result()
                if why:
                    failures[why.split(":")[0]] += 1
                    log.debug("no clip for %s (%s): %s", job.filename, job.text, why)
                    continue
                counts[job.label] += 1
                used[job.voice.id] += 1
                engines[job.voice.engine] += 1
        finally:
            # On Ctrl-C or an error, drop the queued jobs instead of finishing thousands.
            pool.shutdown(wait=True, cancel_futures=True)
    if failures:
        log.warning("%d of %d clips failed: %s", sum(failures.values()), len(plan),
                    dict(failures))

    summary: dict[str, Any] = {
        "out_dir": str(out),
        "counts": dict(counts),
        "voices": dict(sorted(used.items())),
        "engines": dict(engines),
        "failed": sum(failures.values()),
        "failures": dict(failures),
        "n_voices_available": len(voices),
    }
    _write_manifest(out, {"settings": settings, "labels": labels, "complete": True,
                          "counts": dict(counts), "summary": summary})
    return {**summary, "skipped": False, "seconds": round(time.monotonic() - t0, 1)}


def _split(s: str | None) -> list[str] | None:
    return None if s is None else [w.strip().lower() for w in s.split(",") if w.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m streamkws.tools.synth", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="output folder")
    ap.add_argument("--words", help="comma-separated keywords (default: the 10 commands)")
    ap.add_argument("--unknown-words", help="comma-separated _unknown_ words ('' for none)")
    ap.add_argument("--per-word", type=int, default=400, help="clips per keyword")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2, help="synthesisers run at once")
    ap.add_argument("--json", action="store_true", help="print the whole summary as JSON")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    words = _split(args.words) or list(KEYWORDS)
    unknown = _split(args.unknown_words)
    try:
        summary = synthesize(args.out, words, DEFAULT_UNKNOWN if unknown is None else unknown,
                             args.per_word, args.seed, args.jobs)
    except (ValueError, RuntimeError, FileExistsError) as exc:
        # One line and status 2, as every other command's user error.
        print(f"{ap.prog}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:  # a file in the path, no permission
        print(f"{ap.prog}: error: {os_error_message(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    state = "already complete" if summary["skipped"] else f"made in {summary['seconds']} s"
    print(f"{summary['out_dir']}: {state}")
    for label, n in summary["counts"].items():
        print(f"  {label:10s} {n:6d}")
    print(f"  voices: {len(summary['voices'])} used of {summary['n_voices_available']}; "
          f"engines: {summary['engines']}; failed: {summary['failed']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
