"""``streamkws export``: a model bundle as a TorchScript or ONNX file for other runtimes.

Both formats take raw log-Mel features ``(batch, window_frames, n_mels)`` float32 (the
bundle's normalisation is inside the graph) and return logits ``(batch, n_classes)``;
softmax gives the probabilities. The labels, the front-end settings and the input/output
contract travel inside the file: as the extra file ``streamkws.json`` of the TorchScript
archive, and as ONNX ``metadata_props`` (``streamkws.json`` with everything, plus
``labels`` and ``frontend``).

Every export is checked before it is put in place: the file is loaded back and run on
``--check-clips`` real clips from ``--check-data`` (or, without it, on random features,
with a warning), one clip at a time as the daemon runs, and the largest absolute
difference of class probabilities against the bundle must stay within ``--tolerance``
(default 1e-4 for float bundles, 1e-2 for quantized ones). A failed check leaves no file.

What torch 2.13 can export (found out on torch 2.13.0+cpu, onnx 1.23, onnxruntime 1.31):

TorchScript
    ``torch.jit.trace`` of the model, float or quantized (dynamic and static int8 both
    trace). ``torch.jit`` is deprecated in 2.13 but works; exactly its deprecation notices
    are silenced. By default the trace goes through
    ``torch.utils.mobile_optimizer.optimize_for_mobile`` and is written with
    ``_save_for_lite_interpreter``: one file that both ``torch.jit.load`` and the PyTorch
    Mobile lite interpreter load. ``optimize_for_mobile`` needs XNNPACK, which the x86
    CPU wheels of torch 2.13 are built without; there the trace is frozen
    (``torch.jit.freeze``) instead and the result says so. ``--no-mobile`` writes a plain
    ``torch.jit.save`` archive of the unfrozen trace.
ONNX
    Float bundles: the ``torch.export``-based exporter (the default of torch 2.13), with a
    dynamic batch axis. Dynamically quantized bundles: neither exporter handles
    ``quantized::linear_dynamic`` (the legacy one has no symbolic for it, ``torch.export``
    cannot trace its packed weights), so the *float equivalent* is exported, with a
    warning: the int8 weights dequantized (exactly the values the int8 model multiplies
    by) and float activations; re-quantize the file with
    ``onnxruntime.quantization.quantize_dynamic`` if int8 is wanted. Statically quantized
    bundles: the legacy TorchScript-based exporter writes QDQ ONNX (QuantizeLinear /
    DequantizeLinear around float ops), which works for conv/linear/ReLU/add networks
    (dscnn, mobilenetv2) but not for quantized BatchNorm (bcresnet's SubSpectralNorm) or
    quantized padding (tutorial_cnn); those fail with the exporter's message.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from streamkws import __version__
from streamkws.bundle import Bundle, KWSModel, load_bundle
from streamkws.errors import StreamKWSError, no_folder
from streamkws.models.quant import quiet_ao_deprecation
from streamkws.models.registry import KWSNet
from streamkws.tools.outputs import check_output

log = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx")
EXTRA_FILE = "streamkws.json"
FLOAT_TOLERANCE = 1e-4
QUANTIZED_TOLERANCE = 1e-2
DEFAULT_CHECK_CLIPS = 20

# Deprecation notices of the APIs this module uses on purpose (matched on the message
# start, so any other warning still shows): torch.jit and the lite interpreter, the legacy
# ONNX exporter (the only one for static int8), and a pytree notice that the torch.export
# based exporter triggers inside torch itself.
_EXPORT_DEPRECATIONS = (
    r"`torch\.jit\.[a-z_]+` is deprecated",
    r"torch\.jit\.[a-z_]+ is deprecated",
    r"Lite Interpreter is deprecated",
    r"You are using the legacy TorchScript-based ONNX export",
    r"The feature will be removed\. Please remove usage of this function",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)


@contextlib.contextmanager
def quiet_export() -> Iterator[None]:
    with quiet_ao_deprecation(), warnings.catch_warnings():
        for message in _EXPORT_DEPRECATIONS:
            for category in (DeprecationWarning, FutureWarning, UserWarning):
                warnings.filterwarnings("ignore", message=message, category=category)
        # The ONNX exporter logs one warning per torchvision op it cannot register.
        reg = logging.getLogger("torch.onnx._internal.exporter._registration")
        level = reg.level
        reg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            reg.setLevel(level)


class _Exportable(nn.Module):
    """``KWSModel.forward`` without the network's Python-side input checks, which a trace
    would bake in as constants (with a TracerWarning each); same arithmetic."""

    def __init__(self, model: KWSModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        net = m.net
        x = (x - m.mean) * m.inv_std
        return net.dequant(net.body(net.quant(net.to_image(x))))


def export_module(model: nn.Module) -> nn.Module:
    """The module to trace/export for a bundle's model."""
    plain = (isinstance(model, KWSModel) and type(model).forward is KWSModel.forward
             and isinstance(model.net, KWSNet) and type(model.net).forward is KWSNet.forward)
    return _Exportable(model).eval() if plain else model.eval()


