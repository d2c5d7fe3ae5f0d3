"""Several trained networks answering as one: the mean of their class probabilities.

Networks trained alike but from different seeds make partly different mistakes on speakers
none of them heard; averaging their posteriors cancels some of those mistakes. On held-out
streams, within one false alarm per 5 minutes, every pair of seeds of the default recipe
recalled more keywords than its members did on average, and four seeds together 0.844
against 0.808 for the best single one (docs/experiments.md, "Seeds and ensembles"). The
price is one forward pass, and one model's weights, per member.

An ensemble is built from trained bundles (``streamkws ensemble``), not trained itself.
Each member keeps its own feature normalisation, so members need not share it.

It can also average each window over fixed frequency warps (``streamkws ensemble --warp``):
every member hears the window with its log-Mel axis scaled by each factor in turn, as a
voice with a shorter or longer vocal tract would sound, and all the answers are averaged.
That lets a speaker unlike the training voices be heard nearer to them, at the price of one
forward pass per warp (docs/experiments.md, "Averaging over frequency warps at test time").
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from streamkws.errors import StreamKWSError
from streamkws.features import warp_bands
from streamkws.models.registry import (
    KWSModel,
    build_model,
    check_features,
    check_int,
    register,
)

_FLOOR = 1e-12
"""Smallest probability kept before the log: log(0) would poison a later softmax."""


@register("ensemble")
class Ensemble(nn.Module):
    """``members``: ``[{"arch": name, "arch_kwargs": {...}}, ...]``, two or more (one is
    enough with warps), each with the ensemble's ``n_classes``, ``n_frames`` and ``n_mels``.

    ``warp_factors``, with ``band_centres_hz`` (the front end's mel centres, which the warp
    interpolates between): each window is also scored with its frequency axis scaled by
    each factor, and the average is over warps and members alike.

    The output is the log of the members' mean probabilities, so a softmax over it (what
    every caller of a model does) gives exactly that mean.
    """

    def __init__(self, n_classes: int, n_frames: int, n_mels: int,
                 members: list[dict[str, Any]] | None = None,
                 warp_factors: list[float] | None = None,
                 band_centres_hz: list[float] | None = None) -> None:
        super().__init__()
        self.n_classes = check_int("n_classes", n_classes)
        self.n_frames = check_int("n_frames", n_frames)
        self.n_mels = check_int("n_mels", n_mels)
        self._set_warps(warp_factors, band_centres_hz)
        fewest = 1 if self.n_warps else 2
        if not isinstance(members, list) or len(members) < fewest:
            raise StreamKWSError("an ensemble needs two or more members (or one, averaged "
                                 "over warps); build one from trained bundles with "
                                 "`streamkws ensemble`")
        nets = []
        for i, spec in enumerate(members):
            if not isinstance(spec, dict) or not {"arch", "arch_kwargs"} <= set(spec):
                raise StreamKWSError(f"ensemble member {i}: expected arch and arch_kwargs")
            if spec["arch"] == "ensemble":
                raise StreamKWSError(f"ensemble member {i} is itself an ensemble; list its "
                                     "members instead")
            kwargs = dict(spec["arch_kwargs"])
            sizes = {k: kwargs.pop(k, None) for k in ("n_classes", "n_frames", "n_mels")}
            if sizes != {"n_classes": n_classes, "n_frames": n_frames, "n_mels": n_mels}:
                raise StreamKWSError(
                    f"ensemble member {i} ({spec['arch']}) has sizes {sizes}, the ensemble "
                    f"{n_classes} classes, {n_frames} frames, {n_mels} mel bins")
            nets.append(build_model(spec["arch"], n_classes, n_frames, n_mels, **kwargs))
        # Each member normalises with its own statistics (copied in from its bundle).
        self.members = nn.ModuleList(KWSModel(net, torch.zeros(n_mels), torch.ones(n_mels))
                                     for net in nets)
        self.fixed_frames = any(getattr(net, "fixed_frames", False) for net in nets)

    def _set_warps(self, factors: list[float] | None, centres: list[float] | None) -> None:
        self.n_warps = 0
        if factors is None and centres is None:
            return
        if not isinstance(factors, list) or len(factors) < 2 or not all(
                isinstance(f, int | float) and not isinstance(f, bool) and 0.5 <= f <= 2.0
                for f in factors):
            raise StreamKWSError("ensemble option 'warp_factors' must be a list of two or "
                                 f"more factors within 0.5..2 (got {factors!r})")
        if not isinstance(centres, list) or len(centres) != self.n_mels or not all(
                isinstance(c, int | float) and not isinstance(c, bool) for c in centres) \
                or any(b <= a for a, b in zip(centres, centres[1:], strict=False)):
            raise StreamKWSError("ensemble option 'band_centres_hz' must list the "
                                 f"{self.n_mels} mel band centres in rising order")
        maps = [warp_bands(np.asarray(centres, np.float64), f) for f in factors]
        # Not persistent: rebuilt from the options, so bundles hold only the factors.
        self.register_buffer("warp_lo", torch.as_tensor(np.stack([m[0] for m in maps])),
                             persistent=False)
        self.register_buffer("warp_hi", torch.as_tensor(np.stack([m[1] for m in maps])),
                             persistent=False)
        self.register_buffer("warp_w", torch.as_tensor(np.stack([m[2] for m in maps])),
                             persistent=False)
        self.n_warps = len(factors)

    def warped(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, F)`` -> ``(W * B, T, F)``: every window under each warp, warp-major."""
        lo = x[..., self.warp_lo]        # (B, T, W, F)
        hi = x[..., self.warp_hi]
        out = lo * (1 - self.warp_w) + hi * self.warp_w
        return out.permute(2, 0, 1, 3).reshape(-1, x.shape[1], x.shape[2])

    def fuse_model(self) -> None:
        """Fuse each member for static quantization; each has its own quant stubs, so the
        normalisation and the averaging stay float around them."""
        for m in self.members:
            m.net.fuse_model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Checked here because the members' normalisation would meet a wrong shape first,
        # with a broadcasting error instead of one naming the expected layout.
        check_features(self, x)
        batch = x.shape[0]
        if self.n_warps:
            # One batch of every warp per member: a member's cost grows with the warps, but
            # not its calls, which matter as much as FLOPs for these small networks.
            x = self.warped(x)
        probs = torch.stack([torch.softmax(m(x), dim=-1) for m in self.members]).mean(dim=0)
        probs = probs.reshape(-1, batch, probs.shape[-1]).mean(dim=0)
        return torch.log(probs.clamp_min(_FLOOR))
