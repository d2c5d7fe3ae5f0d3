"""``streamkws prune``: make a float bundle sparse (magnitude) or narrower (structured).

Two methods:

``magnitude``
    Fine-grained pruning: the smallest-magnitude weights of every conv and linear layer
    (per layer, or ranked globally across layers) become exact zeros. The network keeps its
    shape, so this shrinks nothing by itself; it is the input to sparse storage or sparse
    kernels and a measure of redundancy.

``structured``
    Coarse-grained pruning: whole output channels (conv kernels, linear units) are removed
    and the layers are rebuilt narrower, so parameters, MACs and latency really drop. The
    search is greedy and accuracy-driven (in the spirit of NetAdapt, Yang et al. 2018):
    each iteration tries removing one step (1/8 of the original width by default) of the
    least important channels from each prunable layer in turn, keeps the candidate that
    costs the least accuracy on the validation clips of ``--data``, and stops before the
    drop from the unpruned model would exceed ``--margin`` (after halving the step once to
    use up the rest). Channels are ranked by the L2 norm of what they contribute to the
    next layer, measured on training clips; the norm of their own filter is available too
    but ranked worse than chance on the bundled DS-CNN. Removed channels are replaced by
    their mean activation, folded into the next layer's BatchNorm mean or bias, so a
    channel that is nearly constant costs nothing to remove.

Both record what was done in ``meta["pruning"]`` and write an ordinary float bundle that
``load_bundle`` rebuilds (structured results through per-layer width options of the
architecture) and that quantizes dynamically like any other.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune as tprune

from streamkws.bundle import Bundle, KWSModel, load_bundle
from streamkws.data import (
    UNKNOWN,
    ClipCache,
    Dataset,
    is_speech_commands_download,
    load_dataset,
    load_noise,
    speaker_split,
)
from streamkws.errors import StreamKWSError, no_folder
from streamkws.features import FrontEndConfig, LogMel
from streamkws.tools.outputs import check_output
from streamkws.tools.train import accuracy, check_count, score

log = logging.getLogger(__name__)

METHODS = ("magnitude", "structured")
STRUCTURED_ARCHS = ("dscnn", "tutorial_cnn", "mobilenetv2")
CRITERIA = ("activation", "l1", "l2")


# --- configuration and results ------------------------------------------------------------


@dataclass
class PruneConfig:
    method: str = "magnitude"
    sparsity: float = 0.5
    """magnitude: share of conv/linear weights set to zero."""
    scope: str = "layer"
    """magnitude: ``layer`` prunes each layer to ``sparsity``; ``global`` ranks all weights
    together (layers then end up with different sparsities)."""
    margin: float = 0.03
    """structured: largest allowed drop in validation accuracy (absolute, 0.03 = 3 points)."""
    step: float = 0.125
    """structured: share of a layer's original width removed per iteration."""
    refine: int = 1
    """structured: how often the step is halved once no full step fits the margin."""
    select: str = "accuracy"
    """structured: which candidate step to take, the one keeping the most ``accuracy`` or
    the lowest validation ``loss`` (smoother, so a little less prone to fitting the clips)."""
    criterion: str = "activation"
    """structured: channel ranking (see :func:`channel_scores`)."""
    data: Path | None = None
    noise: Path | None = None
    val_fraction: float | None = None
    """Share of speakers held out; None: the model's own (as it was trained)."""
    split_seed: int | None = None
    """Which speakers are held out; None: the model's own split (its validation speakers)."""
    seed: int = 0
    finetune: int = 0
    lr: float = 1e-3
    batch_size: int = 64
    calibration: int = 512
    """structured: training clips used to measure the activation means of removed channels."""
    progress: Callable[[str], None] | None = None

    def validate(self) -> PruneConfig:
        if self.method not in METHODS:
            raise StreamKWSError(f"unknown pruning method {self.method!r}: use "
                                 f"{' or '.join(METHODS)}")
        if not 0.0 <= self.sparsity < 1.0:
            raise StreamKWSError(f"--sparsity must be in [0, 1) (got {self.sparsity})")
        if self.scope not in ("layer", "global"):
            raise StreamKWSError(f"--scope must be layer or global (got {self.scope!r})")
        if not 0.0 <= self.margin <= 1.0:
            raise StreamKWSError(f"--margin must be in [0, 1] (got {self.margin})")
        if self.select not in ("accuracy", "loss"):
            raise StreamKWSError(f"--select must be accuracy or loss (got {self.select!r})")
        if self.refine < 0:
            raise StreamKWSError(f"--refine must be >= 0 (got {self.refine})")
        if not 0.0 < self.step <= 0.5:
            raise StreamKWSError(f"--step must be in (0, 0.5] (got {self.step})")
        if self.criterion not in CRITERIA:
            raise StreamKWSError(f"--criterion must be one of {', '.join(CRITERIA)} "
                                 f"(got {self.criterion!r})")
        if self.finetune < 0:
            raise StreamKWSError(f"--finetune must be >= 0 epochs (got {self.finetune})")
        # "not within" rather than "outside": NaN must fail too, and before pruning runs.
        if not 0.0 < self.lr <= 1.0:
            raise StreamKWSError(f"--lr must be within (0, 1] (got {self.lr})")
        if self.val_fraction is not None and not 0.0 < self.val_fraction < 1.0:
            raise StreamKWSError(f"--val-fraction must be in (0, 1) (got {self.val_fraction})")
        if self.method == "structured" and self.data is None:
            raise StreamKWSError("structured pruning needs --data DIR: the accuracy margin is "
                                 "checked on its validation clips")
        if self.finetune and self.data is None:
            raise StreamKWSError("--finetune needs --data DIR to train on")
        for name, path in (("--data", self.data), ("--noise", self.noise)):
            if path is not None and not Path(path).is_dir():
                raise no_folder(path, f"{name} folder")
        return self


