"""Ship a trained float bundle as the package's default models, with a model card.

Writes ``default-float.skw`` (the float bundle, for re-quantizing and pruning) and
``default.skw`` (dynamically quantized int8) into ``streamkws/models/bundled/``, evaluates
both on the bundle's own speaker-disjoint validation split, times them, and writes
``MODEL_CARD.md`` beside them.

    python -m streamkws.tools.make_default runs/default.skw --data ../shared/data
"""

from __future__ import annotations

import argparse
from pathlib import Path

from streamkws.bundle import BUNDLED_DIR, Bundle, load_bundle
from streamkws.data import ClipCache, load_dataset, speaker_split
from streamkws.errors import ArgumentParser, exit_status
from streamkws.models.quant import quantize_dynamic
from streamkws.tools.calibration import (
    choose_threshold,
    detect_meta,
    print_tradeoff,
    rule_in_words,
    stream_tradeoff,
    table,
)
from streamkws.tools.evaluate import metrics_from_predictions, metrics_summary, predict_clips

ATTRIBUTION = "Speech Commands dataset, P. Warden, 2018, arXiv:1804.03209, CC BY 4.0"


def latency_ms(bundle: Bundle, runs: int = 300) -> tuple[float, float]:
    """p50 and p99 of one window's inference, batch 1, one thread (``profile``'s timer)."""
    from streamkws.tools.profile import example_input, measure_latency

    r = measure_latency(bundle.model, example_input(bundle), runs=runs, threads=1)
    return r["p50"], r["p99"]


def validation_metrics(bundle: Bundle, data: Path) -> dict:
    _, val = speaker_split(load_dataset(data / "speech_commands_v2_real", bundle.labels),
                           bundle.validation_fraction, bundle.split_seed)
    x, val = ClipCache().load_all(val)
    probs = predict_clips(bundle, x)
    return metrics_from_predictions(val.targets(), probs.argmax(1), bundle.labels)


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m streamkws.tools.make_default",
                        description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path, help="the trained float bundle")
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--out", type=Path, default=BUNDLED_DIR)
    args = ap.parse_args(argv)
    return exit_status("make_default", _make_default, args)


def _make_default(args: argparse.Namespace) -> int:
    src = load_bundle(args.bundle)
    flt = Bundle(src.model, {**src.meta, "name": "default-float"})
    q = Bundle(quantize_dynamic(src.model), {**src.meta, "name": "default",
                                            "quantization": {"mode": "dynamic",
                                                             "dtype": "qint8"}})
    # The int8 network is what the daemon runs, so its streams set the threshold; the
    # float twin carries the same one (their posteriors differ by < 0.05).
    tradeoff = stream_tradeoff(q, args.data)
    row = choose_threshold(tradeoff)
    results = {}
    for b in (flt, q):
        b.meta["detect"] = detect_meta(row)
        m = validation_metrics(b, args.data)
        b.meta["metrics"] = {**b.meta.get("metrics", {}), "validation": metrics_summary(m)}
        b.save(args.out / f"{b.name}.skw")
        results[b.name] = (m, latency_ms(b), (args.out / f"{b.name}.skw").stat().st_size)
    write_card(args.out / "MODEL_CARD.md", flt, results, tradeoff, row)
    print_tradeoff(tradeoff, row[0])
    for name, (m, (p50, p99), size) in results.items():
        print(f"{name}: accuracy {m['accuracy']:.4f} on {m['n']} validation clips, "
              f"{size / 1024:.0f} KiB, latency p50 {p50:.2f} ms p99 {p99:.2f} ms")
    return 0


def threshold_note(row: tuple) -> str:
    """What the stored threshold does on the calibration streams, in words."""
    thr, recall, hits, n, false, minutes = row
    return (f"At the stored threshold {thr:.2f}: recall {recall:.3f} ({hits}/{n}) with "
            f"{false} false alarm{'' if false == 1 else 's'} in {minutes:.1f} min "
            f"({false / minutes * 5:.2f} per 5 minutes). Missed keywords and false alarms "
            "both come mostly from confusable words (up/off, down/go, dog/down, five/right): "
            "rejecting other words is the limit.")


