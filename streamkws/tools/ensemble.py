"""``streamkws ensemble``: several trained float bundles as one model.

The members' posteriors are averaged (:mod:`streamkws.models.ensemble`). They must share
labels and front end, be float (quantize the ensemble afterwards, as any model), and have
been validated on the same held-out speakers: the ensemble keeps that split as its own, and
a member that trained on another split has heard some of its validation speakers.

    streamkws ensemble --model runs/s0.skw --model runs/s1.skw --out runs/pair.skw
    streamkws quantize --model runs/pair.skw --mode dynamic --out runs/pair-int8.skw
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from streamkws.bundle import Bundle, load_bundle, new_bundle
from streamkws.errors import StreamKWSError
from streamkws.models import build_model


def build_ensemble(bundles: list[Bundle], name: str) -> Bundle:
    """One float bundle whose network averages the members' class probabilities."""
    if len(bundles) < 2:
        raise StreamKWSError("an ensemble needs two or more --model bundles")
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
    net = build_model("ensemble", **sizes, members=specs)
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
    # The members normalise their own input, so the bundle's shared step is the identity.
    return new_bundle(net, np.zeros(n_mels, np.float32), np.ones(n_mels, np.float32),
                      first.labels, first.frontend, name, training=training)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", required=True, metavar="M",
                   help="a trained float bundle (repeat: two or more)")
    p.add_argument("--name", help="model name recorded in the bundle (default: file stem)")
    p.add_argument("--out", required=True, metavar="M", help="bundle file to write")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    bundles = [load_bundle(m) for m in args.model]
    if any(b.path is not None and out.exists() and out.resolve() == b.path.resolve()
           for b in bundles):
        raise StreamKWSError(f"{out}: --out would overwrite a member")
    ens = build_ensemble(bundles, args.name or out.stem)
    sha = ens.save(out)
    print(json.dumps({"model": str(out), "sha256": sha, "arch": "ensemble",
                      "parameters": ens.meta["parameters"],
                      "members": [m["name"] for m in ens.meta["training"]["members"]]}))
    return 0
