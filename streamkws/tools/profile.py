"""``streamkws profile``: what one inference of a model bundle costs.

For one model window at batch 1 (``(1, window_frames, n_mels)`` log-Mel, the shape the
daemon feeds), reports:

parameters
    Elements of the weights and biases of the model *as it runs*: float parameters plus
    the packed weights of quantized modules (which live outside ``parameters()``).
    BatchNorm affine parameters count while BatchNorm is a separate layer; after the
    conv+BN fusion of static quantization they are folded away. ``nonzero`` counts the
    elements that are not zero (pruning).
MACs
    Multiply-accumulates of convolutions (``Conv1d/2d/3d``, grouped and depthwise
    included, any stride, padding, dilation), transposed convolutions and ``Linear``
    layers, float or quantized (``torch.ao.nn.quantized``, ``.dynamic``, fused
    ``.intrinsic`` modules), counted by forward hooks from the shapes each layer sees:

        conv:   MACs = C_out * prod(output spatial size) * (C_in / groups) * prod(kernel)
        linear: MACs = prod(output shape without features) * in_features * out_features

    Not counted: BatchNorm (folded into the preceding conv when deployed), bias adds,
    activations, pooling, residual adds, the feature normalisation, and any tensor op
    called outside a module. Zeros left by pruning are counted (dense kernels run them).
    Layers with weights of other kinds (RNNs, embeddings, attention) are listed as
    ``uncounted``.
weight bytes
    :func:`streamkws.bundle.weight_bytes`: every tensor of the state dict at its stored
    width (int8 weights at one byte).
peak activation bytes
    Defined here as the largest, over the layers (leaf modules) of one forward pass, of
    the bytes of that layer's input tensors plus its output tensor, each distinct buffer
    once (an in-place ReLU or a view does not count twice): the working set one layer
    needs, and a lower bound of the true peak, which also holds skip connections and
    the allocator's slack. Quantized activations count at one byte per element.
    ``largest_activation_bytes`` is the largest single tensor among them.
latency
    Wall-clock of ``model(x)`` at batch 1 on one thread (``torch.set_num_threads(1)``),
    after warm-up runs, over at least 200 timed runs with ``time.perf_counter``;
    percentiles p50 and p99.
accuracy
    With ``--data``: :func:`streamkws.tools.evaluate.evaluate` on that folder.

``profile --compare A B C`` prints one markdown table, a row per bundle, for
float-vs-quantized-vs-pruned comparisons; accuracy differences are against the first row.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from streamkws.bundle import Bundle, load_bundle, tensors_in, weight_bytes
from streamkws.config import BUNDLED_MODELS
from streamkws.errors import StreamKWSError, no_folder
from streamkws.models.quant import quiet_ao_deprecation

log = logging.getLogger(__name__)

MIN_RUNS = 200
DEFAULT_RUNS = 500
DEFAULT_WARMUP = 50
MAC_NOTE = ("conv and linear layers only; BatchNorm, bias adds, activations, pooling and "
            "residual adds not counted")
PEAK_NOTE = "largest input + output bytes of one layer (each buffer once)"


# -- counting --------------------------------------------------------------------------------


def _layer_kinds() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...],
                            tuple[type, ...]]:
    """(conv, transposed conv, linear, normalisation) module types, float and quantized.

    Quantized conv/linear modules do not derive from their float counterparts, and fused
    quantized modules (``ConvReLU2d``, ``LinearReLU``) derive from the quantized ones; the
    float fused modules are Sequentials whose inner conv/linear is counted. Transposed
    convolutions derive from the quantized conv base, so they are tested first.
    """
    import torch.ao.nn.quantized as nnq

    transposed = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                  nnq.ConvTranspose1d, nnq.ConvTranspose2d, nnq.ConvTranspose3d)
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nnq.Conv1d, nnq.Conv2d, nnq.Conv3d)
    # nnq.dynamic.Linear and the fused LinearReLU variants all derive from nnq.Linear.
    linear = (nn.Linear, nnq.Linear)
    norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nnq.LayerNorm,
             nnq.GroupNorm)
    return conv, transposed, linear, norms


def conv_macs(in_channels: int, out_channels: int, kernel: Sequence[int], groups: int,
              out_spatial: Sequence[int]) -> int:
    """MACs of one convolution: each output element sums ``in_channels / groups * kernel``
    products (stride, padding and dilation enter through the output size)."""
    return out_channels * math.prod(out_spatial) * (in_channels // groups) * math.prod(kernel)


def _buffer_key(t: torch.Tensor) -> tuple:
    try:
        ptr = t.data_ptr()
    except RuntimeError:  # tensors without storage
        ptr = id(t)
    return (ptr, t.numel(), t.dtype)


def _nbytes(tensors: list[torch.Tensor]) -> int:
    seen: dict[tuple, int] = {}
    for t in tensors:
        seen.setdefault(_buffer_key(t), t.numel() * t.element_size())
    return sum(seen.values())


@dataclass
class LayerCost:
    name: str
    kind: str
    macs: int
    output_shape: list[int]
    activation_bytes: int


@dataclass
class Counts:
    macs: int = 0
    peak_activation_bytes: int = 0
    largest_activation_bytes: int = 0
    peak_layer: str = ""
    layers: list[LayerCost] = field(default_factory=list)
    uncounted: list[str] = field(default_factory=list)


def count_macs(model: nn.Module, x: torch.Tensor) -> Counts:
    """MACs and activation sizes of ``model(x)``, from forward hooks (see the module doc)."""
    conv, transposed, linear, norms = _layer_kinds()
    counts = Counts()
    names = {id(m): name or type(m).__name__ for name, m in model.named_modules()}
    hooks = []

    def weighted(m: nn.Module) -> bool:
        return any(True for _ in m.parameters(recurse=False)) or hasattr(m, "_packed_params")

    def hook(m: nn.Module, inputs: tuple, output: object) -> None:
        ins, outs = tensors_in(inputs), tensors_in(output)
        macs = 0
        if isinstance(m, transposed):
            # Every input element is scattered over out_channels / groups * kernel outputs.
            x_in, k = ins[0], len(m.kernel_size)
            macs = (m.in_channels * math.prod(x_in.shape[-k:]) * (m.out_channels // m.groups)
                    * math.prod(m.kernel_size)) * _batch(x_in, k)
        elif isinstance(m, conv):
            y = outs[0]
            k = len(m.kernel_size)
            macs = conv_macs(m.in_channels, m.out_channels, m.kernel_size, m.groups,
                             y.shape[-k:]) * _batch(y, k)
        elif isinstance(m, linear):
            y = outs[0]
            macs = (y.numel() // y.shape[-1]) * m.in_features * m.out_features
        leaf = next(iter(m.children()), None) is None
        if leaf or macs:
            act = _nbytes(ins + outs)
            if act > counts.peak_activation_bytes:
                counts.peak_activation_bytes, counts.peak_layer = act, names[id(m)]
            for t in ins + outs:
                counts.largest_activation_bytes = max(counts.largest_activation_bytes,
                                                      t.numel() * t.element_size())
            counts.macs += macs
            if macs:
                shape = list(outs[0].shape) if outs else []
                counts.layers.append(LayerCost(names[id(m)], type(m).__name__, macs, shape, act))

    # Children of a counted layer (the packed-weight holder of a quantized Linear) belong
    # to it; they are neither counted again nor reported as uncounted.
    inside_counted = {id(c) for m in model.modules() if isinstance(m, conv + transposed + linear)
                      for c in m.modules() if c is not m}
    for m in model.modules():
        if id(m) in inside_counted:
            continue
        counted = isinstance(m, conv + transposed + linear)
        leaf = next(iter(m.children()), None) is None
        if counted or leaf:
            hooks.append(m.register_forward_hook(hook))
        if leaf and not counted and weighted(m) and not isinstance(m, norms):
            counts.uncounted.append(f"{names[id(m)]} ({type(m).__name__})")
    try:
        with torch.inference_mode(), quiet_ao_deprecation():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return counts


def _batch(t: torch.Tensor, spatial_dims: int) -> int:
    """Batch size of a conv tensor ``(N, C, *spatial)``; 1 for an unbatched ``(C, *spatial)``."""
    return t.shape[0] if t.dim() == spatial_dims + 2 else 1


def count_weights(model: nn.Module) -> tuple[int, int]:
    """(elements, nonzero elements) of the weights and biases of ``model`` as it runs."""
    total = nonzero = 0
    for m in model.modules():
        tensors = list(m.parameters(recurse=False))
        w = getattr(m, "weight", None)
        if callable(w) and not isinstance(w, torch.Tensor):  # quantized: packed weights
            with quiet_ao_deprecation():
                qw = w()
                qb = m.bias() if callable(getattr(m, "bias", None)) else None
            tensors += [t for t in (qw, qb) if isinstance(t, torch.Tensor)]
        for t in tensors:
            t = t.detach()
            if t.is_quantized:
                t = t.dequantize()
            total += t.numel()
            nonzero += int(torch.count_nonzero(t))
    return total, nonzero


def measure_latency(model: nn.Module, x: torch.Tensor, runs: int = DEFAULT_RUNS,
                    warmup: int = DEFAULT_WARMUP, threads: int = 1) -> dict:
    """p50/p99/mean milliseconds of ``model(x)`` on ``threads`` threads."""
    if runs < 1:
        raise StreamKWSError(f"runs must be at least 1 (got {runs})")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    times = np.empty(runs)
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                model(x)
            for i in range(runs):
                t0 = time.perf_counter()
                model(x)
                times[i] = time.perf_counter() - t0
    finally:
        torch.set_num_threads(previous)
    ms = times * 1000
    return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
            "mean": float(ms.mean()), "runs": runs, "warmup": warmup, "threads": threads}


def example_input(bundle: Bundle, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """Log-Mel-like features ``(batch, window_frames, n_mels)``: standard normal after the
    bundle's own normalisation, so every layer sees activations of a realistic scale."""
    fe = bundle.frontend
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, fe.window_frames, fe.n_mels, generator=g)
    model = bundle.model
    mean, inv_std = getattr(model, "mean", None), getattr(model, "inv_std", None)
    if isinstance(mean, torch.Tensor) and isinstance(inv_std, torch.Tensor):
        z = mean + z / inv_std
    return z


