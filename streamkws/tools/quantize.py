"""``streamkws quantize``: post-training quantization of a float model bundle.

Modes (``--mode``):

``dynamic`` (default)
    int8 weights for ``nn.Linear``/``LSTM``/``GRU``, activations quantized on the fly; no
    calibration data.
``static``
    eager-mode post-training static quantization of the whole network: conv+BN(+ReLU)
    fused, weights and activations int8, activation ranges calibrated on real clips
    (``--calibration DIR``). ``--engine`` picks the kernels: ``x86`` (default) or
    ``qnnpack`` (ARM, e.g. a Raspberry Pi). The feature normalisation of the bundle stays
    float in front of the network's ``QuantStub``. ``--skip NAME`` keeps submodules float.
``mixed``
    a per-submodule choice, as in SpeechBrain's quantization tutorial: ``--dynamic NAME``,
    ``--static NAME`` (wrapped in its own quant/dequant pair and calibrated) or
    ``--skip NAME`` (float, also inside a quantized submodule); unlisted ones stay float.
``fp16``
    float16 weights for ``nn.Linear`` (dynamic quantization with ``dtype=float16``, what
    torch supports on CPU).

A bundle stores only a state dict and JSON metadata. Each mode registers a rebuilder with
:func:`streamkws.bundle.register_quantization` that reproduces the quantized module
structure from ``meta["quantization"]`` alone (for static parts: fuse, qconfig, prepare and
convert with no calibration data); the stored state dict then supplies the weights, scales
and zero points. :func:`streamkws.bundle.load_bundle` imports this module to find them.

    streamkws quantize --model default-float --mode static \\
        --calibration DIR --data DIR --out static.skw
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import difflib
import json
import logging
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from streamkws.bundle import Bundle, KWSModel, load_bundle, register_quantization, weight_bytes
from streamkws.errors import StreamKWSError, no_folder
from streamkws.models.quant import quantize_dynamic, quiet_ao_deprecation
from streamkws.models.registry import FloatIsland, fusion_groups
from streamkws.tools.outputs import check_output

log = logging.getLogger(__name__)

MODES = ("dynamic", "static", "mixed", "fp16")
ENGINES = ("x86", "qnnpack")
DEFAULT_ENGINE = "x86"
DEFAULT_CALIBRATION_CLIPS = 200
LATENCY_RUNS = 200
_CALIBRATION_BATCH = 32
# Module types dynamic int8 quantization converts (the default dynamic qconfig set); a
# --dynamic submodule without any of them would silently stay float.
_DYNAMIC_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.LSTM, nn.GRU, nn.LSTMCell,
                                               nn.GRUCell, nn.RNNCell)

Calibration = str | Path | np.ndarray | None
"""A labelled-folder tree (or Speech Commands download) of clips, or log-Mel windows
``(N, frames, mels)`` already computed with the bundle's front end."""


# --- warnings --------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_quantization(rebuilding: bool = False) -> Iterator[None]:
    """The ao deprecation notices, plus torch's own noise that a user cannot act on.

    ``get_default_qconfig`` builds observers with ``reduce_range``, which torch asks to
    replace by ``quant_min``/``quant_max``: a remark about torch's qconfig, not ours. When
    rebuilding a bundle's structure no data passes the observers, so ``convert`` warns
    that it falls back to default scales; the loaded state dict replaces them. During a
    real calibration that warning stays visible: there it means a layer saw no data.
    """
    with quiet_ao_deprecation(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Please use quant_min and quant_max",
                                category=UserWarning)
        if rebuilding:
            warnings.filterwarnings("ignore", message="must run observer before calling",
                                    category=UserWarning)
        yield


# --- engines ---------------------------------------------------------------------------------


def supported_engines() -> list[str]:
    return [e for e in torch.backends.quantized.supported_engines if e != "none"]


