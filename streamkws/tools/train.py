"""``streamkws train``: train a keyword model on real (and optionally synthetic) speech.

Validation is speaker-disjoint (a speaker's clips are all on one side). Features come from
the same :class:`~streamkws.features.LogMel` the daemon runs, computed after waveform
augmentation, so training sees exactly what the stream will produce.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from streamkws.bundle import Bundle, new_bundle
from streamkws.data import (
    DEFAULT_LABELS,
    SILENCE,
    UNKNOWN,
    ClipCache,
    Dataset,
    is_speech_commands_download,
    labels_for,
    load_dataset,
    load_noise,
    missing_keywords,
    speaker_split,
)
from streamkws.errors import StreamKWSError
from streamkws.features import FrontEndConfig, LogMel, mel_centres_hz
from streamkws.models.speech_embedding import load_backbone
from streamkws.tools.augment import (
    AugmentConfig,
    augment_waveforms,
    spec_augment,
    warp_frequencies,
)

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    data: list[Path]
    out: Path
    arch: str = "dscnn"
    arch_kwargs: dict = field(default_factory=dict)
    labels: tuple[str, ...] = DEFAULT_LABELS
    extra: list[Path] = field(default_factory=list)
    """Training-only data (e.g. synthetic speech): never used for validation."""
    noise: Path | None = None
    epochs: int = 40
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-3
    label_smoothing: float = 0.05
    patience: int = 10
    val_fraction: float = 0.15
    seed: int = 0
    """Initialisation, batch order and augmentation."""
    split_seed: int = 0
    """Which speakers are held out. Separate from ``seed`` so that runs differing only in
    ``seed`` are validated (and can be compared or ensembled) on the same speakers."""
    name: str = "model"
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    frontend: FrontEndConfig = field(default_factory=FrontEndConfig)
    threads: int = 0
    progress: bool = True
    max_minutes: float | None = None
    unknown_share: float | None = None
    """Share of each epoch drawn from ``_unknown_`` (None: the same as every class)."""
    teacher: Path | None = None
    """A trained bundle (an ensemble, typically) whose posteriors the network also learns."""
    distill_weight: float = 0.5
    """Share of each target taken from the teacher's posteriors; the rest is the label."""
    ema: float | None = None
    """Decay of a moving average of the weights that is validated and kept instead of the
    weights themselves (None: no average)."""
    backbone: Path | None = None
    """``speech_embedding`` only: the pretrained embedding's weights (openWakeWord's
    ``embedding_model.onnx``, or a ``speech_embedding`` bundle to take them from)."""
    passes: int = 12
    """``speech_embedding`` only: augmented passes over the training clips embedded once
    (the frozen backbone costs too much to run on every batch) for the head to learn from."""
    unfreeze: int = 0
    """``speech_embedding`` only: also train the backbone's last this-many convolutions (at
    a tenth of the head's learning rate); the layers before them are still run once, and
    their maps cached instead of the embeddings."""

    def check_backbone(self) -> None:
        """Refuse, before any data is read, a backbone run that cannot be done."""
        if (self.arch == "speech_embedding") != (self.backbone is not None):
            raise StreamKWSError("--arch speech_embedding needs --backbone (openWakeWord's "
                                 "embedding_model.onnx), and --backbone only goes with it")
        if self.backbone is None:
            if self.unfreeze:
                raise StreamKWSError("--unfreeze goes with --backbone")
            return
        if self.ema or self.teacher:
            raise StreamKWSError("--backbone trains a head on embeddings computed once; "
                                 "--ema and --teacher do not apply to it")
        check_count("--passes", self.passes, 1, 100)
        check_count("--unfreeze", self.unfreeze, 0, MAX_UNFREEZE,
                     "; earlier layers' maps are too large to cache")
        if self.unfreeze and self.arch_kwargs.get("high_bands"):
            raise StreamKWSError("--unfreeze and --arch-arg high_bands do not go together "
                                 "(the side input is built for a frozen backbone)")
        if not Path(self.backbone).is_file():
            raise StreamKWSError(f"--backbone {self.backbone}: no such file")


