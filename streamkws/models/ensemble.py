"""Several trained networks answering as one: the mean of their class probabilities.

Networks trained alike but from different seeds make partly different mistakes on speakers
none of them heard; averaging their posteriors cancels some of those mistakes. On held-out
streams, within one false alarm per 5 minutes, every pair of seeds of the default recipe
recalled more keywords than its members did on average, and four seeds together 0.844
against 0.808 for the best single one (docs/experiments.md, "Seeds and ensembles"). The
price is one forward pass, and one model's weights, per member.

An ensemble is built from trained bundles (``streamkws ensemble``), not trained itself.
Each member keeps its own feature normalisation, so members need not share it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from streamkws.errors import StreamKWSError
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
    """``members``: ``[{"arch": name, "arch_kwargs": {...}}, ...]``, two or more, each with
    the ensemble's ``n_classes``, ``n_frames`` and ``n_mels``.

    The output is the log of the members' mean probabilities, so a softmax over it (what
    every caller of a model does) gives exactly that mean.
    """

    def __init__(self, n_classes: int, n_frames: int, n_mels: int,
                 members: list[dict[str, Any]] | None = None) -> None:
        super().__init__()
        self.n_classes = check_int("n_classes", n_classes)
        self.n_frames = check_int("n_frames", n_frames)
        self.n_mels = check_int("n_mels", n_mels)
        if not isinstance(members, list) or len(members) < 2:
            raise StreamKWSError("an ensemble needs two or more members; build one from "
                                 "trained bundles with `streamkws ensemble`")
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

    def fuse_model(self) -> None:
        """Fuse each member for static quantization; each has its own quant stubs, so the
        normalisation and the averaging stay float around them."""
        for m in self.members:
            m.net.fuse_model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Checked here because the members' normalisation would meet a wrong shape first,
        # with a broadcasting error instead of one naming the expected layout.
        check_features(self, x)
        probs = torch.stack([torch.softmax(m(x), dim=-1) for m in self.members]).mean(dim=0)
        return torch.log(probs.clamp_min(_FLOOR))