def use_engine(engine: str, for_bundle: bool = False) -> None:
    """Select the quantized kernels, or refuse clearly where this torch build lacks them.

    Global on purpose: quantized modules pack their weights for the engine current at
    ``convert``/load time and must run under the same one.
    """
    supported = supported_engines()
    if engine not in supported:
        alt = [e for e in ENGINES if e in supported]
        if for_bundle:
            what = f"this bundle was statically quantized for the {engine!r} engine, which"
            fix = f"; quantize default-float again with --engine {alt[0]}" if alt else ""
        else:
            what = f"quantization engine {engine!r}"
            fix = f"; use --engine {alt[0]}" if alt else ""
        raise StreamKWSError(f"{what} is not supported by this torch build "
                             f"(supported: {', '.join(supported) or 'none'}){fix}")
    torch.backends.quantized.engine = engine


# --- submodule names -------------------------------------------------------------------------


def submodule_names(net: nn.Module) -> list[str]:
    """Names ``--dynamic``/``--static``/``--skip`` accept: every submodule but the stubs."""
    stubs = (torch.ao.quantization.QuantStub, torch.ao.quantization.DeQuantStub)
    return [n for n, m in net.named_modules() if n and not isinstance(m, stubs)
            and "activation_post_process" not in n]


def net_relative(name: str) -> str:
    """A submodule name as ``quantize`` takes it: ``profile --layers`` and the sweep name
    layers from the bundle's wrapper (``net.blocks.1``); the same layer is ``blocks.1``."""
    return name[len("net."):] if name.startswith("net.") else name


def _under(name: str, parent: str) -> bool:
    return name.startswith(parent + ".")