def metadata(bundle: Bundle, fmt: str) -> dict:
    fe = bundle.frontend
    return {
        "format": "streamkws-export",
        "version": 1,
        "export_format": fmt,
        "name": bundle.name,
        "arch": bundle.meta.get("arch"),
        "arch_kwargs": bundle.meta.get("arch_kwargs"),
        "labels": bundle.labels,
        "frontend": fe.to_dict(),
        "quantization": bundle.meta.get("quantization", {"mode": "none"}),
        "input": {"name": "features", "shape": ["batch", fe.window_frames, fe.n_mels],
                  "dtype": "float32",
                  "meaning": "raw log-Mel frames of the front end above; normalisation is "
                             "inside the model"},
        "output": {"name": "logits", "shape": ["batch", len(bundle.labels)],
                   "meaning": "class logits in label order; softmax for probabilities"},
        "source_sha256": bundle.sha256,
        "streamkws_version": __version__,
    }


def _example(bundle: Bundle) -> torch.Tensor:
    from streamkws.tools.profile import example_input

    return example_input(bundle)


# -- TorchScript -----------------------------------------------------------------------------


def _trace(bundle: Bundle) -> torch.jit.ScriptModule:
    module = export_module(bundle.model)
    with quiet_export(), torch.no_grad():
        return torch.jit.trace(module, _example(bundle))


def export_torchscript(bundle: Bundle, out: Path, mobile: bool = True) -> list[str]:
    """Write the TorchScript file; return notes on what was done."""
    notes: list[str] = []
    traced = _trace(bundle)
    extra = {EXTRA_FILE: json.dumps(metadata(bundle, "torchscript"))}
    if not mobile:
        with quiet_export():
            torch.jit.save(traced, str(out), _extra_files=extra)
        notes.append("plain torch.jit.save archive of the trace (--no-mobile)")
        return notes
    from torch.utils.mobile_optimizer import optimize_for_mobile

    with quiet_export():
        try:
            module = optimize_for_mobile(traced)
            notes.append("optimized with optimize_for_mobile")
        except Exception as exc:  # any failure: frozen trace
            text = str(exc).strip()
            why = ("it needs XNNPACK, which this torch build lacks" if "XNNPACK" in text
                   else (text.splitlines() or [type(exc).__name__])[0][:160])
            module = torch.jit.freeze(traced.eval())
            notes.append(f"optimize_for_mobile failed ({why}); saved the frozen trace instead")
        module._save_for_lite_interpreter(str(out), _extra_files=extra)
    notes.append("saved for the lite interpreter (loads with torch.jit.load and "
                 "torch.jit.mobile._load_for_lite_interpreter)")
    return notes


_CPP_QUANT_DEPRECATION = r"Warning: torch\.quantize_per_tensor.* are deprecated"


