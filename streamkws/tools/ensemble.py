"""``streamkws ensemble``: several trained float bundles as one model.

The members' posteriors are averaged (:mod:`streamkws.models.ensemble`). They must share
labels and front end, be float (quantize the ensemble afterwards, as any model), and have
been validated on the same held-out speakers: the ensemble keeps that split as its own, and
a member that trained on another split has heard some of its validation speakers.

    streamkws ensemble --model runs/s0.skw --model runs/s1.skw --out runs/pair.skw
    streamkws quantize --model runs/pair.skw --mode dynamic --out runs/pair-int8.skw

``--warp R:N`` also averages every window over ``N`` frequency warps within ``1 +- R``
(test-time augmentation over vocal-tract lengths; one member is then enough). It costs
``N`` times the members' work per window, and moves the best threshold: calibrate it again
(``stream-eval --target-fa-per-hour``) rather than keep the members'.
"""

from __future__ import annotations

import argparse
import json
import logging

import numpy as np

from streamkws.bundle import Bundle, load_bundle, new_bundle
from streamkws.errors import StreamKWSError
from streamkws.features import mel_centres_hz, warp_factors
from streamkws.models import build_model
from streamkws.tools.outputs import check_output

log = logging.getLogger(__name__)

MAX_WARP = 0.3
"""Widest warp ``--warp`` takes (factors 0.77-1.3, about the spread of adult vocal-tract
lengths); only up to 0.15 has been measured to help."""


def parse_warp(text: str) -> tuple[float, int]:
    """``"R:N"`` (or ``"R"``, three warps) -> ``(R, N)``; one line naming the rule if not."""
    r_text, _, n_text = text.partition(":")
    try:
        r, n = float(r_text), int(n_text or 3)
    except ValueError:
        r, n = float("nan"), 0
    if not (0 < r <= MAX_WARP and 2 <= n <= 9):
        raise StreamKWSError(f"--warp {text!r}: expected R:N with 0 < R <= {MAX_WARP} and "
                             "2 <= N <= 9, e.g. 0.15:5")
    return r, n


def build_ensemble(bundles: list[Bundle], name: str,
                   warp: tuple[float, int] | None = None) -> Bundle:
    """One float bundle whose network averages the members' class probabilities, and with
    ``warp = (R, N)`` over ``N`` frequency warps of each window within ``1 +- R``."""
    if len(bundles) < (1 if warp else 2):
        raise StreamKWSError("an ensemble needs two or more --model bundles (or one, "
                             "with --warp)")
    first = bundles[0]
    for b in bundles:
        where = b.path or b.name
        if b.quantization != "none":
            raise StreamKWSError(f"{where}: members must be float models (this one is "
                                 f"{b.quantization}); quantize the ensemble instead")
        if b.meta["arch"] == "ensemble":
            raise StreamKWSError(f"{where} is an ensemble already; list its members instead")
        why = b.mismatch(first.labels, first.frontend, first.speaker_split,
                         other="the first member's")
        if why:
            raise StreamKWSError(f"{where}: {why}")
    sizes = {k: first.meta["arch_kwargs"][k] for k in ("n_classes", "n_frames", "n_mels")}
    specs = [{"arch": b.meta["arch"], "arch_kwargs": b.meta["arch_kwargs"]} for b in bundles]
    warps = {}
    if warp:
        warps = {"warp_factors": warp_factors(*warp),
                 "band_centres_hz": [float(c) for c in mel_centres_hz(first.frontend)]}
    net = build_model("ensemble", **sizes, members=specs, **warps)
    for member, b in zip(net.members, bundles, strict=True):
        member.load_state_dict(b.model.state_dict())
    n_mels = sizes["n_mels"]
    training = {k: v for k, v in first.meta.get("training", {}).items() if k != "history"}
    training.update({
        # Recorded even when the first member predates it: the members' seeds below would
        # otherwise stand in for the split seed (Bundle.split_seed's fallback).
        "split_seed": first.split_seed,
        "seed": [b.meta.get("training", {}).get("seed") for b in bundles],
        "minutes": round(sum(b.meta.get("training", {}).get("minutes", 0.0)
                             for b in bundles), 2),
        "members": [{"name": b.name, "sha256": b.sha256, "arch": b.meta["arch"],
                     "parameters": b.meta["parameters"],
                     "seed": b.meta.get("training", {}).get("seed"),
                     "validation": b.meta.get("metrics", {}).get("validation")}
                    for b in bundles],
    })
    if warp:
        training["warp"] = {"range": warp[0], "count": warp[1],
                            "factors": [round(f, 4) for f in warps["warp_factors"]]}

    # The members normalise their own input, so the bundle's shared step is the identity.
    return new_bundle(net, np.zeros(n_mels, np.float32), np.ones(n_mels, np.float32),
                      first.labels, first.frontend, name, training=training)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", required=True, metavar="M",
                   help="a trained float bundle (repeat: two or more, or one with --warp)")
    p.add_argument("--warp", metavar="R:N",
                   help="also average each window over N frequency warps within 1 +- R "
                        f"(0 < R <= {MAX_WARP:g}, 2 <= N <= 9; e.g. 0.15:5): N times the "
                        "work per window")
    p.add_argument("--name", help="model name recorded in the bundle (default: file stem)")
    p.add_argument("--out", required=True, metavar="M", help="bundle file to write")


def run(args: argparse.Namespace) -> int:
    bundles = [load_bundle(m) for m in args.model]
    seen: dict[str, str] = {}
    for given, b in zip(args.model, bundles, strict=True):
        if b.sha256 in seen:
            # Allowed (it weights that member up), but more often a slip than a choice.
            log.warning("--model %s is the same model as %s: it counts twice in the mean",
                        given, seen[b.sha256])
        seen.setdefault(b.sha256, given)
    out = check_output(args.out, inputs=tuple(b.path for b in bundles))
    warp = parse_warp(args.warp) if args.warp else None
    ens = build_ensemble(bundles, args.name or out.stem, warp)
    sha = ens.save(out)
    print(json.dumps({"model": str(out), "sha256": sha, "arch": "ensemble",
                      "parameters": ens.meta["parameters"],
                      "members": [m["name"] for m in ens.meta["training"]["members"]]}))
    return 0