def check_names(net: nn.Module, dynamic: Sequence[str] = (), static: Sequence[str] = (),
                skip: Sequence[str] = ()) -> None:
    """Refuse unknown, repeated or contradictory submodule names, before any work is done.

    A skip may sit inside a quantized submodule (that is what it is for); a quantized one
    may not sit inside another quantized one or inside a skipped one.
    """
    valid = submodule_names(net)
    valid_set = set(valid)
    seen: dict[str, str] = {}
    for flag, names in (("--dynamic", dynamic), ("--static", static), ("--skip", skip)):
        for name in names:
            if name not in valid_set:
                close = difflib.get_close_matches(name, valid, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise StreamKWSError(
                    f"{flag} {name!r}: no such submodule in the {type(net).__name__} network"
                    f"{hint}; valid names: {', '.join(valid)}")
            if name in seen:
                raise StreamKWSError(f"submodule {name!r} is given twice ({seen[name]} and "
                                     f"{flag})")
            seen[name] = flag
    quantized = [*dynamic, *static]
    for a in quantized:
        for b in quantized:
            if _under(a, b):
                raise StreamKWSError(f"{seen[a]} {a!r} lies inside {seen[b]} {b!r}; give one "
                                     "of them (use --skip to keep a part of it float)")
        for s in skip:
            if _under(a, s):
                raise StreamKWSError(f"{seen[a]} {a!r} lies inside --skip {s!r}")
    for name in dynamic:
        inner = [s for s in skip if _under(s, name)]
        convertible = [n for n, m in net.get_submodule(name).named_modules(prefix=name)
                       if isinstance(m, _DYNAMIC_TYPES)
                       and not any(n == s or _under(n, s) for s in inner)]
        if not convertible:
            raise StreamKWSError(
                f"--dynamic {name!r} holds no Linear/LSTM/GRU layer, the only layers dynamic "
                "quantization converts; use --static for convolutions")


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    # setattr on an existing child keeps its place in a Sequential.
    setattr(root.get_submodule(parent) if parent else root, attr, new)


# --- structure: shared by quantize() (with calibration) and the rebuilders (without) -------


def _prepare_static_region(region: nn.Module, skip: Sequence[str], whole_net: bool) -> None:
    """Fuse a region that will run in int8 and turn its skipped parts into float islands.

    ``skip`` is relative to ``region``. Fusion must not reach into a skipped part (folding
    its BN into a quantized conv would quantize it after all), so with skips only the
    fusion groups clear of them are fused.
    """
    if whole_net and not skip:
        region.fuse_model()  # the architecture's own fusion, as for any static model
    else:
        groups = [g for g in fusion_groups(region)
                  if not any(m == s or _under(m, s) for m in g for s in skip)]
        if groups:
            torch.ao.quantization.fuse_modules(region, groups, inplace=True)
    for s in skip:
        inner = region.get_submodule(s)
        # qconfig None wins over the inherited one: nothing inside gets observed/converted.
        inner.qconfig = None
        # Dequantize in front, quantize (with its own calibrated observer) behind.
        _replace(region, s, FloatIsland(inner))


def _apply_static(model: KWSModel, q: dict, calibrate: Callable[[KWSModel], None] | None
                  ) -> KWSModel:
    engine = q.get("engine", DEFAULT_ENGINE)
    use_engine(engine, for_bundle=calibrate is None)
    net = model.net
    _prepare_static_region(net, q.get("skip", []), whole_net=True)
    # On the network only: the KWSModel normalisation stays float in front of net.quant.
    net.qconfig = torch.ao.quantization.get_default_qconfig(engine)
    torch.ao.quantization.prepare(net, inplace=True)
    if calibrate is not None:
        calibrate(model)
    torch.ao.quantization.convert(net, inplace=True)
    return model


def _apply_mixed(model: KWSModel, q: dict, calibrate: Callable[[KWSModel], None] | None
                 ) -> KWSModel:
    net = model.net
    static, dynamic, skip = q.get("static", []), q.get("dynamic", []), q.get("skip", [])
    if static:
        engine = q.get("engine", DEFAULT_ENGINE)
        use_engine(engine, for_bundle=calibrate is None)
        qconfig = torch.ao.quantization.get_default_qconfig(engine)
        for name in static:
            region = net.get_submodule(name)
            inner = [s[len(name) + 1:] for s in skip if _under(s, name)]
            _prepare_static_region(region, inner, whole_net=False)
            # QuantStub/DeQuantStub around the part: int8 inside, float at its borders.
            wrapper = torch.ao.quantization.QuantWrapper(region)
            wrapper.qconfig = qconfig
            _replace(net, name, wrapper)
        # The net has no qconfig, so only the wrapped parts get observers and convert.
        torch.ao.quantization.prepare(net, inplace=True)
        if calibrate is not None:
            calibrate(model)
        torch.ao.quantization.convert(net, inplace=True)
    if dynamic:
        # Names map to the default int8 dynamic qconfig; skips inside map to None, which
        # the name lookup in propagate_qconfig_ prefers over the inherited qconfig.
        spec: dict = {name: torch.ao.quantization.default_dynamic_qconfig for name in dynamic}
        spec.update({s: None for s in skip if any(_under(s, d) for d in dynamic)})
        torch.ao.quantization.quantize_dynamic(net, spec, dtype=torch.qint8, inplace=True)
    return model


def _apply_fp16(model: KWSModel, q: dict) -> KWSModel:
    torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.float16,
                                           inplace=True)
    return model


@register_quantization("static")
def _rebuild_static(model: KWSModel, q: dict) -> nn.Module:
    with _quiet_quantization(rebuilding=True):
        return _apply_static(model, q, None)


@register_quantization("mixed")
def _rebuild_mixed(model: KWSModel, q: dict) -> nn.Module:
    with _quiet_quantization(rebuilding=True):
        return _apply_mixed(model, q, None)


@register_quantization("fp16")
def _rebuild_fp16(model: KWSModel, q: dict) -> nn.Module:
    with _quiet_quantization(rebuilding=True):
        return _apply_fp16(model, q)


# --- calibration -----------------------------------------------------------------------------


