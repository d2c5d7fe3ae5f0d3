"""Datasets that ``train``, ``evaluate`` and the tools read.

Two layouts (see the README):

1. Labelled folders, ``DIR/<label>/*.wav``, where ``_silence_`` and ``_unknown_`` are ordinary
   labels. A folder whose name is not one of the model's labels is an *unknown* word (its
   clips become ``_unknown_``), so a 30-word folder tree maps onto the 12 classes.
2. The full Speech Commands download (v0.01 or v0.02): word folders plus
   ``validation_list.txt``, ``testing_list.txt`` and ``_background_noise_/``, with the
   standard 12-class mapping; ``_silence_`` clips are cut from the noise recordings.

The speaker of a clip is the file-name token right before ``_nohash_``; splits are made by
speaker, never by clip.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from streamkws.audio.wav import load_audio
from streamkws.errors import AudioError, StreamKWSError, no_folder

log = logging.getLogger(__name__)

KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
SILENCE, UNKNOWN = "_silence_", "_unknown_"
DEFAULT_LABELS = (*KEYWORDS, UNKNOWN, SILENCE)
NOISE_DIR_NAMES = ("_background_noise_",)
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")
CLIP_SAMPLES = 16000


@dataclass(frozen=True)
class Item:
    path: Path
    label: str
    speaker: str
    word: str
    """The spoken word (the folder or file-name word); for ``_unknown_`` the real word."""
    offset: int = 0
    """Start sample inside ``path`` (``_silence_`` clips cut from long noise recordings)."""


@dataclass
class Dataset:
    items: list[Item]
    labels: tuple[str, ...]
    root: str = ""
    skipped: list[str] = field(default_factory=list)
    """Files that could not be read, with the reason; reported, never silently dropped."""

    def __len__(self) -> int:
        return len(self.items)

    def counts(self) -> dict[str, int]:
        c = Counter(it.label for it in self.items)
        return {label: c.get(label, 0) for label in self.labels}

    def speakers(self) -> set[str]:
        return {it.speaker for it in self.items if it.label != SILENCE}

    def targets(self) -> np.ndarray:
        index = {label: i for i, label in enumerate(self.labels)}
        return np.array([index[it.label] for it in self.items], dtype=np.int64)

    def summary(self) -> dict:
        return {"root": self.root, "clips": len(self.items), "speakers": len(self.speakers()),
                "per_label": self.counts(), "skipped": len(self.skipped)}

    def subset(self, keep: Iterable[int]) -> Dataset:
        return Dataset([self.items[i] for i in keep], self.labels, self.root, self.skipped)

    def __add__(self, other: Dataset) -> Dataset:
        if other.labels != self.labels:
            raise StreamKWSError("cannot combine datasets with different label sets")
        return Dataset(self.items + other.items, self.labels,
                       f"{self.root}+{other.root}", self.skipped + other.skipped)


def speaker_of(path: Path) -> str:
    stem = path.stem
    if "_nohash_" in stem:
        # Lower case: a copy that renamed some files must not split one person in two.
        return stem.split("_nohash_")[0].rsplit("_", 1)[-1].lower()
    return f"{path.parent.name}-{stem}"  # no speaker recorded: each clip its own speaker


def is_speech_commands_download(root: Path) -> bool:
    return (root / "validation_list.txt").is_file() and (root / "testing_list.txt").is_file()


def load_dataset(
    root: str | Path,
    labels: Sequence[str] = DEFAULT_LABELS,
    split: str | None = None,
    silence_fraction: float = 0.1,
    seed: int = 0,
) -> Dataset:
    """Read either layout. ``split`` (train/validation/testing) applies to layout 2 only."""
    root = Path(root)
    if not root.is_dir():
        raise no_folder(root)
    labels = tuple(labels)
    if is_speech_commands_download(root):
        ds = _load_download(root, labels, split or "testing", silence_fraction, seed)
    else:
        if split not in (None, "all"):
            raise StreamKWSError(
                f"{root}: split {split!r} needs the full Speech Commands layout "
                "(validation_list.txt, testing_list.txt)"
            )
        ds = _load_folders(root, labels)
    if not ds.items:
        raise StreamKWSError(f"{root}: no audio clips found (expected DIR/<label>/*.wav)")
    return ds


def labels_for(keywords: Sequence[str] | None) -> tuple[str, ...]:
    """The label set for ``keywords`` (None: the ten Speech Commands words), with
    ``_unknown_`` and ``_silence_``; a bad list is one error naming the problem."""
    if keywords is None:
        return DEFAULT_LABELS
    words = [w.strip() for w in keywords]
    if not words or any(not w for w in words):
        raise StreamKWSError("--keywords: expected comma-separated words, e.g. marvin,sheila")
    if len(set(words)) != len(words):
        raise StreamKWSError(f"--keywords: a word is listed twice ({', '.join(words)})")
    if {UNKNOWN, SILENCE} & set(words):
        raise StreamKWSError(f"--keywords: {UNKNOWN} and {SILENCE} are always labels; list "
                             "only the words to spot")
    return (*words, UNKNOWN, SILENCE)


def missing_keywords(ds: Dataset) -> list[str]:
    """Keywords of ``ds.labels`` without a single clip in ``ds``."""
    counts = ds.counts()
    return [lb for lb in ds.labels if lb not in (UNKNOWN, SILENCE) and not counts.get(lb)]


def word_to_label(word: str, labels: Sequence[str]) -> str | None:
    """The label a folder or word named ``word`` trains: itself (in any case) when it is one
    of ``labels``, else ``_unknown_`` (None when there is no such label)."""
    if word in labels:
        return word
    # A folder "YES/" holds the keyword "yes": names typed by people vary in case.
    folded = {lb.casefold(): lb for lb in labels}
    if word.casefold() in folded:
        return folded[word.casefold()]
    return UNKNOWN if UNKNOWN in labels else None


def _load_folders(root: Path, labels: Sequence[str]) -> Dataset:
    items = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if folder.name in NOISE_DIR_NAMES or folder.name.startswith("."):
            continue
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() not in AUDIO_SUFFIXES:
                continue
            word = folder.name
            before_speaker = path.stem.split("_nohash_")[0]
            if word == UNKNOWN and "_" in before_speaker:
                # _unknown_/bed_0c540988_nohash_0.wav; everything before the speaker, so
                # _unknown_/follow_up_0c540988_nohash_0.wav is "follow_up", not "follow".
                word = before_speaker.rsplit("_", 1)[0]
            # An "other word" that is one of this label set's keywords is that keyword
            # (custom keywords: Speech Commands files "marvin" under _unknown_).
            spoken = word_to_label(word, labels)
            label = spoken if spoken not in (UNKNOWN, None) else word_to_label(folder.name,
                                                                                 labels)
            if label is None:
                continue
            items.append(Item(path, label, speaker_of(path), word))
    return Dataset(items, tuple(labels), str(root))


def _load_download(
    root: Path, labels: Sequence[str], split: str, silence_fraction: float, seed: int
) -> Dataset:
    if split not in ("train", "validation", "testing"):
        raise StreamKWSError(f"unknown split {split!r}: use train, validation or testing")
    lists = {
        name: {line.strip() for line in (root / f"{name}_list.txt").read_text().splitlines()
               if line.strip()}
        for name in ("validation", "testing")
    }
    items = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if folder.name in NOISE_DIR_NAMES or folder.name.startswith((".", "_")):
            continue
        label = word_to_label(folder.name, labels)
        if label is None:
            continue
        for path in sorted(folder.glob("*.wav")):
            rel = f"{folder.name}/{path.name}"
            in_split = (
                rel in lists[split] if split != "train"
                else rel not in lists["validation"] and rel not in lists["testing"]
            )
            if in_split:
                items.append(Item(path, label, speaker_of(path), folder.name))
    if SILENCE in labels:
        n = int(round(silence_fraction * len(items)))
        items += _silence_from_noise(root / "_background_noise_", n, split, seed)
    return Dataset(items, tuple(labels), f"{root}[{split}]")


def _silence_from_noise(noise_dir: Path, n: int, split: str, seed: int) -> list[Item]:
    """1-s clips at random offsets of the noise recordings, reproducible per split."""
    files = sorted(noise_dir.glob("*.wav")) if noise_dir.is_dir() else []
    if not files or n == 0:
        if n:
            log.warning("%s: no background noise found, so no _silence_ clips", noise_dir)
        return []
    digest = hashlib.sha256(f"{seed}:{split}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    lengths = {}
    for f in files:
        try:
            lengths[f] = len(load_audio(f))
        except AudioError as exc:
            log.warning("skipping unreadable noise file: %s", exc)
    usable = [f for f, n_s in lengths.items() if n_s > CLIP_SAMPLES]
    out = []
    for i in range(n):
        f = usable[i % len(usable)]
        offset = int(rng.integers(0, lengths[f] - CLIP_SAMPLES))
        out.append(Item(f, SILENCE, f"noise-{f.stem}", SILENCE, offset))
    return out


def speaker_split(
    ds: Dataset, val_fraction: float = 0.15, seed: int = 0
) -> tuple[Dataset, Dataset]:
    """Split by speaker: every clip of one speaker lands on the same side.

    A speaker's side depends only on a hash of (seed, speaker), so adding data never moves
    an existing speaker across the split.
    """
    def side(speaker: str) -> bool:
        h = hashlib.sha256(f"{seed}:{speaker}".encode()).digest()
        return int.from_bytes(h[:8], "little") / 2**64 < val_fraction

    val = [i for i, it in enumerate(ds.items) if side(it.speaker)]
    val_set = set(val)
    train = [i for i in range(len(ds.items)) if i not in val_set]
    return ds.subset(train), ds.subset(val)


def fit_clip(x: np.ndarray, n: int = CLIP_SAMPLES) -> np.ndarray:
    """Pad (centred) or centre-crop to exactly ``n`` samples."""
    if len(x) == n:
        return x
    if len(x) > n:
        start = (len(x) - n) // 2
        return x[start : start + n]
    pad = n - len(x)
    return np.pad(x, (pad // 2, pad - pad // 2))


class ClipCache:
    """Loads each clip once, as 1-s float32, keeping unreadable files out with a report."""

    def __init__(self) -> None:
        self._cache: dict[tuple[Path, int], np.ndarray] = {}
        self._long: dict[Path, np.ndarray] = {}

    def load(self, item: Item) -> np.ndarray:
        key = (item.path, item.offset)
        if key not in self._cache:
            if item.offset or item.label == SILENCE and item.path.parent.name in NOISE_DIR_NAMES:
                if item.path not in self._long:
                    self._long[item.path] = load_audio(item.path)
                x = self._long[item.path][item.offset : item.offset + CLIP_SAMPLES]
            else:
                x = load_audio(item.path)
            self._cache[key] = fit_clip(x.astype(np.float32))
        return self._cache[key]

    def load_all(self, ds: Dataset, progress: bool = False) -> tuple[np.ndarray, Dataset]:
        """All clips of ``ds`` as an array (N, 16000); unreadable ones are dropped, logged
        by path, and listed in the returned dataset's ``skipped``."""
        keep, arrays, skipped = [], [], list(ds.skipped)
        it: Iterable = ds.items
        if progress:
            from streamkws.progress import tqdm

            it = tqdm(ds.items, desc=f"loading {Path(ds.root).name or 'clips'}", unit="clip",
                      leave=False)
        for i, item in enumerate(it):
            try:
                arrays.append(self.load(item))
                keep.append(i)
            except AudioError as exc:
                log.warning("skipping unreadable clip: %s", exc)
                skipped.append(str(exc))
        out = ds.subset(keep)
        out.skipped = skipped
        x = np.stack(arrays) if arrays else np.zeros((0, CLIP_SAMPLES), np.float32)
        return x, out


def load_noise(folder: str | Path | None) -> list[np.ndarray]:
    """Background-noise recordings for augmentation (any readable audio in ``folder``)."""
    if folder is None:
        return []
    folder = Path(folder)
    if not folder.is_dir():
        raise no_folder(folder, "noise folder")
    out = []
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in AUDIO_SUFFIXES:
            try:
                x = load_audio(p)
            except AudioError as exc:
                log.warning("skipping unreadable noise file: %s", exc)
                continue
            if len(x) >= CLIP_SAMPLES:
                out.append(x)
    if not out:
        log.warning("%s: no noise recording of 1 s or more (WAV, FLAC, ...); training and "
                    "streams go without noise", folder)
    return out