@dataclass
class PruneResult:
    bundle: Bundle
    table: list[dict]
    report: dict = field(default_factory=dict)


def _say(cfg: PruneConfig, msg: str) -> None:
    log.info(msg)
    if cfg.progress is not None:
        cfg.progress(msg)


# --- data ---------------------------------------------------------------------------------


@dataclass
class PruneData:
    """The speaker-disjoint split of ``--data``: validation features for decisions and
    reports, training waveforms for calibration and fine-tuning."""

    val_feats: np.ndarray  # (N, T, F) raw log-Mel
    val_y: np.ndarray
    train_x: np.ndarray  # (M, 16000) waveforms
    train_y: np.ndarray
    noise: list[np.ndarray]
    summary: dict


def split_data(data: str | Path, labels: list[str], val_fraction: float = 0.15,
               seed: int = 0) -> tuple[Dataset, Dataset]:
    """Training and validation sides of ``data``, split by speaker as ``train`` does (same
    fraction and seed give the same split, so a model's own validation speakers are the
    ones the decisions are made on and no training clip is)."""
    root = Path(data)
    if is_speech_commands_download(root):
        return (load_dataset(root, labels, split="train", seed=seed),
                load_dataset(root, labels, split="validation", seed=seed))
    return speaker_split(load_dataset(root, labels), val_fraction, seed)


def load_prune_data(bundle: Bundle, cfg: PruneConfig, train_clips: int | None) -> PruneData:
    """Load the validation side, and ``train_clips`` clips of the training side (None: all)."""
    assert cfg.data is not None
    # By default the model's own split, so that no clip it trained on decides or measures
    # anything. A split of one's own (--split-seed) serves data that holds only training
    # speakers, keeping every unheard speaker for the final test: its decisions are then
    # made on speakers the model has heard, which the model's own split avoids.
    own = cfg.split_seed is None and cfg.val_fraction is None
    split_seed = cfg.split_seed if cfg.split_seed is not None else (
        bundle.split_seed if bundle.split_seed is not None else 0)
    fraction = cfg.val_fraction or bundle.validation_fraction or 0.15
    train_ds, val_ds = split_data(cfg.data, bundle.labels, fraction, split_seed)
    if train_clips is not None and len(train_ds) > train_clips:
        # A fixed, class-mixed subset: calibration needs typical activations, not all clips.
        pick = np.random.default_rng(cfg.seed).choice(len(train_ds), train_clips, replace=False)
        train_ds = train_ds.subset(sorted(int(i) for i in pick))
    cache = ClipCache()
    xva, val_ds = cache.load_all(val_ds)
    xtr, train_ds = cache.load_all(train_ds)
    if len(val_ds) + len(train_ds) == 0:  # say so before blaming the split
        raise StreamKWSError(f"{cfg.data}: no readable clips")
    if len(val_ds) == 0 and own:
        raise StreamKWSError(f"{cfg.data}: none of the model's validation speakers is in it "
                             "(it holds only speakers the model trained on?); split it your "
                             "own way with --split-seed N")
    if len(val_ds) == 0:
        raise StreamKWSError(f"{cfg.data}: the validation split is empty (no held-out speakers "
                             "at this --val-fraction); use more speakers or a larger fraction")
    noise: list[np.ndarray] = []
    if cfg.noise is not None:
        noise = load_noise(cfg.noise)
    elif (Path(cfg.data) / "_background_noise_").is_dir():
        noise = load_noise(Path(cfg.data) / "_background_noise_")
    summary = {
        "data": str(cfg.data),
        "split": f"by speaker, {fraction:.0%} of speakers held out (split seed {split_seed}"
                 + (", the model's own)" if own else ")"),
        "validation_clips": len(val_ds),
        "validation_speakers": len(val_ds.speakers()),
        "train_clips": len(train_ds),
        "noise_recordings": len(noise),
    }
    return PruneData(_features(bundle.frontend, xva), val_ds.targets(), xtr,
                     train_ds.targets(), noise, summary)


def _features(frontend: FrontEndConfig, x: np.ndarray) -> np.ndarray:
    logmel = LogMel(frontend)
    n = frontend.window_frames
    # In slices: the STFT of a whole data set at once would take gigabytes.
    parts = [logmel(x[i : i + 256])[:, :n] for i in range(0, len(x), 256)]
    if not parts:
        return np.zeros((0, n, frontend.n_mels), np.float32)
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


# --- counting -----------------------------------------------------------------------------


def count_macs(model: nn.Module, n_frames: int, n_mels: int) -> dict[str, int]:
    """Multiply-accumulates of each conv and linear layer for one window, by module name
    (``streamkws profile``'s hook counter, run in eval mode)."""
    from streamkws.tools.profile import count_macs as count

    was_training = model.training
    try:
        counts = count(model.eval(), torch.zeros(1, n_frames, n_mels))
    finally:
        model.train(was_training)
    return {layer.name: layer.macs for layer in counts.layers if layer.macs}


def _kind(mod: nn.Module) -> str:
    if isinstance(mod, nn.Linear):
        return "linear"
    if isinstance(mod, nn.Conv2d):
        k = "x".join(str(v) for v in mod.kernel_size)
        if mod.groups > 1 and mod.groups == mod.in_channels:
            return f"depthwise conv {k}"
        if mod.kernel_size == (1, 1):
            return "pointwise conv 1x1"
        return f"conv {k}"
    return type(mod).__name__