def calibration_features(bundle: Bundle, data: str | Path,
                         clips: int = DEFAULT_CALIBRATION_CLIPS, seed: int = 0) -> np.ndarray:
    """Log-Mel windows of up to ``clips`` clips from ``data``, spread evenly over the labels.

    Computed with the bundle's own front end, so the observed ranges are those the model
    sees in the daemon. A Speech Commands download contributes its training split only.
    """
    from streamkws.data import ClipCache, is_speech_commands_download, load_dataset
    from streamkws.features import LogMel

    if isinstance(clips, bool) or not isinstance(clips, int) or clips < 1:
        raise StreamKWSError(f"--calibration-clips must be a positive integer (got {clips!r})")
    root = Path(data)
    split = "train" if is_speech_commands_download(root) else None
    ds = load_dataset(root, bundle.labels, split=split)
    rng = np.random.default_rng(seed)
    by_label: list[list[int]] = []
    for label in ds.labels:
        idx = [i for i, it in enumerate(ds.items) if it.label == label]
        # Shuffled: files sort by speaker, and a range should not come from few speakers.
        by_label.append([idx[j] for j in rng.permutation(len(idx))])
    chosen: list[int] = []
    depth = 0
    # Round robin over the labels: balanced, and a short label leaves its share to others.
    while len(chosen) < clips and any(depth < len(ix) for ix in by_label):
        chosen += [ix[depth] for ix in by_label if depth < len(ix)][: clips - len(chosen)]
        depth += 1
    x, kept = ClipCache().load_all(ds.subset(sorted(chosen)))
    if len(kept) == 0:
        raise StreamKWSError(f"{root}: no readable calibration clips")
    logmel = LogMel(bundle.frontend)
    n_frames = bundle.frontend.window_frames
    return np.concatenate([logmel(x[i : i + 64])[:, :n_frames] for i in range(0, len(x), 64)])


def _calibrator(features: np.ndarray) -> Callable[[KWSModel], None]:
    def run(model: KWSModel) -> None:
        x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
        # no_grad, not inference_mode: observers update their own (normal) buffers in place.
        with torch.no_grad():
            for i in range(0, len(x), _CALIBRATION_BATCH):
                model(x[i : i + _CALIBRATION_BATCH])

    return run


# --- quantize --------------------------------------------------------------------------------