@dataclass
class Split:
    x: np.ndarray  # (N, 16000) waveforms
    y: np.ndarray
    ds: Dataset


def check_count(flag: str, value: object, low: int, high: int, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise StreamKWSError(f"{flag} must be within {low}..{high} (got {value!r}){why}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_data(cfg: TrainConfig) -> tuple[Split, Split, list[np.ndarray], dict]:
    """Load, split by speaker, and report what the model will be trained on."""
    cache = ClipCache()
    train_parts, val_parts = [], []
    for root in cfg.data:
        if is_speech_commands_download(root):
            train_parts.append(load_dataset(root, cfg.labels, split="train",
                                            seed=cfg.split_seed))
            val_parts.append(load_dataset(root, cfg.labels, split="validation",
                                         seed=cfg.split_seed))
        else:
            tr, va = speaker_split(load_dataset(root, cfg.labels), cfg.val_fraction,
                                   cfg.split_seed)
            train_parts.append(tr)
            val_parts.append(va)
    # Clips of --data only: --extra's never enter validation, whatever their names.
    own = [it for part in train_parts + val_parts for it in part.items]
    for root in cfg.extra:
        train_parts.append(load_dataset(root, cfg.labels))
    train_ds = sum(train_parts[1:], train_parts[0])
    val_ds = sum(val_parts[1:], val_parts[0])
    missing = missing_keywords(train_ds)
    if missing:
        # A class without a clip is never learned, and the run would still report a
        # flattering accuracy: most likely the keywords are not the default ten.
        other = sorted({it.word for it in train_ds.items if it.label == UNKNOWN})[:12]
        raise StreamKWSError(
            f"no training clips of {', '.join(missing)}: name the words to spot with "
            f"--keywords (the data's other words include: {', '.join(other) or 'none'})")
    _warn_thin_data(cfg, train_ds, val_ds, own)
    overlap = train_ds.speakers() & val_ds.speakers()
    if overlap:
        # Only possible when two --data folders share speakers; flag it rather than
        # publish a flattering validation score.
        log.warning("%d speakers appear in both train and validation", len(overlap))
    xtr, train_ds = cache.load_all(train_ds, cfg.progress)
    xva, val_ds = cache.load_all(val_ds, cfg.progress)
    if len(val_ds) == 0:
        raise StreamKWSError("the validation split is empty: add speakers or raise --val-fraction")
    noise = load_noise(cfg.noise) if cfg.noise else []
    if cfg.noise is None:
        for root in cfg.data:
            if (root / "_background_noise_").is_dir():
                noise += load_noise(root / "_background_noise_")
    summary = {
        "train": train_ds.summary(),
        "validation": val_ds.summary(),
        "sources": [str(p) for p in cfg.data],
        "training_only_sources": [str(p) for p in cfg.extra],
        "noise_recordings": len(noise),
        # The text is for people; the number is what tools that rebuild the split read.
        "val_fraction": cfg.val_fraction,
        "split": f"by speaker, {cfg.val_fraction:.0%} of speakers held out "
                 f"(split seed {cfg.split_seed})",
        "speaker_overlap": len(overlap),
        "skipped_files": train_ds.skipped + val_ds.skipped,
    }
    return Split(xtr, train_ds.targets(), train_ds), Split(xva, val_ds.targets(), val_ds), \
        noise, summary


def _warn_thin_data(cfg: TrainConfig, train_ds, val_ds, own: list) -> None:
    """What a user's own data set may lack without the run failing: each makes the
    validation score, or a class, mean less than it seems."""
    if SILENCE in cfg.labels and not any(it.label == SILENCE for it in train_ds.items):
        log.warning("no %s clips in --data: that class is never learned, and quiet rooms may "
                    "be heard as words (add DIR/%s/ with 1-s recordings of the room)",
                    SILENCE, SILENCE)
    spoken = [it for it in own if it.label != SILENCE]
    unnamed = [it for it in spoken if "_nohash_" not in it.path.name]
    if unnamed:
        log.warning("%d of %d clips have no speaker in their file name (<speaker>_nohash_<n>.wav, "
                    "e.g. %s): each is taken as a speaker of its own, so validation may hear "
                    "people training did", len(unnamed), len(spoken),
                    unnamed[0].path)
    unseen = missing_keywords(val_ds)
    if unseen:
        log.warning("no validation clips of %s: its recall cannot be measured (more speakers, "
                    "or a larger --val-fraction)", ", ".join(unseen))


def feature_stats(x: np.ndarray, logmel: LogMel) -> tuple[np.ndarray, np.ndarray]:
    feats = np.concatenate([logmel(x[i : i + 256]) for i in range(0, len(x), 256)])
    flat = feats.reshape(-1, feats.shape[-1])
    return flat.mean(axis=0), flat.std(axis=0)


def balanced_epoch(y: np.ndarray, rng: np.random.Generator, unknown: int = -1,
                   unknown_share: float | None = None) -> np.ndarray:
    """One epoch of indices in which every class is drawn equally often, except that
    ``unknown`` may get its own share (rejecting other words needs more of them)."""
    classes = np.unique(y)
    per_class = int(np.ceil(len(y) / len(classes)))
    counts = {c: per_class for c in classes}
    if unknown_share is not None and unknown in counts:
        counts[unknown] = int(round(unknown_share * len(y)))
        rest = int(np.ceil((len(y) - counts[unknown]) / (len(classes) - 1)))
        counts.update({c: rest for c in classes if c != unknown})
    idx = [rng.choice(np.flatnonzero(y == c), counts[c], replace=counts[c] > (y == c).sum())
           for c in classes]
    out = np.concatenate(idx)
    rng.shuffle(out)
    return out


def logits_of(model: nn.Module, feats: np.ndarray, batch: int = 512) -> torch.Tensor:
    """The model's logits for precomputed features, in eval mode, ``batch`` clips at a time."""
    model.eval()
    with torch.inference_mode():
        return torch.cat([model(torch.from_numpy(feats[i : i + batch]))
                          for i in range(0, len(feats), batch)])


def evaluate_arrays(model: nn.Module, feats: np.ndarray, batch: int = 512) -> np.ndarray:
    """Predicted probabilities for precomputed features."""
    return torch.softmax(logits_of(model, feats, batch), -1).numpy()


def score(model: nn.Module, feats: np.ndarray, y: np.ndarray,
          batch: int = 512) -> tuple[float, float]:
    """Clip accuracy and mean cross-entropy of a model (``KWSModel`` or bare net)."""
    if len(y) == 0:
        return 0.0, 0.0
    logits, target = logits_of(model, feats, batch), torch.from_numpy(y)
    correct = int((logits.argmax(1) == target).sum())
    loss = float(nn.functional.cross_entropy(logits, target, reduction="sum"))
    return correct / len(y), loss / len(y)


def accuracy(model: nn.Module, feats: np.ndarray, y: np.ndarray) -> float:
    return score(model, feats, y)[0]


class BatchMaker:
    """Clip indices in, an augmented feature batch and its targets out.

    The one recipe for every loop that trains a network (training, pruning fine-tunes,
    quantization-aware fine-tuning), so they all see the same augmentation.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, labels: list[str],
                 noise: list[np.ndarray], augment: AugmentConfig, logmel: LogMel,
                 mean: np.ndarray) -> None:
        self.x, self.y, self.noise, self.augment, self.logmel = x, y, noise, augment, logmel
        # Masks take the per-bin mean, which the model's normalisation maps to zero.
        self.fill = np.asarray(mean, dtype=np.float32)
        self.n_frames = logmel.config.window_frames
        self.centres_hz = mel_centres_hz(logmel.config)
        self.silence = labels.index(SILENCE) if SILENCE in labels else -1
        self.unknown = labels.index(UNKNOWN) if UNKNOWN in labels else -1
        self.keyword = np.array([lb not in (SILENCE, UNKNOWN) for lb in labels])

    def __call__(self, idx: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor,
                                                                             torch.Tensor]:
        targets = self.y[idx].copy()
        wav = augment_waveforms(self.x[idx], targets == self.silence, self.noise,
                                self.augment, rng)
        if self.augment.reverse_as_unknown and self.unknown >= 0:
            flip = self.keyword[targets] & (rng.random(len(idx)) < self.augment.reverse_as_unknown)
            wav[flip] = wav[flip, ::-1]
            targets[flip] = self.unknown
        feats = warp_frequencies(self.logmel(wav)[:, : self.n_frames], self.centres_hz,
                                 self.augment, rng)
        feats = spec_augment(feats, self.augment, rng, fill=self.fill)
        return torch.from_numpy(feats), torch.from_numpy(targets)


MAX_UNFREEZE = 9
"""The last 9 convolutions read maps of at most 27 KiB per window (float32): about 4 GB
cached for 12 passes over 11k clips. The 10th from the end reads 85 KiB (12 GB)."""


class CachedBatches:
    """Batches drawn from examples made once (what a frozen backbone part computes)."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)

    def __call__(self, idx: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor,
                                                                             torch.Tensor]:
        return self.x[idx], self.y[idx]


def embed_passes(net: nn.Module, train_s: Split, val_feats: np.ndarray, logmel: LogMel,
                 make_batch: BatchMaker, passes: int, rng: np.random.Generator,
                 progress: bool, split: int, batch: int = 256
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run the frozen part of the backbone (its layers before ``split``) once over the clean
    training clips, ``passes`` augmented passes over them, and the validation windows:
    (train maps, their labels, validation maps). With nothing unfrozen the maps are the
    embeddings themselves."""
    n = len(train_s.y)
    bar = _progress(n * (passes + 1) + len(val_feats), progress, "embedding", "window")
    out, labels = [], []

    def embed(feats: np.ndarray | torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            e = net.frozen_part(torch.as_tensor(feats), split).contiguous().numpy()
        bar.update(len(e))
        return e

    n_frames = logmel.config.window_frames
    for i in range(0, n, batch):
        out.append(embed(logmel(train_s.x[i:i + batch])[:, :n_frames]))
    labels.append(train_s.y)
    for _ in range(passes):
        for i in range(0, n, batch):
            feats, y = make_batch(np.arange(i, min(i + batch, n)), rng)
            out.append(embed(feats))
            labels.append(y.numpy())
    val = np.concatenate([embed(val_feats[i:i + batch]) for i in range(0, len(val_feats), batch)])
    bar.close()
    return np.concatenate(out), np.concatenate(labels).astype(np.int64), val


class TeacherTargets:
    """A batch maker whose targets mix the labels with a teacher's posteriors.

    The teacher sees each batch exactly as augmented for the student, so its soft targets
    describe the very input being learnt (shifted, noisy, masked), and the student learns
    how much an other word resembles each keyword, which a one-hot label cannot say.
    Cross-entropy against the mixture is knowledge distillation at temperature 1."""

    def __init__(self, make_batch: Callable, teacher: nn.Module, n_classes: int,
                 weight: float) -> None:
        self.make_batch, self.teacher, self.n_classes, self.weight = (
            make_batch, teacher.eval(), n_classes, weight)

    def __call__(self, idx: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor,
                                                                             torch.Tensor]:
        feats, targets = self.make_batch(idx, rng)
        with torch.inference_mode():
            soft = torch.softmax(self.teacher(feats), -1)
        hard = nn.functional.one_hot(targets, self.n_classes).to(soft.dtype)
        return feats, (1 - self.weight) * hard + self.weight * soft


def load_teacher(cfg: TrainConfig) -> Bundle:
    """The teacher bundle, refused at once (before the data load) unless it hears as this
    run does; :func:`check_teacher_split` follows once the split is known."""
    from streamkws.bundle import load_bundle

    teacher = load_bundle(cfg.teacher)
    where = teacher.path or teacher.name
    why = teacher.mismatch(list(cfg.labels), cfg.frontend, other="this run's")
    if why:
        raise StreamKWSError(f"--teacher {where}: {why}")
    return teacher


def check_teacher_split(teacher: Bundle, cfg: TrainConfig, summary: dict) -> None:
    """A teacher that trained on this run's validation speakers would leak them into it."""
    from streamkws.bundle import split_identity

    ours = split_identity(cfg.split_seed, summary["sources"], summary["validation"]["clips"])
    why = teacher.mismatch(list(cfg.labels), cfg.frontend, ours, other="this run")
    if why:
        raise StreamKWSError(f"--teacher {teacher.path or teacher.name}: {why}")


BN_BATCHES = 16
"""Training batches that re-estimate a weight average's BatchNorm statistics."""


class WeightAverage:
    """Exponential moving average of a network's weights and buffers, updated every step.

    Averaging the last few hundred steps' weights is a cheap stand-in for an ensemble of
    nearby models (Polyak averaging). Integer buffers (BatchNorm's batch counters) are
    copied, not averaged."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        import copy

        if not 0 < decay < 1:
            raise ValueError(f"decay must be within (0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model)
        self.model.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for avg, cur in zip(self.model.state_dict().values(), model.state_dict().values(),
                            strict=True):
            if avg.is_floating_point():
                avg.lerp_(cur, 1.0 - self.decay)
            else:
                avg.copy_(cur)

    @torch.no_grad()
    def recalibrate(self, batches: Iterable[torch.Tensor]) -> None:
        """Recompute the average's BatchNorm statistics from its own activations.

        Averaged weights do not produce the activations whose statistics the trained
        network's BatchNorm layers tracked; while steps are large the mismatch collapses a
        deep network to one class (MobileNetV2 at chance for half a run, measured). A pass
        over training batches fixes it, as ``torch.optim.swa_utils.update_bn`` does, but
        with everything else in eval mode: dropout draws no random numbers, so the run
        being averaged is untouched."""
        norms = [m for m in self.model.modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.model.eval()
        if not norms:
            return
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a plain average over the batches
            m.train()
        for feats in batches:
            self.model(feats)
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
            m.eval()


def train_epoch(model: nn.Module, order: np.ndarray, batch_size: int, steps: int,
                make_batch: Callable, rng: np.random.Generator, loss_fn: nn.Module,
                opt: torch.optim.Optimizer, sched, on_step: Callable[[], object] | None = None,
                ) -> float:
    """One pass of ``steps`` batches taken in ``order``; returns the mean training loss.

    Training, pruning's fine-tune and quantization-aware fine-tuning all step this way, so
    a change to how a step is taken reaches all three."""
    model.train()
    losses = []
    for b in range(steps):
        idx = order[b * batch_size : (b + 1) * batch_size]
        feats, targets = make_batch(idx, rng)
        loss = loss_fn(model(feats), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step()
    return float(np.mean(losses))


def warmup_share(total_steps: int) -> float:
    """One-cycle warm-up: a tenth of the run, but at least two steps.

    torch's OneCycleLR divides by zero when the warm-up ends on step 0 (exactly 10 steps
    at a tenth, or 2 at a half): a short run on a small data set crashed with a traceback.
    """
    return min(0.45, max(0.1, 2.0 / total_steps))


def train(cfg: TrainConfig) -> Bundle:
    """Train, keep the best model by validation accuracy, write it to ``cfg.out``."""
    from streamkws.models import build_model

    t_start = time.monotonic()
    seed_everything(cfg.seed)
    cfg.check_backbone()
    # A wrong --arch or --arch-arg is found before minutes of loading clips; built aside,
    # so the network's initialisation below draws exactly what it always drew.
    with torch.random.fork_rng():
        build_model(cfg.arch, n_classes=len(cfg.labels), n_frames=cfg.frontend.window_frames,
                    n_mels=cfg.frontend.n_mels, **cfg.arch_kwargs)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    logmel = LogMel(cfg.frontend)
    teacher = load_teacher(cfg) if cfg.teacher else None
    train_s, val_s, noise, summary = prepare_data(cfg)
    if teacher is not None:
        check_teacher_split(teacher, cfg, summary)
    mean, std = feature_stats(train_s.x, logmel)
    val_feats = logmel(val_s.x)[:, : cfg.frontend.window_frames]
    labels = list(cfg.labels)
    net = build_model(cfg.arch, n_classes=len(labels), n_frames=cfg.frontend.window_frames,
                      n_mels=cfg.frontend.n_mels, **cfg.arch_kwargs)
    if cfg.backbone is not None:
        load_backbone(net, cfg.backbone)
        net.fit_bridge(logmel)
        # The bridge undoes the log, so this network reads the front end's values as they
        # are: identity normalisation. `mean` stays the SpecAugment fill below.
        bundle = new_bundle(net, np.zeros_like(mean), np.ones_like(std), labels,
                            cfg.frontend, cfg.name)
    else:
        bundle = new_bundle(net, mean, std, labels, cfg.frontend, cfg.name)
    model = bundle.model
    make_batch = augmented = BatchMaker(train_s.x, train_s.y, labels, noise, cfg.augment,
                                        logmel, mean)
    # What the optimiser trains, on which examples: the whole network on augmented batches,
    # or a frozen backbone's head (and its last --unfreeze layers) on the frozen part's
    # output for augmented passes made once.
    trainee, train_y = model, train_s.y
    groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    if cfg.backbone is not None:
        split = net.split_for(cfg.unfreeze)
        emb, train_y, val_feats = embed_passes(net, train_s, val_feats, logmel, augmented,
                                               cfg.passes, rng, cfg.progress, split)
        trainee = net.trainable_part(split)
        tuned = net.backbone.layers[split:].requires_grad_(True)
        # Pretrained layers move gently: at the head's rate they would forget what they
        # learnt from far more speakers than these clips hold.
        groups = [{"params": list(net.head.parameters())},
                  {"params": list(tuned.parameters()), "lr": cfg.lr / 10}]
        make_batch = augmented = CachedBatches(emb, train_y)
    steps_per_epoch = int(np.ceil(len(train_y) / cfg.batch_size))
    groups = [g for g in groups if g["params"]]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[g.get("lr", cfg.lr) for g in groups], total_steps=total_steps,
        pct_start=warmup_share(total_steps))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    if teacher is not None:
        make_batch = TeacherTargets(make_batch, teacher.model, len(labels), cfg.distill_weight)
    unknown_index = labels.index(UNKNOWN) if UNKNOWN in labels else -1
    average = WeightAverage(model, cfg.ema) if cfg.ema else None

    def on_step() -> None:
        bar.update(1)
        if average is not None:
            average.update(model)

    # What is validated and kept (the average, or the trainee itself), and the whole
    # network that holds it, for the partial bundle.
    kept = average.model if average is not None else trainee
    whole = average.model if average is not None else model
    # Its own generator: the batches that recalibrate the average must not move the run.
    bn_rng = np.random.default_rng([cfg.seed, 1])

    def bn_batches():
        for _ in range(BN_BATCHES):
            yield augmented(bn_rng.integers(0, len(train_y), cfg.batch_size), bn_rng)[0]
    best = {"accuracy": -1.0, "epoch": -1, "state": None}
    history = []
    # A run killed part-way (Ctrl-C, OOM, power) leaves its best network so far as a bundle
    # any command loads, rather than a checkpoint nothing reads; removed once the run ends.
    partial = cfg.out.with_name(cfg.out.stem + ".partial" + cfg.out.suffix)
    log.info("until the run ends, its best network so far is kept in %s", partial)
    bar = _progress(cfg.epochs * steps_per_epoch, cfg.progress)
    for epoch in range(cfg.epochs):
        order = balanced_epoch(train_y, rng, unknown_index, cfg.unknown_share)
        loss = train_epoch(trainee, order, cfg.batch_size, steps_per_epoch, make_batch, rng,
                           loss_fn, opt, sched, on_step=on_step)
        if average is not None:
            average.recalibrate(bn_batches())
        acc = accuracy(kept, val_feats, val_s.y)
        history.append({"epoch": epoch + 1, "loss": loss, "val_accuracy": acc})
        if average is not None:
            # The raw weights' score too, so a run shows what the average bought.
            history[-1]["raw_val_accuracy"] = accuracy(model, val_feats, val_s.y)
        bar.set_postfix(loss=f"{loss:.3f}", val=f"{acc:.3f}",
                        best=f"{max(acc, best['accuracy']):.3f}")
        log.info("epoch %d: loss %.4f, validation accuracy %.4f", epoch + 1, loss, acc)
        if acc > best["accuracy"]:
            best = {"accuracy": acc, "epoch": epoch + 1,
                    "state": {k: v.detach().clone() for k, v in kept.state_dict().items()}}
            Bundle(whole, {**bundle.meta, "training": {
                **summary, "partial": True, "epochs_run": epoch + 1, "best_epoch": epoch + 1,
                "seed": cfg.seed, "split_seed": cfg.split_seed, "val_accuracy": acc,
                **({"ema": cfg.ema} if cfg.ema else {})}}).save(partial)
        if epoch + 1 - best["epoch"] >= cfg.patience:
            log.info("early stop: no improvement for %d epochs", cfg.patience)
            break
        if cfg.max_minutes and (time.monotonic() - t_start) / 60 > cfg.max_minutes:
            log.warning("stopping after %.1f minutes (--max-minutes)", cfg.max_minutes)
            break
    bar.close()
    (trainee if average is None else model).load_state_dict(best["state"])
    model.eval()
    from streamkws.tools.evaluate import metrics_from_predictions, metrics_summary

    probs = evaluate_arrays(trainee, val_feats)
    val_metrics = metrics_from_predictions(val_s.y, probs.argmax(1), labels)
    bundle.meta.update({
        "training": {
            **summary,
            "epochs_run": len(history),
            "best_epoch": best["epoch"],
            "seed": cfg.seed,
            "split_seed": cfg.split_seed,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "augmentation": cfg.augment.to_dict(),
            "minutes": round((time.monotonic() - t_start) / 60, 2),
            "unknown_share": cfg.unknown_share,
            **({"ema": cfg.ema} if cfg.ema else {}),
            **({"backbone": {"file": Path(cfg.backbone).name, "passes": cfg.passes,
                             "unfreeze": cfg.unfreeze}}
               if cfg.backbone is not None else {}),
            **({"teacher": {"name": teacher.name, "sha256": teacher.sha256,
                            "arch": teacher.meta["arch"], "weight": cfg.distill_weight}}
               if teacher is not None else {}),
            "history": history,
        },
        "metrics": {"validation": metrics_summary(val_metrics)},
    })
    bundle.save(cfg.out)
    partial.unlink(missing_ok=True)
    return bundle


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kw: object) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, enabled: bool, desc: str = "training", unit: str = "step"):
    if not enabled:
        return _NoBar()
    from streamkws.progress import tqdm

    return tqdm(total=total, desc=desc, unit=unit)


def config_from_args(args) -> TrainConfig:
    check_count("--epochs", args.epochs, 1, 100_000)
    check_count("--batch-size", args.batch_size, 1, 65_536)
    check_count("--patience", args.patience, 1, 100_000)
    check_count("--threads", args.threads, 0, 1024, " (0: torch's choice)")
    # "not within" rather than "outside": NaN must fail too.
    checks = (("--val-fraction", args.val_fraction, 0 < args.val_fraction < 1,
               "within (0, 1)"),
              ("--lr", args.lr, args.lr is None or 0 < args.lr <= 1, "within (0, 1]"),
              ("--unknown-share", args.unknown_share,
               args.unknown_share is None or 0 <= args.unknown_share < 1, "within [0, 1)"),
              ("--reverse-as-unknown", args.reverse_as_unknown,
               0 <= args.reverse_as_unknown <= 1, "within [0, 1]"),
              ("--max-minutes", args.max_minutes,
               args.max_minutes is None or args.max_minutes > 0, "above 0"))
    for flag, value, ok, allowed in checks:
        if not ok:
            raise StreamKWSError(f"{flag} must be {allowed} (got {value:g})")
    if not 0 <= args.shift_ms <= 500:
        raise StreamKWSError(f"--shift-ms must be within 0..500 (got {args.shift_ms:g}); "
                             "a clip is 1000 ms")
    if not 0 <= args.warp < 0.5:
        raise StreamKWSError(f"--warp must be within [0, 0.5) (got {args.warp:g}); 0.1 scales "
                             "each example's frequencies by 0.9-1.1")
    aug = AugmentConfig(reverse_as_unknown=args.reverse_as_unknown, shift_ms=args.shift_ms,
                        warp_range=args.warp) if not args.no_augment else AugmentConfig.off()
    if not 0 < args.distill_weight <= 1:
        raise StreamKWSError(f"--distill-weight must be within (0, 1] (got "
                             f"{args.distill_weight:g})")
    if args.ema is not None and not 0 < args.ema < 1:
        raise StreamKWSError(f"--ema must be within (0, 1) (got {args.ema:g}); 0.999 "
                             "averages about the last thousand steps")
    # --passes' range is checked with the rest of a backbone run (check_backbone).
    for flag, given, needs, other in (
            ("--passes", args.passes != TrainConfig.passes, args.backbone, "--backbone"),
            ("--distill-weight", args.distill_weight != TrainConfig.distill_weight,
             args.teacher, "--teacher")):
        if given and not needs:
            raise StreamKWSError(f"{flag} goes with {other}; without it, it would do nothing")
    kwargs = {}
    for kv in args.arch_arg or []:
        if "=" not in kv:
            raise StreamKWSError(f"--arch-arg {kv!r}: expected NAME=VALUE")
        k, v = kv.split("=", 1)
        kwargs[k] = _number(v)
    return TrainConfig(
        data=[Path(d) for d in args.data], out=Path(args.out), arch=args.arch,
        arch_kwargs=kwargs, extra=[Path(d) for d in args.extra or []],
        noise=Path(args.noise) if args.noise else None, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr if args.lr is not None else 3e-3,
        patience=args.patience,
        val_fraction=args.val_fraction, seed=args.seed, split_seed=args.split_seed,
        name=args.name or Path(args.out).stem, augment=aug, threads=args.threads,
        labels=labels_for(args.keywords.split(",") if args.keywords is not None else None),
        progress=not args.quiet, max_minutes=args.max_minutes,
        unknown_share=args.unknown_share,
        teacher=Path(args.teacher) if args.teacher else None,
        distill_weight=args.distill_weight, ema=args.ema,
        backbone=Path(args.backbone) if args.backbone else None, passes=args.passes,
        unfreeze=args.unfreeze,
    )


def _number(v: str) -> int | float | str:
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def describe(b: Bundle) -> dict:
    t = b.meta.get("training", {})
    return {"model": str(b.path), "sha256": b.sha256, "arch": b.meta["arch"],
            "parameters": b.meta["parameters"],
            "validation": b.meta["metrics"]["validation"],
            "best_epoch": t.get("best_epoch"), "minutes": t.get("minutes"),
            "train_clips": t.get("train", {}).get("clips"),
            "validation_clips": t.get("validation", {}).get("clips")}