def _torchscript_runners(path: Path, mobile: bool) -> list:
    with quiet_export(), _native_output_captured(drop=_CPP_QUANT_DEPRECATION):
        runners = [torch.jit.load(str(path))]
        if mobile:
            from torch.jit.mobile import _load_for_lite_interpreter

            runners.append(_load_for_lite_interpreter(str(path)))
    return runners


def read_torchscript_metadata(path: str | Path) -> dict:
    extra = {EXTRA_FILE: ""}
    with quiet_export():
        torch.jit.load(str(path), _extra_files=extra)
    return json.loads(extra[EXTRA_FILE])


# -- ONNX ------------------------------------------------------------------------------------


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise StreamKWSError("ONNX export needs the onnx and onnxscript packages "
                             "(pip install 'streamkws[train]')") from None


def _module_kinds(model: nn.Module) -> tuple[bool, bool]:
    """(has dynamically quantized modules, has statically quantized modules).

    A statically quantized network quantizes its input: its QuantStub became ``Quantize``.
    """
    import torch.ao.nn.quantized as nnq

    dynamic = any(isinstance(m, _dynamic_types()) for m in model.modules())
    static = any(isinstance(m, nnq.Quantize) for m in model.modules())
    return dynamic, static


def _dynamic_types() -> tuple[type, ...]:
    import torch.ao.nn.quantized.dynamic as nnqd

    return (nnqd.Linear, nnqd.LSTM, nnqd.GRU, nnqd.LSTMCell, nnqd.GRUCell, nnqd.RNNCell)


def dequantize_dynamic(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with each dynamically quantized ``Linear`` replaced by a float
    ``Linear`` holding its dequantized weights (the values the int8 kernel multiplies by)."""
    import torch.ao.nn.intrinsic.quantized.dynamic as nniqd
    import torch.ao.nn.quantized.dynamic as nnqd

    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _dynamic_types()) and not isinstance(child, nnqd.Linear):
                raise StreamKWSError(f"cannot export the dynamically quantized "
                                     f"{type(child).__name__} to ONNX; export the float bundle")
            if not isinstance(child, nnqd.Linear):
                continue
            with quiet_ao_deprecation():
                w, b = child.weight(), child.bias()
            w = w.dequantize() if w.is_quantized else w.float()
            lin = nn.Linear(child.in_features, child.out_features, bias=b is not None)
            with torch.no_grad():
                lin.weight.copy_(w)
                if b is not None:
                    lin.bias.copy_(b.float())
            new: nn.Module = lin
            if isinstance(child, nniqd.LinearReLU):
                new = nn.Sequential(lin, nn.ReLU())
            setattr(parent, name, new.eval())
    return model


DYNAMO_MIN_OPSET = 18
"""The oldest opset torch's (dynamo) ONNX exporter writes; older ones fail to convert."""


def export_onnx(bundle: Bundle, out: Path, opset: int | None = None) -> list[str]:
    """Write the ONNX file with metadata; return notes on what was done."""
    _require_onnx()
    import onnx

    notes: list[str] = []
    model = bundle.model
    dynamic, static = _module_kinds(model)
    if dynamic:
        model = dequantize_dynamic(model)
        msg = ("ONNX: torch 2.13 cannot export dynamically quantized Linear layers "
               "(quantized::linear_dynamic); exported the float equivalent (the quantized "
               "weights dequantized, float activations)")
        log.warning(msg)
        notes.append(msg)
    module = export_module(model)
    x = _example(bundle)
    kwargs: dict = {"input_names": ["features"], "output_names": ["logits"]}
    if opset is not None:
        if not static and opset < DYNAMO_MIN_OPSET:
            # Found before the exporter tries: its failed down-conversion logs a traceback.
            raise StreamKWSError(f"--opset {opset}: torch {torch.__version__.split('+')[0]}'s "
                                 f"exporter writes opset {DYNAMO_MIN_OPSET} or later; leave "
                                 "--opset out or ask for one of those")
        newest = onnx.defs.onnx_opset_version()
        if opset > newest:
            # Also found before the exporter tries, for the same reason.
            raise StreamKWSError(f"--opset {opset}: the installed onnx {onnx.__version__} "
                                 f"knows opsets up to {newest}; leave --opset out or ask "
                                 "for one of those")
        kwargs["opset_version"] = opset
    with quiet_export(), torch.no_grad():
        if static:
            try:
                with _native_output_captured():
                    torch.onnx.export(module, (x,), str(out), dynamo=False,
                                      dynamic_axes={"features": {0: "batch"},
                                                    "logits": {0: "batch"}}, **kwargs)
            except Exception as exc:  # the exporter raises many types
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise StreamKWSError(
                    f"torch {torch.__version__.split('+')[0]} cannot export this statically "
                    f"quantized model to ONNX ({first[:200]}); export the float bundle "
                    "(and quantize with onnxruntime) or use --format torchscript") from None
            notes.append("static int8 exported as QDQ ONNX by the TorchScript-based exporter")
        else:
            _export_dynamo(module, x, out, kwargs, notes)
    m = onnx.load(str(out))
    wrote = max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=None)
    if opset is not None and wrote != opset:
        # The exporter falls back to its own opset when it cannot convert, and says so
        # only in a logged traceback.
        raise StreamKWSError(f"--opset {opset}: torch {torch.__version__.split('+')[0]} "
                             f"could not export at that opset (it wrote opset {wrote} "
                             "instead); leave --opset out or ask for another")
    meta = metadata(bundle, "onnx")
    onnx.helper.set_model_props(m, {
        EXTRA_FILE: json.dumps(meta),
        "labels": json.dumps(meta["labels"]),
        "frontend": json.dumps(meta["frontend"]),
    })
    m.doc_string = f"streamkws {bundle.name}: log-Mel (batch, frames, mels) -> logits"
    onnx.checker.check_model(m)
    onnx.save(m, str(out))
    return notes