def display_name(spec: str | Path) -> str:
    s = str(spec)
    return s if s in BUNDLED_MODELS else Path(s).name


def profile_bundle(bundle: Bundle, data: str | Path | None = None, runs: int = DEFAULT_RUNS,
                   warmup: int = DEFAULT_WARMUP, threads: int = 1, latency: bool = True,
                   name: str | None = None) -> dict:
    """Everything ``streamkws profile`` reports for one bundle, as a JSON-ready dict."""
    model = bundle.model.eval()
    x = example_input(bundle)
    # Time first, the way the daemon runs the model (inference mode, no hooks, no warning
    # filters). Measured on the static int8 default: when the model's first forward ran
    # under counting hooks or warnings.catch_warnings, every later forward stayed ~75 %
    # slower (1.34 vs 0.77 ms), so timing afterwards measured a state the daemon never has.
    latency_ms = measure_latency(model, x, runs, warmup, threads) if latency else None
    counts = count_macs(model, x)
    params, nonzero = count_weights(model)
    result: dict = {
        "model": name or bundle.name,
        "path": str(bundle.path) if bundle.path else None,
        "sha256": bundle.sha256,
        "arch": bundle.meta.get("arch"),
        "quantization": bundle.quantization,
        "labels": bundle.labels,
        "input_shape": list(x.shape),
        "params": params,
        "params_nonzero": nonzero,
        "macs": counts.macs,
        "macs_counted": MAC_NOTE,
        "weight_bytes": weight_bytes(model),
        "file_bytes": bundle.path.stat().st_size if bundle.path else None,
        "peak_activation_bytes": counts.peak_activation_bytes,
        "peak_activation_layer": counts.peak_layer,
        "peak_activation_definition": PEAK_NOTE,
        "largest_activation_bytes": counts.largest_activation_bytes,
        "uncounted_layers": counts.uncounted,
        "layers": [vars(layer) for layer in counts.layers],
    }
    if latency_ms is not None:
        result["latency_ms"] = latency_ms
    if data is not None:
        from streamkws.tools.evaluate import evaluate

        m = evaluate(bundle, data)
        result.update(accuracy=m["accuracy"], n_clips=m["n"], data=str(data))
    return result