def describe_network(b: Bundle) -> str:
    """The architecture in words; an ensemble by its members."""
    kw = b.meta["arch_kwargs"]
    if b.meta["arch"] != "ensemble":
        return f"{b.meta['arch']} ({b.meta['parameters']:,} parameters, options {kw})"
    members = b.meta["training"]["members"]
    arches = "/".join(sorted({m["arch"] for m in members}))
    sizes = ", ".join(f"{m['parameters']:,}" for m in members)
    return (f"ensemble of {len(members)} {arches} networks trained alike from different "
            f"seeds, their class probabilities averaged ({b.meta['parameters']:,} parameters "
            f"in all, {sizes} each; member options {kw['members'][0]['arch_kwargs']})")


def distillation_note(t: dict) -> str:
    """A sentence on the teacher, if the network was distilled (``train --teacher``)."""
    teacher = t.get("teacher")
    if not teacher:
        return ""
    return (f" Distilled from `{teacher['name']}` (architecture {teacher['arch']}, sha256 "
            f"{teacher['sha256'][:12]}): each target is {1 - teacher['weight']:.0%} the label "
            f"and {teacher['weight']:.0%} the teacher's class probabilities on the same "
            "augmented clip.")


def write_card(path: Path, b: Bundle, results: dict, tradeoff: list, row: tuple) -> None:
    t = b.meta["training"]
    fm, (fp50, fp99), fsize = results["default-float"]
    qm, (qp50, qp99), qsize = results["default"]
    labels = b.labels
    aug = t["augmentation"]
    seeds = ", ".join(map(str, t["seed"])) if isinstance(t["seed"], list) else t["seed"]
    lines = [
        "# Model card: `default` (int8) and `default-float`",
        "",
        f"A {describe_network(b)} keyword spotter for the 12 Speech Commands classes: "
        f"{', '.join(f'`{x}`' for x in labels)}. `default` is the same network with its "
        "linear layers dynamically quantized to int8 "
        "(`torch.ao.quantization.quantize_dynamic`); `default-float` is kept for "
        "re-quantizing and pruning.",
        "",
        "## Front end",
        "",
        "Log-Mel, " + ", ".join(f"{k} {v}" for k, v in b.meta["frontend"].items()) + ".",
        "",
        "## Data",
        "",
        f"- Training: {t['train']['clips']} clips from {t['train']['speakers']} speakers "
        f"(the training side of {', '.join(Path(x).name for x in t['sources'])}; "
        f"training only: {', '.join(Path(x).name for x in t['training_only_sources']) or '-'})"
        ".",
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
        f"seed {seeds}; {t['minutes']:.0f} minutes on 2 CPU cores. Augmentation: time "
        f"shift up to +-{aug['shift_ms']:.0f} ms, speed/pitch +-{aug['speed_range']:.0%} "
        f"(p={aug['speed_prob']}), gain +-{aug['gain_db']:.0f} dB, real noise at "
        f"{aug['snr_db'][0]:.0f}-{aug['snr_db'][1]:.0f} dB SNR (p={aug['noise_prob']}), "
        f"SpecAugment {aug['time_masks']}x{aug['time_mask_frames']} time and "
        f"{aug['freq_masks']}x{aug['freq_mask_bins']} frequency masks. Hard negatives: "
        f"`_unknown_` drawn for {t.get('unknown_share') or 1 / len(labels):.0%} of each epoch, "
        f"{aug.get('reverse_as_unknown', 0):.0%} of keyword examples played backwards as "
        "`_unknown_`." + distillation_note(t),
        "",
        "How this configuration was chosen (synthetic keywords, architectures, hard "
        "negatives): [docs/experiments.md](../../../docs/experiments.md).",
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
        "## In a stream",
        "",
        "Streams run through the daemon's front end, VAD gate, int8 model and smoother "
        "(3-window average, 2 windows above threshold). Other words are packed densely "
        "(about 11 a minute), so false alarms here are far more frequent than in quiet "
        "rooms.",
        "",
        f"The bundles store `detect.threshold` **{row[0]}**, which the daemon uses unless "
        "the config sets one. Chosen as " + rule_in_words() + ":",
        "",
        *table(tradeoff, row[0]),
        "",
        threshold_note(row),
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