@contextlib.contextmanager
def _native_output_captured(drop: str | None = None) -> Iterator[None]:
    """Hold back what native code writes to stdout/stderr inside the block.

    torch 2.13's TorchScript-based ONNX exporter always enables its C++ log (its
    ``setup_onnx_logging`` tests a function object for truth) and dumps the whole IR graph
    when an operator is unsupported; and loading a TorchScript file with quantized weights
    prints the quantized-tensor deprecation from C++, past Python's warning filters. Both
    go straight to the file descriptors. The output is dropped when the block raises (the
    error says what failed), else passed on to stderr without the lines matching ``drop``.
    """
    import tempfile

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            if not failed:
                sink.seek(0)
                lines = sink.read().decode(errors="replace").splitlines(keepends=True)
                text = "".join(line for line in lines
                               if not (drop and re.search(drop, line)))
                if text.strip():
                    sys.stderr.write(text)


def _export_dynamo(module: nn.Module, x: torch.Tensor, out: Path, kwargs: dict,
                   notes: list[str]) -> None:
    from torch.export import Dim

    # The exporter prints progress to stdout unless verbose=False; keep stdout for --json.
    attempts = [{"dynamic_shapes": {"x": {0: Dim("batch", min=1, max=1024)}}}, {}]
    for i, extra in enumerate(attempts):
        try:
            torch.onnx.export(module, (x,), str(out), dynamo=True, verbose=False,
                              external_data=False, **kwargs, **extra)
            if i:
                notes.append("the batch axis could not be made dynamic; fixed at 1")
            return
        except Exception as exc:  # retry without the dynamic batch axis
            last = exc
    first = (str(last).strip().splitlines() or [type(last).__name__])[0]
    raise StreamKWSError(f"ONNX export failed ({first[:200]})")