def weight_layers(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """The conv and linear layers whose weights magnitude pruning acts on."""
    return [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def sparsity_table(net: nn.Module) -> list[dict]:
    """One row per conv/linear layer: parameters of its weight, exact zeros, sparsity."""
    rows = []
    for name, mod in weight_layers(net):
        w = mod.weight.detach()
        zeros = int((w == 0).sum())
        rows.append({"layer": name, "kind": _kind(mod), "parameters": w.numel(),
                     "zeros": zeros, "sparsity": round(zeros / w.numel(), 4)})
    return rows


# --- magnitude pruning --------------------------------------------------------------------


def apply_magnitude_masks(net: nn.Module, sparsity: float, scope: str = "layer") -> None:
    """Attach L1 (magnitude) pruning masks to every conv/linear weight, in place.

    torch's pruning reparametrisation (``weight = weight_orig * weight_mask``) stays on,
    so gradients cannot revive a pruned weight during fine-tuning; :func:`make_permanent`
    bakes the zeros in afterwards.
    """
    layers = weight_layers(net)
    if scope == "global":
        total = sum(m.weight.numel() for _, m in layers)
        tprune.global_unstructured([(m, "weight") for _, m in layers],
                                   pruning_method=tprune.L1Unstructured,
                                   amount=int(round(sparsity * total)))
    else:
        for _, m in layers:
            tprune.l1_unstructured(m, "weight", amount=int(round(sparsity * m.weight.numel())))


def make_permanent(net: nn.Module) -> None:
    """Fold the masks into the weights and drop the reparametrisation (plain state dict)."""
    for _, m in weight_layers(net):
        if tprune.is_pruned(m) and hasattr(m, "weight_mask"):
            tprune.remove(m, "weight")


LARGE_DROP = 0.05
"""A validation accuracy drop (absolute) after magnitude pruning that is worth a warning."""


def magnitude_prune(bundle: Bundle, cfg: PruneConfig,
                    data: PruneData | None = None) -> PruneResult:
    model = copy.deepcopy(bundle.model).eval()
    net = model.net
    report: dict = {"method": "magnitude", "scope": cfg.scope, "sparsity": cfg.sparsity}
    if data is not None:
        report["validation_clips"] = len(data.val_y)
        report["accuracy_unpruned"] = round(accuracy(model, data.val_feats, data.val_y), 4)
    apply_magnitude_masks(net, cfg.sparsity, cfg.scope)
    if data is not None:
        report["accuracy_pruned"] = round(accuracy(model, data.val_feats, data.val_y), 4)
        _say(cfg, f"accuracy {report['accuracy_unpruned']:.4f} unpruned, "
                  f"{report['accuracy_pruned']:.4f} at sparsity {cfg.sparsity:g}")
        drop = report["accuracy_unpruned"] - report["accuracy_pruned"]
        if drop > LARGE_DROP and not cfg.finetune:
            # Small networks lose much to zeroed weights (MobileNetV2's 3x3 depthwise
            # filters have 9 weights each). The bundle asked for is still written, but a
            # near-useless model must not pass in silence.
            log.warning("accuracy fell from %.4f to %.4f at sparsity %g: fine-tune "
                        "(--finetune N, with --data and --noise) or prune less",
                        report["accuracy_unpruned"], report["accuracy_pruned"], cfg.sparsity)
    if cfg.finetune:
        assert data is not None
        report["finetune"] = finetune(model, data, bundle, cfg)
    make_permanent(net)
    table = sparsity_table(net)
    params = sum(r["parameters"] for r in table)
    zeros = sum(r["zeros"] for r in table)
    report["achieved_sparsity"] = round(zeros / max(1, params), 4)
    report["pruned_weights"] = zeros
    report["prunable_weights"] = params
    out = _derived_bundle(bundle, model, report, table, data)
    return PruneResult(out, table, report)


# --- structured pruning -------------------------------------------------------------------


@dataclass
class ChannelGroup:
    """Output channels that must be removed together, and everything they touch.

    ``producers`` are modules whose dimension 0 is this group's channels (the conv or
    linear layer that makes them, its BatchNorm, and a depthwise conv + BN that carries
    them through unchanged). ``consumers`` read them on dimension 1: ``(module, features
    per channel, BatchNorm after it or None)`` -- a flattening linear reads every channel
    as a block of time x frequency features; the BatchNorm (or, with None, the consumer's
    own bias) absorbs the mean of what is removed.
    """

    unit: str
    producers: list[str]
    consumers: list[tuple[str, int, str | None]]
    kwarg: tuple[str, int | None]

    @property
    def layer(self) -> str:
        """The layer that makes the channels (named in tables)."""
        return self.producers[0]


def channel_groups(net: nn.Module) -> tuple[list[ChannelGroup], dict]:
    """The prunable channel groups of ``net`` and the arch options their widths go into.

    Residual additions tie channels across blocks (both sides of an add must keep the same
    channels), so for mobilenetv2 only the expanded (inner) channels of each inverted
    residual and the final 1x1 conv are prunable; bcresnet's every stage is residual and
    frequency-wise, so it is not supported.
    """
    arch = getattr(net, "arch_name", type(net).__name__)
    mods = dict(net.named_modules())
    groups: list[ChannelGroup] = []
    lists: dict[str, list[int]] = {}
    if arch == "dscnn":
        n_blocks = len(net.blocks)
        lists["widths"] = [mods["stem.0"].out_channels] + [
            mods[f"blocks.{i}.3"].out_channels for i in range(n_blocks)]
        for i in range(n_blocks + 1):
            prod = ["stem.0", "stem.1"] if i == 0 else [f"blocks.{i - 1}.3", f"blocks.{i - 1}.4"]
            if i < n_blocks:
                # The next block's depthwise conv and its BN run per channel: they lose
                # exactly the channels the producer loses.
                prod += [f"blocks.{i}.0", f"blocks.{i}.1"]
                cons = [(f"blocks.{i}.3", 1, f"blocks.{i}.4")]
            else:
                cons = [("head.3", 1, None)]
            groups.append(ChannelGroup("kernels", prod, cons, ("widths", i)))
    elif arch == "tutorial_cnn":
        hw = (net.n_frames // 2) * (net.n_mels // 2)
        groups = [
            ChannelGroup("kernels", ["features.1", "features.2"],
                         [("features.6", 1, "features.7")], ("conv1_channels", None)),
            ChannelGroup("kernels", ["features.6", "features.7"],
                         [("classifier.1", hw, None)], ("conv2_channels", None)),
            ChannelGroup("units", ["classifier.1"],
                         [("classifier.4", 1, None)], ("hidden", None)),
        ]
    elif arch == "mobilenetv2":
        inner = []
        for b, block in enumerate(net.blocks):
            conv = block.conv
            if len(conv) == 8:  # expand 1x1, BN, ReLU, depthwise, BN, ReLU, project, BN
                p = f"blocks.{b}.conv"
                groups.append(ChannelGroup(
                    "kernels", [f"{p}.0", f"{p}.1", f"{p}.3", f"{p}.4"],
                    [(f"{p}.6", 1, f"{p}.7")], ("inner_channels", b)))
            inner.append(conv[0].out_channels)
        lists["inner_channels"] = inner
        groups.append(ChannelGroup("kernels", ["head.0", "head.1"],
                                   [("head.6", 1, None)], ("last_channels", None)))
    else:
        raise StreamKWSError(
            f"structured pruning supports the {', '.join(STRUCTURED_ARCHS)} architectures, "
            f"not {arch!r} (magnitude pruning works for every architecture)"
        )
    return groups, lists


def _width(net: nn.Module, group: ChannelGroup) -> int:
    mod = dict(net.named_modules())[group.layer]
    return mod.out_channels if isinstance(mod, nn.Conv2d) else mod.out_features


@dataclass
class InputStats:
    """Mean and variance of a consumer's input, per channel (conv) or feature (linear)."""

    mean: torch.Tensor
    var: torch.Tensor


def channel_scores(net: nn.Module, group: ChannelGroup, criterion: str = "activation",
                   stats: dict[str, InputStats] | None = None) -> torch.Tensor:
    """Importance of each channel of ``group``; the lowest go first.

    ``activation`` (default): the L2 norm of what the channel feeds the next layer once its
    mean is compensated -- its activation's standard deviation on calibration clips times
    the norm of the consumer weights reading it (BN-folded, so in the units the consumer's
    BN output has). That is the RMS error removing it leaves in the consumer.
    ``l1``/``l2``: the norm of the channel's own BN-folded filter, ``w * gamma / sqrt(var
    + eps)`` (BN rescales every channel, so the raw filter norm says little). Data-free,
    but blind to the depthwise conv and BN a DS-CNN channel still passes through, and on
    the bundled DS-CNN it ranked worse than chance.
    """
    mods = dict(net.named_modules())
    if criterion == "activation":
        if stats is None:
            raise ValueError("the activation criterion needs consumer input statistics")
        total = torch.zeros(_width(net, group))
        for cname, per, bn in group.consumers:
            w = mods[cname].weight.detach()
            if bn is not None:
                b = mods[bn]
                w = w * (b.weight.detach() / torch.sqrt(b.running_var + b.eps)).view(
                    -1, *([1] * (w.dim() - 1)))
            # Squared norm of each input column (over outputs and kernel positions),
            # times that input's variance, summed over a channel's features.
            col = w.pow(2).sum(0).flatten(1).sum(1) if w.dim() == 4 else w.pow(2).sum(0)
            energy = col * stats[cname].var
            total += energy.view(-1, per).sum(1)
        return total.sqrt()
    w = mods[group.producers[0]].weight.detach().flatten(1)
    if len(group.producers) > 1 and isinstance(mods[group.producers[1]], nn.BatchNorm2d):
        bn = mods[group.producers[1]]
        w = w * (bn.weight.detach().abs() / torch.sqrt(bn.running_var + bn.eps))[:, None]
    return w.abs().sum(1) if criterion == "l1" else w.pow(2).sum(1).sqrt()


def consumer_stats(net: nn.Module, groups: list[ChannelGroup],
                   feats: np.ndarray, batch: int = 256) -> dict[str, InputStats]:
    """Mean and variance of each consumer's input over (normalised) features."""
    mods = dict(net.named_modules())
    acc: dict[str, list] = {}
    hooks = []

    def hook(name: str) -> Callable[[nn.Module, tuple], None]:
        def fn(mod: nn.Module, inp: tuple) -> None:
            x = inp[0].detach().double()
            # One row per channel (conv: over batch and positions) or feature (linear).
            x = x.transpose(0, 1).flatten(1) if x.dim() == 4 else x.t()
            a = acc.setdefault(name, [0.0, 0.0, 0])
            a[0] = a[0] + x.sum(1)
            a[1] = a[1] + x.pow(2).sum(1)
            a[2] += x.shape[1]

        return fn

    for g in groups:
        for cname, _, _ in g.consumers:
            hooks.append(mods[cname].register_forward_pre_hook(hook(cname)))
    net.eval()
    try:
        with torch.inference_mode():
            for i in range(0, len(feats), batch):
                net(torch.from_numpy(feats[i : i + batch]))
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name, (s1, s2, n) in acc.items():
        mean = s1 / n
        out[name] = InputStats(mean.float(), (s2 / n - mean**2).clamp_min(0).float())
    return out


def _expand(idx: torch.Tensor, per: int) -> torch.Tensor:
    """Channel indices -> the flattened feature indices of those channels."""
    if per == 1:
        return idx
    return (idx[:, None] * per + torch.arange(per)[None, :]).reshape(-1)


def shrink(net: nn.Module, keep: dict[int, torch.Tensor], groups: list[ChannelGroup],
           lists: dict, stats: dict[str, InputStats] | None = None) -> nn.Module:
    """A physically narrower copy of ``net`` keeping channels ``keep[g]`` of group ``g``.

    The new network is built from the registry with updated width options, so it is
    exactly what ``load_bundle`` will rebuild, and the sliced weights are loaded strictly
    (any inconsistency between dependent layers fails here, not at inference).
    """
    sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
    kwargs = copy.deepcopy(net.arch_kwargs)
    for key, values in lists.items():
        kwargs[key] = list(values)
    for g, idx in keep.items():
        group = groups[g]
        idx = torch.as_tensor(idx, dtype=torch.long).sort().values
        width = _width(net, group)
        removed = torch.tensor(sorted(set(range(width)) - set(idx.tolist())), dtype=torch.long)
        for cname, per, bn in group.consumers:
            wkey = f"{cname}.weight"
            if stats is not None and len(removed):
                # Replace each removed input by its mean: a constant whose contribution the
                # consumer's BN mean (or its bias) absorbs exactly.
                cols = _expand(removed, per)
                w = sd[wkey].index_select(1, cols)
                shift = (w.flatten(2).sum(2) if w.dim() == 4 else w) @ stats[cname].mean[cols]
                if bn is not None:
                    sd[f"{bn}.running_mean"] -= shift
                else:
                    sd[f"{cname}.bias"] += shift
            sd[wkey] = sd[wkey].index_select(1, _expand(idx, per))
        for p in group.producers:
            for suffix in ("weight", "bias", "running_mean", "running_var"):
                key = f"{p}.{suffix}"
                if key in sd and sd[key].dim() > 0:
                    sd[key] = sd[key].index_select(0, idx)
        key, pos = group.kwarg
        if pos is None:
            kwargs[key] = len(idx)
        else:
            kwargs[key][pos] = len(idx)
    from streamkws.models import build_model

    new = build_model(net.arch_name, **kwargs)
    new.load_state_dict(sd, strict=True)
    return new.eval()


def _normalise(model: KWSModel, feats: np.ndarray) -> np.ndarray:
    mean = model.mean.numpy()
    inv = model.inv_std.numpy()
    return np.ascontiguousarray((feats - mean) * inv, dtype=np.float32)


def _step(channels: float, width: int) -> int:
    """Channels per step: at least one, and a multiple of 4 for a layer whose width is one
    while the step allows, so pruned widths stay aligned to 4-lane SIMD (NEON) kernels."""
    if width % 4 == 0 and channels >= 4:
        return 4 * int(channels // 4)
    return max(1, round(channels))


@dataclass
class _Candidate:
    group: int
    net: nn.Module
    accuracy: float
    loss: float
    macs: int
    width: int


def structured_search(net: nn.Module, val: np.ndarray, val_y: np.ndarray,
                      calib: np.ndarray | None, cfg: PruneConfig) -> tuple[nn.Module, dict]:
    """Greedy channel removal under the accuracy margin; ``val`` and ``calib`` are
    normalised features. Returns the last network within the margin and a log.

    Schedule: steps of ``cfg.step`` of each layer's original width while one fits the
    margin; then ``cfg.refine`` times half that step, to use up what margin is left.
    Steps are whole multiples of 4 channels where the width allows (:func:`_step`).
    """
    groups, _ = channel_groups(net)
    steps = [_step(_width(net, g) * cfg.step, _width(net, g)) for g in groups]
    widths = [_width(net, g) for g in groups]
    refine = cfg.refine
    n_frames, n_mels = net.n_frames, net.n_mels
    base_acc = accuracy(net, val, val_y)
    floor = base_acc - cfg.margin - 1e-9  # accuracies are ratios of counts: no float slop
    current, current_acc = net, base_acc
    current_macs = sum(count_macs(net, n_frames, n_mels).values())
    history: list[dict] = []
    evaluations = 0
    _say(cfg, f"unpruned: accuracy {base_acc:.4f} on {len(val_y)} clips, "
              f"{current_macs:,} MACs; keeping accuracy >= {base_acc - cfg.margin:.4f}")
    while True:
        groups, lists = channel_groups(current)
        stats = consumer_stats(current, groups, calib) if calib is not None else None
        cands = []
        for g, group in enumerate(groups):
            width = _width(current, group)
            # Never below one step: a layer must keep some channels to stay a layer.
            if width - steps[g] < steps[g]:
                continue
            scores = channel_scores(current, group, cfg.criterion, stats)
            order = scores.argsort(descending=True)
            cand = shrink(current, {g: order[: width - steps[g]]}, groups, lists, stats)
            acc, loss = score(cand, val, val_y)
            evaluations += 1
            macs = sum(count_macs(cand, n_frames, n_mels).values())
            cands.append(_Candidate(g, cand, acc, loss, macs, width))
        fits = [c for c in cands if c.accuracy >= floor]
        if fits:
            if cfg.select == "loss":
                # Lowest validation loss, among equals the larger saving.
                c = min(fits, key=lambda c: (c.loss, c.macs))
            else:
                c = max(fits, key=lambda c: (c.accuracy, -c.macs))
            current, current_acc, current_macs = c.net, c.accuracy, c.macs
            history.append({"layer": groups[c.group].layer, "from": c.width,
                            "to": c.width - steps[c.group], "accuracy": round(c.accuracy, 4),
                            "loss": round(c.loss, 4), "macs": c.macs})
            _say(cfg, f"{groups[c.group].layer}: {c.width} -> {c.width - steps[c.group]} "
                      f"{groups[c.group].unit}, accuracy {c.accuracy:.4f}, loss {c.loss:.4f}, "
                      f"{c.macs:,} MACs")
            continue
        best = max(cands, key=lambda c: c.accuracy) if cands else None
        if best is None:
            why = "every layer is at its minimum width"
        else:
            why = (f"the best next step ({groups[best.group].layer} -{steps[best.group]}) "
                   f"gives {best.accuracy:.4f}")
        if refine > 0 and any(s > 1 for s in steps):
            refine -= 1
            steps = [_step(s / 2, w) for s, w in zip(steps, widths, strict=True)]
            _say(cfg, f"{why}; halving the step")
            continue
        _say(cfg, f"stop: {why}")
        break
    return current, {"accuracy_unpruned": round(base_acc, 4),
                     "accuracy_pruned": round(current_acc, 4), "steps": history,
                     "stopped_by": "margin" if best is not None else "minimum widths",
                     "evaluations": evaluations}


def structure_table(before: nn.Module, after: nn.Module) -> list[dict]:
    """Per prunable layer: its channels before and after, its own MACs before and after
    (narrower inputs count too), and the dependent layers narrowed with it."""
    g_before, _ = channel_groups(before)
    g_after, _ = channel_groups(after)
    mb = count_macs(before, before.n_frames, before.n_mels)
    ma = count_macs(after, after.n_frames, after.n_mels)
    mods = dict(before.named_modules())
    rows = []
    for gb, ga in zip(g_before, g_after, strict=True):
        b, a = _width(before, gb), _width(after, ga)
        rows.append({"layer": gb.layer, "kind": _kind(mods[gb.layer]), "unit": gb.unit,
                     "before": b, "after": a, "pruned": b - a,
                     "also": [p for p in gb.producers[1:]
                              if isinstance(mods[p], nn.Conv2d)]
                     + [c for c, _, _ in gb.consumers],
                     "macs_before": mb.get(gb.layer, 0), "macs_after": ma.get(gb.layer, 0)})
    return rows


def structured_prune(bundle: Bundle, cfg: PruneConfig, data: PruneData) -> PruneResult:
    model = copy.deepcopy(bundle.model).eval()
    net = model.net
    channel_groups(net)  # refuse unsupported architectures before any work
    val = _normalise(model, data.val_feats)
    calib = None
    if cfg.calibration and len(data.train_x):
        # A random subset: the clips come ordered by label, and the statistics must cover
        # every class.
        n = min(cfg.calibration, len(data.train_x))
        pick = np.sort(np.random.default_rng(cfg.seed).choice(len(data.train_x), n,
                                                              replace=False))
        calib = _normalise(model, _features(bundle.frontend, data.train_x[pick]))
    elif cfg.criterion == "activation":
        raise StreamKWSError("the activation criterion needs training clips in --data for "
                             "its statistics; use --criterion l1 or l2")
    pruned, log_ = structured_search(net, val, data.val_y, calib, cfg)
    new_model = KWSModel(pruned, model.mean, model.inv_std).eval()
    report: dict = {"method": "structured", "margin": cfg.margin, "step": cfg.step,
                    "refine": cfg.refine, "select": cfg.select, "criterion": cfg.criterion,
                    "validation_clips": len(data.val_y), **log_}
    if cfg.finetune:
        report["finetune"] = finetune(new_model, data, bundle, cfg)
    table = structure_table(net, new_model.net)
    macs_b = sum(count_macs(net, net.n_frames, net.n_mels).values())
    macs_a = sum(count_macs(new_model.net, net.n_frames, net.n_mels).values())
    from streamkws.models import count_parameters

    report.update({
        "macs_before": macs_b, "macs_after": macs_a,
        "mac_reduction": round(1 - macs_a / macs_b, 4),
        "parameters_before": count_parameters(net),
        "parameters_after": count_parameters(new_model.net),
        "arch_kwargs_before": net.arch_kwargs,
    })
    out = _derived_bundle(bundle, new_model, report, table, data)
    return PruneResult(out, table, report)


# --- fine-tuning --------------------------------------------------------------------------


def finetune(model: KWSModel, data: PruneData, bundle: Bundle, cfg: PruneConfig) -> dict:
    """``cfg.finetune`` epochs on the training side, with the trainer's augmentation and
    front end, keeping the best state by validation accuracy (the state before fine-tuning
    included, so fine-tuning never returns a worse model). In place.

    Magnitude masks stay attached meanwhile (``weight = weight_orig * mask``), so pruned
    weights remain exactly zero whatever the optimiser does.
    """
    from streamkws.tools.augment import AugmentConfig
    from streamkws.tools.train import BatchMaker, balanced_epoch, train_epoch

    if len(data.train_y) == 0:
        raise StreamKWSError(f"{cfg.data}: no training clips to fine-tune on")
    if not data.noise:
        # Training mixed noise into most examples; without it the fine-tuned model drifts
        # towards clean audio.
        log.warning("fine-tuning without background noise: pass --noise DIR")
    labels = bundle.labels
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    make_batch = BatchMaker(data.train_x, data.train_y, labels, data.noise, AugmentConfig(),
                            LogMel(bundle.frontend), model.mean.numpy())
    unknown = labels.index(UNKNOWN) if UNKNOWN in labels else -1
    steps = int(np.ceil(len(data.train_y) / cfg.batch_size))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.finetune * steps)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    before = accuracy(model, data.val_feats, data.val_y)
    best = (before, 0, copy.deepcopy(model.state_dict()))
    history = []
    for epoch in range(cfg.finetune):
        order = balanced_epoch(data.train_y, rng, unknown)
        loss = train_epoch(model, order, cfg.batch_size, steps, make_batch, rng, loss_fn, opt,
                           sched)
        acc = accuracy(model, data.val_feats, data.val_y)
        history.append({"epoch": epoch + 1, "loss": round(loss, 4),
                        "accuracy": round(acc, 4)})
        _say(cfg, f"fine-tune epoch {epoch + 1}/{cfg.finetune}: loss {loss:.4f}, "
                  f"accuracy {acc:.4f}")
        if acc > best[0]:
            best = (acc, epoch + 1, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    model.eval()
    return {"epochs": cfg.finetune, "lr": cfg.lr, "accuracy_before": round(before, 4),
            "accuracy_after": round(best[0], 4), "best_epoch": best[1], "history": history,
            "train_clips": len(data.train_y)}


# --- the bundle ---------------------------------------------------------------------------


def _derived_bundle(src: Bundle, model: KWSModel, report: dict, table: list[dict],
                    data: PruneData | None) -> Bundle:
    from streamkws.models import count_parameters
    from streamkws.tools.evaluate import metrics_from_predictions, metrics_summary

    model.eval()
    meta = copy.deepcopy(src.meta)
    for key in ("created", "size_bytes_weights", "streamkws_version"):
        meta.pop(key, None)
    meta["name"] = f"{src.name}-pruned"
    meta["arch_kwargs"] = model.net.arch_kwargs
    meta["parameters"] = count_parameters(model.net)
    meta["pruned_from"] = {"name": src.name, "sha256": src.sha256,
                           "path": str(src.path) if src.path else None,
                           "metrics": src.meta.get("metrics")}
    meta["pruning"] = {**report, "layers": table, **({"data": data.summary} if data else {})}
    src.carry_detect(meta)
    if data is not None:
        # The source's metrics describe another network; these are the pruned model's own,
        # on the split the pruning decisions were made on.
        with torch.inference_mode():
            probs = torch.softmax(model(torch.from_numpy(data.val_feats)), -1).numpy()
        m = metrics_from_predictions(data.val_y, probs.argmax(1), src.labels)
        meta["metrics"] = {"validation": {
            **metrics_summary(m), "note": "the clips pruning decisions were made on"}}
    else:
        meta.pop("metrics", None)
    return Bundle(model, meta)


def prune_bundle(bundle: Bundle, cfg: PruneConfig) -> PruneResult:
    """Prune ``bundle`` (a float one) as ``cfg`` says; the result is not saved."""
    cfg.validate()
    if bundle.quantization != "none":
        raise StreamKWSError(
            f"model '{bundle.name}' is quantized ({bundle.quantization}); prune a float "
            "bundle (e.g. default-float) and quantize the result"
        )
    net = bundle.model.net
    frozen = [n for n in [net, *(m.net for m in getattr(net, "members", []))]
              if not getattr(n, "prunable", True)]
    if frozen:
        raise StreamKWSError(
            f"model '{bundle.name}' ({bundle.meta['arch']}) holds frozen pretrained weights "
            f"({frozen[0].arch_name}) that pruning would damage and fine-tuning could not "
            "repair; prune a network trained from scratch")
    if cfg.method == "structured":
        channel_groups(bundle.model.net)
    data = None
    if cfg.data is not None:
        # Structured search only needs calibration clips from the training side, fine-tuning
        # needs all of them.
        want = None if cfg.finetune else (cfg.calibration if cfg.method == "structured" else 0)
        data = load_prune_data(bundle, cfg, want)
        _say(cfg, f"{data.summary['validation_clips']} validation clips from "
                  f"{data.summary['validation_speakers']} held-out speakers, "
                  f"{data.summary['train_clips']} training clips")
    if cfg.method == "magnitude":
        return magnitude_prune(bundle, cfg, data)
    assert data is not None
    return structured_prune(bundle, cfg, data)


# --- output -------------------------------------------------------------------------------


def format_magnitude(result: PruneResult) -> str:
    rows = result.table
    width = max([len(r["layer"]) for r in rows] + [5])
    lines = [f"{'layer':<{width}}  {'kind':<22} {'parameters':>10} {'zeros':>8} {'sparsity':>8}"]
    for r in rows:
        lines.append(f"{r['layer']:<{width}}  {r['kind']:<22} {r['parameters']:>10,} "
                     f"{r['zeros']:>8,} {r['sparsity']:>8.1%}")
    params = sum(r["parameters"] for r in rows)
    zeros = sum(r["zeros"] for r in rows)
    lines.append(f"{'total':<{width}}  {'':<22} {params:>10,} {zeros:>8,} "
                 f"{zeros / max(1, params):>8.1%}")
    rep = result.report
    lines.append("")
    lines.append(f"magnitude pruning, {rep['scope']} scope, target sparsity "
                 f"{rep['sparsity']:.1%}, reached {rep['achieved_sparsity']:.1%}")
    lines += _accuracy_lines(rep)
    return "\n".join(lines)


def format_structured(result: PruneResult) -> str:
    rows = result.table
    width = max([len(r["layer"]) for r in rows] + [5])
    lines = [f"{'layer':<{width}}  {'kind':<20} {'channels':>14}  {'pruned':<18} "
             f"{'MACs':>22}  also narrowed"]
    for r in rows:
        change = f"{r['before']} -> {r['after']}"
        pruned = f"{r['pruned']}/{r['before']} {r['unit']}"
        macs = f"{r['macs_before']:,} -> {r['macs_after']:,}"
        lines.append(f"{r['layer']:<{width}}  {r['kind']:<20} {change:>14}  {pruned:<18} "
                     f"{macs:>22}  {', '.join(r['also'])}")
    rep = result.report
    lines += [
        "",
        f"parameters {rep['parameters_before']:,} -> {rep['parameters_after']:,} "
        f"(-{1 - rep['parameters_after'] / rep['parameters_before']:.1%}); "
        f"MACs per window {rep['macs_before']:,} -> {rep['macs_after']:,} "
        f"(-{rep['mac_reduction']:.1%})",
    ]
    lines += _accuracy_lines(rep, margin=rep["margin"])
    if "finetune" not in rep:
        lines.append("(the margin holds on the clips it was decided on; on new speakers "
                     "expect a larger drop: --finetune recovers some)")
    return "\n".join(lines)


def _accuracy_lines(rep: dict, margin: float | None = None) -> list[str]:
    if "accuracy_unpruned" not in rep:
        return ["(no --data: accuracy not measured)"]
    n = rep.get("validation_clips")
    s = (f"validation accuracy {rep['accuracy_unpruned']:.4f} unpruned -> "
         f"{rep['accuracy_pruned']:.4f} pruned")
    if margin is not None:
        s += f" (margin {margin:g})"
    if n:
        s += f" on {n} clips"
    out = [s]
    ft = rep.get("finetune")
    if ft:
        out.append(f"fine-tuned {ft['epochs']} epochs: {ft['accuracy_before']:.4f} -> "
                   f"{ft['accuracy_after']:.4f} (best epoch {ft['best_epoch']})")
    return out


# --- command line -------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default-float", metavar="M",
                   help="float bundle path or name (default: default-float)")
    p.add_argument("--method", choices=METHODS, default="magnitude",
                   help="magnitude: zero the smallest weights; structured: remove whole "
                        "channels and rebuild the layers narrower (default: magnitude)")
    p.add_argument("--sparsity", type=float, default=0.5, metavar="F",
                   help="magnitude: share of conv/linear weights to zero (default 0.5)")
    p.add_argument("--scope", choices=("layer", "global"), default="layer",
                   help="magnitude: per-layer sparsity, or one global ranking (default layer)")
    p.add_argument("--margin", type=float, default=0.03, metavar="F",
                   help="structured: largest allowed validation accuracy drop, absolute "
                        "(default 0.03 = 3 points)")
    p.add_argument("--step", type=float, default=0.125, metavar="F",
                   help="structured: share of a layer's width removed per step (default 1/8)")
    p.add_argument("--refine", type=int, default=1, metavar="N",
                   help="structured: halve the step up to N times once no full step fits "
                        "(default 1)")
    p.add_argument("--select", choices=("accuracy", "loss"), default="accuracy",
                   help="structured: take the step keeping the most accuracy (default) or "
                        "the lowest validation loss (smoother, fits the clips less)")
    p.add_argument("--criterion", choices=CRITERIA, default="activation",
                   help="structured: rank channels by the norm of what they feed the next "
                        "layer (activation, default) or of their BN-folded filter (l1, l2)")
    p.add_argument("--data", type=Path, metavar="DIR",
                   help="labelled clips: the held-out speakers decide (structured) and "
                        "measure accuracy, the others are for fine-tuning")
    p.add_argument("--val-fraction", type=float, default=None, metavar="F",
                   help="share of --data speakers held out (default: the model's own, as "
                        "recorded in its bundle)")
    p.add_argument("--split-seed", type=int, default=None, metavar="N",
                   help="which speakers of --data are held out (default: the model's own "
                        "split, its validation speakers); give one for data of training "
                        "speakers only, to keep unheard speakers for the final test")
    p.add_argument("--noise", type=Path, metavar="DIR",
                   help="background noise for fine-tuning augmentation")
    p.add_argument("--finetune", type=int, default=0, metavar="N",
                   help="fine-tune N epochs after pruning (default 0)")
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate")
    p.add_argument("--seed", type=int, default=0,
                   help="fine-tuning seed (the speaker split is --split-seed's)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--out", required=True, metavar="M2", help="bundle file to write")


_ONLY_FOR = {"magnitude": ("sparsity", "scope"),
             "structured": ("margin", "step", "refine", "select", "criterion")}
"""Options that one method reads and the other ignores (their defaults: PruneConfig's)."""


def config_from_args(args: argparse.Namespace) -> PruneConfig:
    defaults = PruneConfig()
    for method, options in _ONLY_FOR.items():
        if args.method == method:
            continue
        for name in options:
            if getattr(args, name) != getattr(defaults, name):
                raise StreamKWSError(f"--{name} applies to --method {method}, not "
                                     f"{args.method}")
    return PruneConfig(
        method=args.method, sparsity=args.sparsity, scope=args.scope, margin=args.margin,
        step=args.step, refine=args.refine, select=args.select, criterion=args.criterion,
        data=args.data,
        noise=args.noise,
        val_fraction=args.val_fraction, split_seed=args.split_seed, seed=args.seed,
        finetune=args.finetune, lr=args.lr,
        progress=None if args.json else (lambda m: print(m, file=sys.stderr, flush=True)),
    ).validate()


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    check_count("--threads", args.threads, 0, 1024, " (0: torch's choice)")  # as train's
    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = load_bundle(args.model)
    out = check_output(args.out, inputs=(bundle.path,))
    result = prune_bundle(bundle, cfg)
    result.bundle.meta["name"] = out.stem
    sha = result.bundle.save(out)
    if args.json:
        print(json.dumps({"model": str(out), "sha256": sha, "source": bundle.name,
                          "table": result.table,
                          **{k: v for k, v in result.report.items() if k != "steps"}}))
    else:
        fmt = format_magnitude if cfg.method == "magnitude" else format_structured
        print(fmt(result))
        print(f"wrote {out} ({result.bundle.meta['parameters']:,} parameters, sha256 "
              f"{sha[:12]})")
    return 0
