"""``streamkws evaluate``: clip accuracy, per-class precision/recall and the confusion matrix."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from streamkws.bundle import Bundle
from streamkws.data import ClipCache, load_dataset
from streamkws.errors import StreamKWSError
from streamkws.features import LogMel

log = logging.getLogger(__name__)


def metrics_from_predictions(y: np.ndarray, pred: np.ndarray, labels: list[str]) -> dict:
    k = len(labels)
    conf = np.zeros((k, k), dtype=np.int64)
    np.add.at(conf, (y, pred), 1)
    per_class = {}
    for i, label in enumerate(labels):
        tp = int(conf[i, i])
        support = int(conf[i].sum())
        predicted = int(conf[:, i].sum())
        # None where there is nothing to measure on (no clip of the class, nothing predicted
        # as it): 0.0 would read as a class the model never gets right.
        precision = tp / predicted if predicted else None
        recall = tp / support if support else None
        # 2TP / (2TP + FP + FN): 0 for a class always missed or only ever wrongly predicted.
        f1 = 2 * tp / (support + predicted) if support + predicted else None
        per_class[label] = {"precision": _r4(precision), "recall": _r4(recall), "f1": _r4(f1),
                            "support": support}
    n = int(len(y))
    return {
        "accuracy": round(float((y == pred).mean()) if n else 0.0, 4),
        "n": n,
        "labels": list(labels),
        "per_class": per_class,
        "confusion": conf.tolist(),
    }


def metrics_summary(m: dict) -> dict:
    """What a bundle keeps of :func:`metrics_from_predictions`: accuracy, clip count and
    recall per class."""
    return {"accuracy": m["accuracy"], "n": m["n"],
            "recall": {k: v["recall"] for k, v in m["per_class"].items()}}


def _r4(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _cell(x: float | None, width: int) -> str:
    return f"{'-':>{width}}" if x is None else f"{x:>{width}.3f}"


def predict_clips(bundle: Bundle, x: np.ndarray, batch: int = 256) -> np.ndarray:
    logmel = LogMel(bundle.frontend)
    n_frames = bundle.frontend.window_frames
    probs = [bundle.predict(logmel(x[i : i + batch])[:, :n_frames])
             for i in range(0, len(x), batch)]
    return np.concatenate(probs) if probs else np.zeros((0, len(bundle.labels)))


def evaluate(bundle: Bundle, data: str | Path, progress: bool = False) -> dict:
    ds = load_dataset(data, bundle.labels)  # a Speech Commands download: its testing list
    x, ds = ClipCache().load_all(ds, progress)
    if len(ds) == 0:
        raise StreamKWSError(f"{data}: no readable clips")
    probs = predict_clips(bundle, x)
    m = metrics_from_predictions(ds.targets(), probs.argmax(1), bundle.labels)
    m.update({"model": bundle.name, "model_sha256": bundle.sha256,
              "quantization": bundle.quantization, "data": str(data),
              "skipped": ds.skipped})
    return m


def format_report(m: dict) -> str:
    labels = m["labels"]
    model = f"{m.get('model', '?')} ({m.get('quantization', 'none')})"
    lines = [f"model {model} on {m.get('data', '')}",
             f"accuracy {m['accuracy']:.4f} over {m['n']} clips", "",
             f"{'label':<11} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}"]
    for label in labels:
        c = m["per_class"][label]
        lines.append(f"{label:<11} {_cell(c['precision'], 9)} {_cell(c['recall'], 7)} "
                     f"{_cell(c['f1'], 7)} {c['support']:>8d}")
    short = [lb.strip("_")[:5] for lb in labels]
    lines += ["", "confusion (rows: true, columns: predicted)",
              " " * 7 + "".join(f"{s:>6}" for s in short)]
    for s, row in zip(short, m["confusion"], strict=True):
        lines.append(f"{s:>6} " + "".join(f"{v:>6d}" for v in row))
    if m.get("skipped"):
        lines += ["", f"skipped {len(m['skipped'])} unreadable files:"] + [
            f"  {s}" for s in m["skipped"]]
    return "\n".join(lines)


def plot_confusion(m: dict, path: str | Path) -> None:
    from streamkws.tools import pyplot

    plt = pyplot()
    conf = np.array(m["confusion"], dtype=float)
    norm = conf / np.maximum(conf.sum(1, keepdims=True), 1)
    labels = m["labels"]
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for i in range(len(labels)):
        for j in range(len(labels)):
            if conf[i, j]:
                ax.text(j, i, int(conf[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{m.get('model', '')} ({m.get('quantization', 'none')}): "
                 f"accuracy {m['accuracy']:.3f}, n={m['n']}")
    fig.colorbar(im, ax=ax, fraction=0.046, label="recall share")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