def read_onnx_metadata(path: str | Path) -> dict:
    import onnx

    m = onnx.load(str(path))
    return {p.key: p.value for p in m.metadata_props}


# -- checking --------------------------------------------------------------------------------


def check_features(bundle: Bundle, data: str | Path | None,
                   n: int = DEFAULT_CHECK_CLIPS) -> tuple[np.ndarray, str]:
    """``n`` windows of log-Mel features to compare on, and what they are.

    From ``data``: clips spread evenly over the (label-sorted) folder. Without: random
    features of the bundle's own scale (standard normal after its normalisation).
    """
    fe = bundle.frontend
    if data is None:
        log.warning("no --check-data: checking the export on random features, not real clips")
        from streamkws.tools.profile import example_input

        x = example_input(bundle, n, seed=1)
        return x.numpy().astype(np.float32), f"{n} random feature windows"
    from streamkws.data import ClipCache, is_speech_commands_download, load_dataset
    from streamkws.errors import AudioError
    from streamkws.features import LogMel

    root = Path(data)
    ds = load_dataset(root, bundle.labels,
                      split="testing" if is_speech_commands_download(root) else None)
    picks = np.unique(np.linspace(0, len(ds) - 1, min(n, len(ds))).round().astype(int))
    cache, clips = ClipCache(), []
    for i in picks:
        try:
            clips.append(cache.load(ds.items[int(i)]))
        except AudioError as exc:
            log.warning("skipping unreadable clip: %s", exc)
    if not clips:
        raise StreamKWSError(f"{root}: no readable clips to check the export on")
    feats = LogMel(fe)(np.stack(clips))[:, : fe.window_frames]
    return feats.astype(np.float32), f"{len(clips)} clips of {root}"


def _softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def max_prob_diff(bundle: Bundle, fmt: str, path: Path, feats: np.ndarray,
                  mobile: bool = True) -> float | None:
    """Largest |p_export - p_bundle| over ``feats``, each window run alone (batch 1);
    None when the ONNX file cannot be run here (no onnxruntime)."""
    # Per window for the reference too: dynamic quantization scales activations by the
    # range of the whole batch, so a batch of 20 is not 20 single windows.
    ref = np.stack([bundle.predict(f) for f in feats]).astype(np.float64)
    outs: list[np.ndarray] = []
    if fmt == "torchscript":
        for runner in _torchscript_runners(path, mobile):
            with torch.inference_mode():
                z = [runner(torch.from_numpy(f[None])).numpy() for f in feats]
            outs.append(np.concatenate(z))
    else:
        try:
            import onnxruntime as ort
        except ImportError:
            log.warning("onnxruntime is not installed: the ONNX file was not checked "
                        "(pip install onnxruntime)")
            return None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        try:
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            name = sess.get_inputs()[0].name
            outs.append(np.concatenate([sess.run(None, {name: f[None]})[0] for f in feats]))
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise StreamKWSError(f"the exported ONNX file does not run in onnxruntime "
                                 f"{ort.__version__} ({first[:200]})") from None
    return max(float(np.abs(_softmax(z) - ref).max()) for z in outs)


# -- the whole job ---------------------------------------------------------------------------