def quantize(
    bundle: Bundle,
    mode: str = "dynamic",
    *,
    calibration: Calibration = None,
    calibration_clips: int = DEFAULT_CALIBRATION_CLIPS,
    engine: str | None = None,
    dynamic: Sequence[str] = (),
    static: Sequence[str] = (),
    skip: Sequence[str] = (),
    name: str | None = None,
) -> Bundle:
    """A quantized copy of a float bundle (not yet saved); ``bundle`` is left untouched.

    Raises :class:`StreamKWSError` for an already quantized bundle, a missing calibration
    set where static parts need one, unknown or contradictory submodule names, options
    the mode does not use, and an engine this torch build lacks.
    """
    if mode not in MODES:
        raise StreamKWSError(f"unknown quantization mode {mode!r}; modes: {', '.join(MODES)}")
    if bundle.quantization != "none":
        # Only "default" ships a float twin; "accurate" ships quantized only.
        hint = {"default": " (--model default-float)",
                "accurate": " (accurate ships only quantized: a float pair is "
                            "'streamkws ensemble --model default-float --model HEAD.skw "
                            "--out accurate-float.skw', "
                            "HEAD.skw a float speech-embedding head)"}.get(bundle.name, "")
        raise StreamKWSError(
            f"model '{bundle.name}' is already quantized ({bundle.quantization}); quantize "
            f"its float version instead{hint}")
    dynamic, static, skip = list(dynamic), list(static), list(skip)
    if mode != "mixed" and (dynamic or static):
        raise StreamKWSError("--dynamic and --static choose per submodule: use --mode mixed")
    if mode in ("dynamic", "fp16") and skip:
        raise StreamKWSError(f"--skip applies to --mode static or mixed, not {mode}")
    if mode == "mixed" and not (dynamic or static):
        raise StreamKWSError("--mode mixed needs at least one --dynamic or --static submodule "
                             f"(names: {', '.join(submodule_names(bundle.model.net))})")
    needs_static = mode == "static" or bool(static)
    if engine is not None and not needs_static:
        raise StreamKWSError("--engine applies to static quantization (--mode static, or "
                             "--mode mixed with --static parts)")
    engine = engine or DEFAULT_ENGINE
    if engine not in ENGINES:
        raise StreamKWSError(f"unknown engine {engine!r}; engines: {', '.join(ENGINES)}")
    net = bundle.model.net
    dynamic, static, skip = ([net_relative(n) for n in names]
                             for names in (dynamic, static, skip))
    check_names(net, dynamic, static, skip)
    if calibration is not None and not needs_static:
        raise StreamKWSError("--calibration applies to static quantization (--mode static, or "
                             "--mode mixed with --static parts); weights alone need none")

    q: dict = {"mode": mode}
    if mode == "dynamic":
        q["dtype"] = "qint8"
    elif mode == "fp16":
        q.update({"dtype": "float16", "modules": ["Linear"]})
    else:
        q["dtype"] = "qint8"
        if mode == "mixed":
            q.update({"dynamic": dynamic, "static": static})
        q["skip"] = skip
        if needs_static:
            q["engine"] = engine

    calibrate = None
    if calibration is not None and not needs_static:
        log.info("mode %s needs no calibration; ignoring %s", mode, calibration)
    if needs_static:
        if calibration is None:
            raise StreamKWSError(
                "static quantization needs calibration clips: give --calibration DIR "
                "(labelled folders, DIR/<label>/*.wav)")
        use_engine(engine)  # refuse before the (slow) feature computation
        if isinstance(calibration, np.ndarray):
            feats = calibration
            q["calibration"] = {"data": "features", "clips": int(len(feats))}
        else:
            feats = calibration_features(bundle, calibration, calibration_clips)
            q["calibration"] = {"data": str(calibration), "clips": int(len(feats))}
        if feats.ndim != 3 or len(feats) == 0:
            raise StreamKWSError(f"calibration features must be (N, frames, mels) with N > 0 "
                                 f"(got shape {feats.shape})")
        calibrate = _calibrator(feats)

    # The float model is copied: eval() and fusion would otherwise change the caller's.
    model = copy.deepcopy(bundle.model).eval()
    with _quiet_quantization():
        if mode == "dynamic":
            model = quantize_dynamic(model)
        elif mode == "fp16":
            model = _apply_fp16(model, q)
        elif mode == "static":
            model = _apply_static(model, q, calibrate)
        else:
            model = _apply_mixed(model, q, calibrate)
    if calibrate is not None:
        _check_runs(model, feats[:2])

    meta = {k: v for k, v in bundle.meta.items()
            # Written anew by save(); the float model's metrics do not describe this one.
            if k not in ("created", "size_bytes_weights", "streamkws_version", "metrics")}
    meta.update({"name": name or f"{bundle.name}-{mode}", "quantization": q,
                 "quantized_from": {"name": bundle.name, "sha256": bundle.sha256,
                                    "metrics": bundle.meta.get("metrics", {})}})
    bundle.carry_detect(meta)
    return Bundle(model.eval(), meta)


