"""Ship a trained float bundle as the package's default models, with a model card.

Writes ``default-float.skw`` (the float bundle, for re-quantizing and pruning) and
``default.skw`` (dynamically quantized int8) into ``streamkws/models/bundled/``, evaluates
both on the bundle's own speaker-disjoint validation split, times them, and writes
``MODEL_CARD.md`` beside them.

    python -m streamkws.tools.make_default runs/default.skw --data ../shared/data
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from streamkws.bundle import BUNDLED_DIR, Bundle, load_bundle
from streamkws.data import ClipCache, load_dataset, speaker_split
from streamkws.models.quant import quantize_dynamic
from streamkws.tools.evaluate import metrics_from_predictions, predict_clips

ATTRIBUTION = "Speech Commands dataset, P. Warden, 2018, arXiv:1804.03209, CC BY 4.0"


def latency_ms(bundle: Bundle, runs: int = 300) -> tuple[float, float]:
    """p50 and p99 of one window's inference, batch 1, one thread."""
    torch.set_num_threads(1)
    x = np.random.default_rng(0).normal(-6, 2, size=(bundle.frontend.window_frames,
                                                     bundle.frontend.n_mels)).astype(np.float32)
    for _ in range(20):
        bundle.predict(x)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        bundle.predict(x)
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return statistics.median(times), times[int(0.99 * (len(times) - 1))]


def validation_metrics(bundle: Bundle, data: Path) -> dict:
    t = bundle.meta["training"]
    seed = t["seed"]
    frac = float(t["split"].split("%")[0].split()[-1]) / 100
    _, val = speaker_split(load_dataset(data / "speech_commands_v2_real", bundle.labels),
                           frac, seed)
    x, val = ClipCache().load_all(val)
    probs = predict_clips(bundle, x)
    return metrics_from_predictions(val.targets(), probs.argmax(1), bundle.labels)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path, help="the trained float bundle")
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--out", type=Path, default=BUNDLED_DIR)
    args = ap.parse_args(argv)

    src = load_bundle(args.bundle)
    flt = Bundle(src.model, {**src.meta, "name": "default-float"})
    q = Bundle(quantize_dynamic(src.model), {**src.meta, "name": "default",
                                            "quantization": {"mode": "dynamic",
                                                             "dtype": "qint8"}})
    results = {}
    for b in (flt, q):
        m = validation_metrics(b, args.data)
        b.meta["metrics"] = {**b.meta.get("metrics", {}),
                             "validation": {"accuracy": m["accuracy"], "n": m["n"],
                                            "recall": {k: v["recall"]
                                                       for k, v in m["per_class"].items()}}}
        b.save(args.out / f"{b.name}.skw")
        results[b.name] = (m, latency_ms(b), (args.out / f"{b.name}.skw").stat().st_size)
    write_card(args.out / "MODEL_CARD.md", flt, results)
    for name, (m, (p50, p99), size) in results.items():
        print(f"{name}: accuracy {m['accuracy']:.4f} on {m['n']} validation clips, "
              f"{size / 1024:.0f} KiB, latency p50 {p50:.2f} ms p99 {p99:.2f} ms")
    return 0


def write_card(path: Path, b: Bundle, results: dict) -> None:
    t = b.meta["training"]
    fm, (fp50, fp99), fsize = results["default-float"]
    qm, (qp50, qp99), qsize = results["default"]
    labels = b.labels
    aug = t["augmentation"]
    lines = [
        "# Model card: `default` (int8) and `default-float`",
        "",
        f"A {b.meta['arch']} keyword spotter ({b.meta['parameters']:,} parameters, "
        f"options {b.meta['arch_kwargs']}) for the 12 Speech Commands classes: "
        f"{', '.join(f'`{x}`' for x in labels)}. `default` is the same network with its "
        "linear layer dynamically quantized to int8 (`torch.ao.quantization.quantize_dynamic`)"
        "; `default-float` is kept for re-quantizing and pruning.",
        "",
        "## Front end",
        "",
        "Log-Mel, " + ", ".join(f"{k} {v}" for k, v in b.meta["frontend"].items()) + ".",
        "",
        "## Data",
        "",
        f"- Training: {t['train']['clips']} clips from {t['train']['speakers']} speakers "
        f"({', '.join(t['sources'] + t['training_only_sources'])}).",
        f"- Validation: the {fm['n']} clips of `speech_commands_v2_real` whose speakers were "
        f"held out ({t['split']}); no speaker is on both sides "
        f"(overlap: {t['speaker_overlap']}).",
        "- Training-only sources (synthetic speech) never enter validation.",
        f"- Noise for augmentation: {t['noise_recordings']} real background recordings.",
        "",
        "## Training",
        "",
        f"{t['epochs_run']} epochs (best at epoch {t['best_epoch']}), batch {t['batch_size']}, "
        f"AdamW with one-cycle LR (max {t['lr']}), label smoothing, class-balanced epochs, "
        f"seed {t['seed']}; {t['minutes']:.0f} minutes on 2 CPU cores. Augmentation: time "
        f"shift up to +-{aug['shift_ms']:.0f} ms, speed/pitch +-{aug['speed_range']:.0%} "
        f"(p={aug['speed_prob']}), gain +-{aug['gain_db']:.0f} dB, real noise at "
        f"{aug['snr_db'][0]:.0f}-{aug['snr_db'][1]:.0f} dB SNR (p={aug['noise_prob']}), "
        f"SpecAugment {aug['time_masks']}x{aug['time_mask_frames']} time and "
        f"{aug['freq_masks']}x{aug['freq_mask_bins']} frequency masks.",
        "",
        "## Results (speaker-disjoint validation split)",
        "",
        "| model | accuracy | size | latency p50 / p99 (1 window, 1 thread) |",
        "|---|---|---|---|",
        f"| default-float | {fm['accuracy']:.4f} | {fsize / 1024:.0f} KiB | "
        f"{fp50:.2f} / {fp99:.2f} ms |",
        f"| default (int8) | {qm['accuracy']:.4f} | {qsize / 1024:.0f} KiB | "
        f"{qp50:.2f} / {qp99:.2f} ms |",
        "",
        "Per-class recall:",
        "",
        "| class | float | int8 |",
        "|---|---|---|",
    ]
    lines += [f"| `{lb}` | {fm['per_class'][lb]['recall']:.3f} | "
              f"{qm['per_class'][lb]['recall']:.3f} |" for lb in labels]
    lines += [
        "",
        "Latency was measured on the development machine (x86, one thread); expect several "
        "times more on a Raspberry Pi 4. The final judge is speakers outside this data; "
        "the validation speakers above were never trained on, which is the closest proxy "
        "here.",
        "",
        "## Attribution",
        "",
        f"Trained on the {ATTRIBUTION}. Synthetic speech from espeak-ng and flite voices.",
        "",
    ]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