def export(bundle: Bundle, fmt: str, out: str | Path, check_data: str | Path | None = None,
           check_clips: int = DEFAULT_CHECK_CLIPS, tolerance: float | None = None,
           mobile: bool = True, opset: int | None = None) -> dict:
    """Export, check and put the file in place; returns a report (``passed`` False: the
    check failed and no file was written)."""
    if fmt not in FORMATS:
        raise StreamKWSError(f"unknown export format {fmt!r} (choose {', '.join(FORMATS)})")
    if check_clips < 1:
        raise StreamKWSError(f"--check-clips must be >= 1 (got {check_clips})")
    # An option of the other format would be ignored; the user meant something by it.
    if fmt == "onnx" and not mobile:
        raise StreamKWSError("--no-mobile applies to --format torchscript, not onnx")
    if fmt == "torchscript" and opset is not None:
        raise StreamKWSError("--opset applies to --format onnx, not torchscript")
    if tolerance is None:
        tolerance = FLOAT_TOLERANCE if bundle.quantization == "none" else QUANTIZED_TOLERANCE
    if not tolerance >= 0:
        raise StreamKWSError(f"--tolerance must be >= 0 (got {tolerance})")
    out = check_output(out, inputs=(bundle.path,))
    feats, checked_on = check_features(bundle, check_data, check_clips)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        if fmt == "torchscript":
            notes = export_torchscript(bundle, tmp, mobile)
        else:
            notes = export_onnx(bundle, tmp, opset)
        diff = max_prob_diff(bundle, fmt, tmp, feats, mobile)
        passed = diff is None or diff <= tolerance
        if passed:
            tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_name(tmp.name + ".data").unlink(missing_ok=True)  # ONNX external weights
    if diff is None:
        notes.append("not checked: onnxruntime is not installed")
    return {
        "model": bundle.name, "quantization": bundle.quantization, "format": fmt,
        "out": str(out), "bytes": out.stat().st_size if passed else None,
        "checked_on": checked_on, "max_abs_prob_diff": diff, "tolerance": tolerance,
        "passed": passed, "notes": notes,
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", metavar="M",
                   help="bundle path or name (default: default)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, type=Path, metavar="F", help="file to write")
    p.add_argument("--check-data", type=Path, metavar="DIR",
                   help="labelled clips to check the export on (default: random features, "
                        "with a warning)")
    p.add_argument("--check-clips", type=int, default=DEFAULT_CHECK_CLIPS, metavar="N",
                   help=f"clips to check on (default {DEFAULT_CHECK_CLIPS})")
    p.add_argument("--tolerance", type=float, metavar="T",
                   help=f"largest allowed probability difference (default {FLOAT_TOLERANCE:g} "
                        f"for float, {QUANTIZED_TOLERANCE:g} for quantized bundles)")
    p.add_argument("--no-mobile", dest="mobile", action="store_false",
                   help="torchscript: plain torch.jit.save, no mobile optimisation or lite "
                        "interpreter format")
    p.add_argument("--opset", type=int, help="onnx: opset version (default: the exporter's)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")


def run(args: argparse.Namespace) -> int:
    if args.check_data is not None and not Path(args.check_data).is_dir():
        raise no_folder(args.check_data)
    bundle = load_bundle(args.model)
    r = export(bundle, args.format, args.out, args.check_data, args.check_clips,
               args.tolerance, args.mobile, args.opset)
    if args.json:
        print(json.dumps(r))
    else:
        diff = "not checked" if r["max_abs_prob_diff"] is None else \
            f"max |Δp| {r['max_abs_prob_diff']:.2e} (tolerance {r['tolerance']:g})"
        if r["passed"]:
            print(f"wrote {r['out']} ({r['format']}, {r['bytes'] / 1024:.1f} KiB) from "
                  f"{r['model']} ({r['quantization']}); {diff} on {r['checked_on']}")
            for note in r["notes"]:
                print(f"  {note}")
    if not r["passed"]:
        # Static int8 in ONNX runs the runtime's own int8 kernels, which round otherwise
        # than torch's: a difference of a few hundredths there is not a broken export.
        hint = ("; static int8 in ONNX rounds as onnxruntime's kernels do, not as torch's: "
                "check it on your clips and pass a --tolerance you accept, or export to "
                "torchscript" if r["quantization"] in ("static", "mixed") and r["format"] == "onnx"
                else "")
        print(f"streamkws export: error: the {r['format']} export differs from the bundle: "
              f"max |Δp| {r['max_abs_prob_diff']:.2e} > tolerance {r['tolerance']:g} on "
              f"{r['checked_on']}; {r['out']} not written{hint}", file=sys.stderr)
        return 1
    return 0
