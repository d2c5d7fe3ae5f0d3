"""Best recall within false-alarm budgets, pooled over recordings, for bundles and mixtures.

The scoring behind the stream tables in ``docs/experiments.md``; not part of the package.
Each bundle runs once per recording through the daemon's pipeline (``stream-eval``'s
replay), every threshold 0.50-0.98 (one for all keywords) is re-decided with the daemon's
smoother, and hits, false alarms and other-audio hours are summed over the recordings
before the best threshold per budget is picked.

    python docs/pooled_recall.py eval/heldout.wav eval/h2.wav eval/h3.wav -- \\
        default-float emb.skw default-float+emb.skw@0.3 default-float+s1.skw+emb.skw*2

A spec ``a+b@w`` mixes two bundles' posteriors on the same windows, ``(1 - w) a + w b``
(``w`` defaults to 0.5, which is what ``streamkws ensemble`` computes for two members).
``a+b+c*1.5`` mixes any number, each with a relative weight (default 1, normalised to sum
to 1). A member ``a~0.15:5`` averages ``a`` over 5 frequency warps within 1 +- 0.15 of
each window (test-time augmentation; ``a~0.08`` means 3 warps).
Labels: ``REC.csv`` beside each recording, as ``stream-eval --build`` writes them.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np

from streamkws.bundle import load_bundle
from streamkws.config import Config
from streamkws.tools import stream_eval as se

BUDGETS = (0.5, 1.0, 2.0)  # false alarms per 5 minutes of other audio


def warp_averaged(bundle, r: float, n: int) -> None:
    """Make ``bundle.predict`` average its probabilities over ``n`` copies of each window,
    the frequency axis scaled by factors spaced evenly in log between ``1/(1+r)`` and
    ``1+r`` (``train --warp``'s interpolation, at fixed factors): test-time averaging over
    vocal-tract lengths, one batch of ``n`` per window."""
    from streamkws.features import mel_centres_hz, warp_bands, warp_factors

    centres = mel_centres_hz(bundle.frontend)
    maps = [warp_bands(centres, f) for f in warp_factors(r, n)]
    plain = bundle.predict

    def predict(features: np.ndarray) -> np.ndarray:
        single = features.ndim == 2
        x = features[None] if single else features
        warped = np.stack([x[..., lo] * (1 - w) + x[..., hi] * w for lo, hi, w in maps], 1)
        p = plain(warped.reshape(-1, *x.shape[1:])).reshape(len(x), n, -1).mean(1)
        return p[0] if single else p

    bundle.predict = predict


def main(argv: list[str]) -> None:
    if "--" not in argv:
        sys.exit(__doc__)
    k = argv.index("--")
    recs, specs = [Path(a) for a in argv[:k]], argv[k + 1:]
    cfg = Config()
    runs: dict[tuple[str, Path], se.Run] = {}

    def run_of(name: str, rec: Path) -> se.Run:
        if (name, rec) not in runs:
            bundle_name, _, warp = name.partition("~")
            bundle = load_bundle(bundle_name)
            if warp:
                r, _, n = warp.partition(":")
                try:
                    r, n = float(r), int(n or 3)
                except ValueError:
                    r, n = 0.0, 0
                if not (0 < r < 1 and n >= 2):
                    sys.exit(f"{name}: a warp is '~r' or '~r:n', 0 < r < 1 and n >= 2 "
                             "(e.g. ~0.15:5)")
                warp_averaged(bundle, r, n)
            runs[name, rec] = se.run_pipeline(cfg, bundle, rec, progress=False)
        return runs[name, rec]

    def mixed(spec: str, rec: Path) -> se.Run:
        if "+" not in spec:
            return run_of(spec, rec)
        if "@" in spec:
            if spec.count("+") != 1 or "*" in spec:
                sys.exit(f"{spec}: '@w' is for two members; weigh more with '*w' alone")
            a, b = spec.split("+")
            b, _, w = b.partition("@")
            parts = [(a, 1 - float(w)), (b, float(w))]
        else:
            parts = [(name, float(w) if w else 1.0)
                     for name, _, w in (p.partition("*") for p in spec.split("+"))]
        total = sum(w for _, w in parts)
        members = [(run_of(name, rec), w / total) for name, w in parts]
        # The VAD gate does not depend on the model, so all saw the very same windows.
        trace = [(s, e, None if p is None else sum(w * r.trace[i][2] for r, w in members))
                 for i, (s, e, p) in enumerate(members[0][0].trace)]
        return dataclasses.replace(members[0][0], trace=trace)

    truths = {rec: se.read_labels(rec.with_suffix(".csv")) for rec in recs}
    for spec in specs:
        thresholds = [float(t) for t in np.arange(0.5, 0.991, 0.02)]
        sweeps = [se.sweep(mixed(spec, rec), truths[rec], cfg.detect, thresholds) for rec in recs]
        pooled = se.pool(sweeps)
        rows = [(t, hits / n, fa / minutes * 5, fa) for t, hits, n, fa, minutes in pooled]
        keywords = pooled[0][2]
        cells = []
        for budget in BUDGETS:
            ok = [r for r in rows if r[2] <= budget]
            best = max(ok, key=lambda r: (r[1], -r[0])) if ok else None
            cells.append(f"<= {budget}: " + (f"{best[1]:.3f} (thr {best[0]:.2f}, {best[3]} FA)"
                                             if best else "-"))
        print(f"{spec}: {keywords} keywords   " + "   ".join(cells), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