# -- output ----------------------------------------------------------------------------------


def _kib(n: int | None) -> str:
    return "-" if n is None else f"{n / 1024:.1f}"


def _macs(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n / 1e3:.1f} k"


def format_profile(p: dict, layers: bool = False) -> str:
    shape = " x ".join(str(d) for d in p["input_shape"])
    lines = [
        f"model        {p['model']}" + (f" ({p['path']})" if p.get("path") else ""),
        f"arch         {p['arch']}, quantization {p['quantization']}, "
        f"{len(p['labels'])} labels",
        f"input        {shape} log-Mel (one window, batch 1)",
        f"parameters   {p['params']:,} ({p['params_nonzero']:,} nonzero)",
        f"MACs         {p['macs']:,} ({_macs(p['macs'])}; {MAC_NOTE})",
        f"weights      {_kib(p['weight_bytes'])} KiB in memory, file {_kib(p['file_bytes'])} KiB",
        f"activations  peak {_kib(p['peak_activation_bytes'])} KiB at "
        f"{p['peak_activation_layer']} ({PEAK_NOTE}); largest tensor "
        f"{_kib(p['largest_activation_bytes'])} KiB",
    ]
    if "latency_ms" in p:
        lat = p["latency_ms"]
        lines.append(f"latency      p50 {lat['p50']:.3f} ms, p99 {lat['p99']:.3f} ms (batch 1, "
                     f"{lat['threads']} thread{'s' if lat['threads'] > 1 else ''}, "
                     f"{lat['runs']} runs after {lat['warmup']} warm-up)")
    if "accuracy" in p:
        lines.append(f"accuracy     {p['accuracy']:.4f} on {p['n_clips']} clips of {p['data']}")
    if p["uncounted_layers"]:
        lines.append(f"not counted  {', '.join(p['uncounted_layers'])} (no MAC rule for "
                     "these layer types)")
    if layers:
        lines += ["", f"{'layer':<28} {'type':<22} {'output':<18} {'MACs':>12} {'act KiB':>8}"]
        for layer in p["layers"]:
            out = "x".join(str(d) for d in layer["output_shape"])
            lines.append(f"{layer['name'][:28]:<28} {layer['kind'][:22]:<22} {out:<18} "
                         f"{layer['macs']:>12,} {layer['activation_bytes'] / 1024:>8.1f}")
    return "\n".join(lines)