def _check_runs(model: nn.Module, x: np.ndarray) -> None:
    """Fail at quantize time, not in the daemon, when an op has no quantized kernel."""
    try:
        with torch.no_grad():
            model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
    except (RuntimeError, NotImplementedError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StreamKWSError(
            f"the statically quantized network does not run ({first[:200]}); keep the "
            "failing layer float with --skip NAME") from None


# --- comparison ------------------------------------------------------------------------------


def latency_p50_ms(bundles: Sequence[Bundle], runs: int = LATENCY_RUNS) -> list[float]:
    """Median time of one window's inference per bundle: batch 1, one thread.

    The bundles take turns run by run, so background load shifts all of them alike.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times: list[list[float]] = [[] for _ in bundles]
        windows = []
        for b in bundles:
            rng = np.random.default_rng(0)
            shape = (b.frontend.window_frames, b.frontend.n_mels)
            windows.append(rng.normal(-6, 2, size=shape).astype(np.float32))
        for _ in range(20):  # warm-up: allocator, weight packing caches
            for b, w in zip(bundles, windows, strict=True):
                b.predict(w)
        for _ in range(runs):
            for t, b, w in zip(times, bundles, windows, strict=True):
                start = time.perf_counter()
                b.predict(w)
                t.append((time.perf_counter() - start) * 1000)
    finally:
        torch.set_num_threads(old)
    return [statistics.median(t) for t in times]


def describe_quantization(q: dict) -> str:
    mode = q.get("mode", "none")
    if mode == "dynamic":
        return "dynamic int8 (Linear/LSTM/GRU weights)"
    if mode == "fp16":
        return "float16 Linear weights (dynamic)"
    if mode == "static":
        skip = f", float: {', '.join(q['skip'])}" if q.get("skip") else ""
        return f"static int8, engine {q.get('engine')}{skip}"
    if mode == "mixed":
        parts = [f"{k} {', '.join(q[k])}" for k in ("static", "dynamic") if q.get(k)]
        if q.get("skip"):
            parts.append(f"float {', '.join(q['skip'])}")
        if q.get("engine"):
            parts.append(f"engine {q['engine']}")
        return f"mixed int8: {'; '.join(parts)}"
    return mode


def compare(float_bundle: Bundle, quantized: Bundle, data: str | Path | None = None,
            runs: int = LATENCY_RUNS, quantized_metrics: dict | None = None) -> dict:
    """Weight bytes, file bytes, accuracy on ``data`` and latency p50 of both bundles
    (``quantized_metrics``: the quantized one's evaluation on ``data``, if already made)."""
    from streamkws.tools.evaluate import evaluate

    def side(b: Bundle, p50: float) -> dict:
        return {"name": b.name, "path": str(b.path) if b.path else None,
                "weight_bytes": weight_bytes(b.model),
                "file_bytes": b.path.stat().st_size if b.path else None,
                "latency_ms_p50": round(p50, 4)}

    p50s = latency_p50_ms([float_bundle, quantized], runs)
    report: dict = {
        "mode": quantized.quantization,
        "quantization": quantized.meta.get("quantization", {}),
        "float": side(float_bundle, p50s[0]),
        "quantized": side(quantized, p50s[1]),
        "latency": {"batch": 1, "threads": 1, "runs": runs, "statistic": "median",
                    # What the daemon calls per window; `profile` times the network alone,
                    # so its figures are a little lower.
                    "timed": "Bundle.predict (features in, probabilities out)"},
        "data": str(data) if data is not None else None,
    }
    if data is not None:
        for key, b in (("float", float_bundle), ("quantized", quantized)):
            m = quantized_metrics if key == "quantized" and quantized_metrics else \
                evaluate(b, data)
            report[key]["accuracy"] = m["accuracy"]
            report[key]["clips"] = m["n"]
    return report


def format_table(r: dict) -> str:
    f, q = r["float"], r["quantized"]

    def change(a: float | None, b: float | None) -> str:
        return f"{(b - a) / a * 100:+.1f}%" if a and b is not None else ""

    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    rows = [("weights (bytes)", num(f["weight_bytes"], "d"), num(q["weight_bytes"], "d"),
             change(f["weight_bytes"], q["weight_bytes"])),
            ("file (bytes)", num(f["file_bytes"], "d"), num(q["file_bytes"], "d"),
             change(f["file_bytes"], q["file_bytes"]))]
    if "accuracy" in f:
        rows.append(("accuracy", f"{f['accuracy']:.4f}", f"{q['accuracy']:.4f}",
                     f"{(q['accuracy'] - f['accuracy']) * 100:+.2f} pt"))
    rows.append(("latency p50 (ms)", f"{f['latency_ms_p50']:.3f}", f"{q['latency_ms_p50']:.3f}",
                 change(f["latency_ms_p50"], q["latency_ms_p50"])))
    qn = r["quantization"]
    lines = [f"{f['name']} ({f['path']}) -> {q['name']} ({q['path']})",
             f"quantization: {describe_quantization(qn)}"]
    if qn.get("calibration"):
        c = qn["calibration"]
        lines.append(f"calibration: {c['clips']} clips of {c['data']}")
    lines.append("")
    head = ("", "float", r["mode"], "change")
    w0 = max(len(row[0]) for row in rows)
    w = max(10, *(len(x) for row in rows for x in row[1:3]))
    lines.append(f"{head[0]:<{w0}}  {head[1]:>{w}}  {head[2]:>{w}}  {head[3]:>9}")
    lines += [f"{a:<{w0}}  {b:>{w}}  {c:>{w}}  {d:>9}" for a, b, c, d in rows]
    notes = []
    if "accuracy" in f:
        notes.append(f"accuracy on {f['clips']} clips of {r['data']}")
    lat = r["latency"]
    notes.append(f"latency per window: batch {lat['batch']}, {lat['threads']} thread, median "
                 f"of {lat['runs']} runs of Bundle.predict, as the daemon calls it "
                 "(`profile` times the network's forward alone)")
    if r["mode"] == "fp16":
        # Without this the unchanged sizes look like a bug.
        notes.append("fp16: torch packs the Linear weights as float16 in memory but stores "
                     "them as float32 in the state dict, so the sizes do not shrink")
    lines += [""] + [f"({n})" for n in notes]
    return "\n".join(lines)


# --- command line ----------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default-float", metavar="M",
                   help="float bundle path, or default-float (default)")
    p.add_argument("--mode", choices=MODES, default="dynamic",
                   help="dynamic (default): int8 Linear/LSTM/GRU weights; static: int8 "
                        "weights and activations, calibrated; mixed: per submodule; "
                        "fp16: float16 Linear weights")
    p.add_argument("--calibration", metavar="DIR",
                   help="labelled clips (DIR/<label>/*.wav) for static calibration")
    p.add_argument("--calibration-clips", type=int, default=DEFAULT_CALIBRATION_CLIPS,
                   metavar="N", help="calibrate on up to N clips spread over the labels "
                                     f"(default {DEFAULT_CALIBRATION_CLIPS})")
    p.add_argument("--engine", choices=ENGINES,
                   help="static kernels: x86 (default) or qnnpack (ARM)")
    p.add_argument("--dynamic", action="append", default=[], metavar="NAME",
                   help="mixed: quantize this submodule dynamically, e.g. head.3 (repeatable)")
    p.add_argument("--static", action="append", default=[], metavar="NAME",
                   help="mixed: quantize this submodule statically, e.g. blocks (repeatable)")
    p.add_argument("--skip", action="append", default=[], metavar="NAME",
                   help="static/mixed: keep this submodule float (repeatable)")
    p.add_argument("--data", metavar="DIR", help="also compare accuracy on these clips")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--out", required=True, metavar="M2", help="quantized bundle to write")


def run(args: argparse.Namespace) -> int:
    src = load_bundle(args.model)
    out = check_output(args.out, inputs=(src.path,))
    if args.data is not None and not Path(args.data).is_dir():
        raise no_folder(args.data)
    if args.calibration is not None and not Path(args.calibration).is_dir():
        raise no_folder(args.calibration, "calibration folder")
    qb = quantize(src, args.mode, calibration=args.calibration,
                  calibration_clips=args.calibration_clips, engine=args.engine,
                  dynamic=args.dynamic, static=args.static, skip=args.skip, name=out.stem)
    measured = None
    if args.data is not None:
        from streamkws.tools.evaluate import evaluate, metrics_summary

        # Measured for the comparison anyway: recorded, so the bundle says how it did on
        # what.
        measured = evaluate(qb, args.data)
        qb.meta["metrics"] = {"evaluation": {"data": str(args.data), **metrics_summary(measured)}}
    qb.save(out)
    # Compare what the daemon will load, which also proves the bundle rebuilds.
    report = compare(src, load_bundle(out), args.data, quantized_metrics=measured)
    print(json.dumps(report) if args.json else format_table(report))
    return 0