COMPARE_COLUMNS = ["model", "quantization", "params", "nonzero", "MACs", "weight KiB",
                   "file KiB", "p50 ms", "p99 ms"]
ACCURACY_COLUMNS = ["accuracy", "Δ accuracy"]


def format_compare(rows: list[dict]) -> str:
    """One markdown table, a row per profile; Δ accuracy is against the first row, and only
    for rows of the same labels (a model of other keywords is scored on another task)."""
    with_acc = all("accuracy" in r for r in rows)
    cols = COMPARE_COLUMNS + (ACCURACY_COLUMNS if with_acc else [])
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join(
        "---" if c in ("model", "quantization") else "---:" for c in cols) + "|"]
    base = rows[0].get("accuracy") if rows else None
    for r in rows:
        lat = r.get("latency_ms", {})
        cells = [
            r["model"], r["quantization"], f"{r['params']:,}", f"{r['params_nonzero']:,}",
            _macs(r["macs"]), _kib(r["weight_bytes"]), _kib(r["file_bytes"]),
            f"{lat['p50']:.3f}" if lat else "-", f"{lat['p99']:.3f}" if lat else "-",
        ]
        if with_acc:
            same = set(r["labels"]) == set(rows[0]["labels"])
            cells += [f"{r['accuracy']:.4f}",
                      f"{r['accuracy'] - base:+.4f}" if same else "other labels"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


# -- command line ----------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", default="default", metavar="M",
                       help="bundle path or name (default: default)")
    which.add_argument("--compare", nargs="+", metavar="M",
                       help="profile several bundles into one markdown table (the first row "
                            "is the reference for Δ accuracy)")
    p.add_argument("--data", metavar="DIR", help="also measure clip accuracy on this folder")
    p.add_argument("--runs", type=int, default=DEFAULT_RUNS,
                   help=f"timed runs for the latency (>= {MIN_RUNS}, default {DEFAULT_RUNS})")
    p.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                   help=f"untimed runs first (default {DEFAULT_WARMUP})")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--layers", action="store_true", help="also print MACs per layer")
    p.add_argument("--json", action="store_true",
                   help="one JSON object on stdout ({'models': [...]} with --compare)")


def run(args: argparse.Namespace) -> int:
    if args.runs < MIN_RUNS:
        raise StreamKWSError(f"--runs must be at least {MIN_RUNS} for a meaningful p99 "
                             f"(got {args.runs})")
    if args.warmup < 0:
        raise StreamKWSError(f"--warmup must be >= 0 (got {args.warmup})")
    if args.threads < 1:
        raise StreamKWSError(f"--threads must be >= 1 (got {args.threads})")
    if args.data is not None and not Path(args.data).is_dir():
        raise no_folder(args.data)
    specs = args.compare or [args.model]
    bundles = [(spec, load_bundle(spec)) for spec in specs]  # fail on a bad path up front
    rows = []
    for spec, bundle in bundles:
        rows.append(profile_bundle(bundle, args.data, args.runs, args.warmup, args.threads,
                                   name=display_name(spec)))
    other = [r["model"] for r in rows[1:] if set(r["labels"]) != set(rows[0]["labels"])]
    if args.data and other:
        log.warning("%s: labels other than %s's, so accuracy measures another task; no "
                    "Δ accuracy for them", ", ".join(other), rows[0]["model"])
    if args.json:
        print(json.dumps({"models": rows} if args.compare else rows[0]))
    elif args.compare:
        print(format_compare(rows))
        print(f"\nbatch 1, {args.threads} thread(s), {args.runs} runs; MACs: {MAC_NOTE}"
              + ("; Δ accuracy against the first row" if args.data else ""))
    else:
        print(format_profile(rows[0], layers=args.layers))
    return 0
