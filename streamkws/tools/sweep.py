"""Bit-width sweep in simulated dynamic fixed point, and quantization-aware fine-tuning.

This sizes hardware; it does not change what the daemon runs. The daemon always runs a
bundle's float weights (or its int8 ``quantization`` mode); a fixed-point *solution* says
how few bits each part of the network needs on a fixed-point target (an MCU, an FPGA, a
DSP) before accuracy suffers, and fine-tuning with it makes the float weights robust to
that rounding.

Number format: *dynamic fixed point* as in Ristretto and the ARM KWS optimisation labs. A
tensor is held in ``bits`` two's-complement bits, with the binary point placed per tensor
so its largest magnitude fits::

    fl = bits - 1 - ceil(log2(max|x|))                  (the fractional length)
    q(x) = clip(round(x * 2**fl), -2**(bits-1), 2**(bits-1) - 1) / 2**fl

``round`` is ``torch.round`` (to nearest, ties to even); out-of-range values saturate. A
maximum that is an exact power of two saturates by one step (``max|x| = 1`` at 8 bits
gives ``fl = 7`` and ``127/128``), as in Ristretto.

Three groups get their own bit width:

* ``conv``: convolution weights and biases. A convolution directly followed by
  BatchNorm in an ``nn.Sequential`` is folded with it first (running statistics), since a
  fixed-point target stores the folded kernel; a convolution the norm cannot be folded
  into (BC-ResNet's sub-spectral norm) is rounded alone and its norm stays float.
* ``fc``: ``nn.Linear`` weights and biases.
* ``act``: activations: the network input (normalised features), and the outputs of
  every convolution (after its folded norm), linear layer, activation function, pooling
  layer and quantizable add/concat (``FloatFunctional``).

Weights and biases are rounded at the group's width with a fractional length of their
own, recomputed from the tensor each forward (the weights fix it; fine-tuning moves it).
Activations get theirs from calibration: the largest magnitude over a few batches in
float, fixed afterwards, and stored in the solution.

Cost of a combination, to rank candidates: the bits of memory a fixed-point target needs,
``conv_bits * conv parameters + fc_bits * fc parameters + act_bits * the largest
activation tensor of one clip`` (the weights stored plus the biggest buffer the layers
work in). A group left in float counts 32 bits.

Search: every group is first swept alone (the others float). A combination is a candidate
only when each of its widths passed alone (a width that breaks accuracy by itself will not
do better combined, the pruning Ristretto uses); candidates are evaluated cheapest first
and the first within ``margin`` of float accuracy is the solution.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import logging
import math
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.ao.nn.quantized import FloatFunctional
from torch.nn.modules.batchnorm import _BatchNorm

from streamkws.bundle import Bundle
from streamkws.data import ClipCache, is_speech_commands_download, load_dataset
from streamkws.errors import StreamKWSError, no_folder
from streamkws.features import LogMel

log = logging.getLogger(__name__)

GROUPS = ("conv", "fc", "act")
DEFAULT_BITS = (16, 8, 4, 2)
SOLUTION_FORMAT = "streamkws-fixed-point"
FLOAT_BITS = 32
"""What a group left in float costs."""
MIN_BITS, MAX_BITS = 2, 32
# 2**fl must stay a finite float32 for any tensor; magnitudes beyond 2**±64 do not occur
# in a trained network, and an all-zero tensor gets bits - 1.
_FL_LIMIT = 64
_BATCH = 256
"""Clips per forward pass: the batch of ``evaluate.predict_clips``, so results match it."""
SIMULATION_NOTE = ("fixed point is simulated in float for hardware sizing; the daemon runs "
                   "the float weights")

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_ACT_TYPES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish,
              nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh)
_POOL_TYPES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
               nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.MaxPool1d, nn.MaxPool2d,
               nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)


# -- the number format ----------------------------------------------------------------------


def fractional_length(max_abs: float, bits: int) -> int:
    """Fractional bits for a tensor whose largest magnitude is ``max_abs``."""
    if not (max_abs > 0 and math.isfinite(max_abs)):
        return bits - 1
    fl = bits - 1 - math.ceil(math.log2(max_abs))
    return max(-_FL_LIMIT, min(_FL_LIMIT, fl))


def to_fixed_point(x: torch.Tensor, bits: int, fl: int) -> torch.Tensor:
    """``x`` rounded to ``bits``-bit fixed point with ``fl`` fractional bits (as float).

    Scaling by a power of two is exact in float, so the result is exactly an integer
    times ``2**-fl``.
    """
    scale = 2.0 ** fl
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(x * scale), lo, hi) / scale


def quantize_tensor(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, int]:
    """Dynamic fixed point: the fractional length from ``x``'s own range, and the result."""
    fl = fractional_length(float(x.detach().abs().max()) if x.numel() else 0.0, bits)
    return to_fixed_point(x, bits, fl), fl


def _rounded(x: torch.Tensor, bits: int, fl: int, ste: bool) -> torch.Tensor:
    """Forward in fixed point; backward straight through when ``ste``.

    ``q + (x - x.detach())`` rather than the textbook ``x + (q - x).detach()``: the same
    gradient (identity), but the value is exactly ``q`` (``x - x`` is exactly zero,
    whereas ``x + (q - x)`` can land one float ulp off the grid). Without ``ste`` the
    gradient of rounding is zero, which is why plain fixed-point training cannot learn.
    """
    if not ste:
        return to_fixed_point(x, bits, fl)
    q = to_fixed_point(x.detach(), bits, fl)
    return q + (x - x.detach()) if x.requires_grad else q


# -- the simulated model --------------------------------------------------------------------


@dataclass
class _Settings:
    """Shared by every wrapper and hook of one :class:`FixedPointModel`; None = float."""

    conv_bits: int | None = None
    fc_bits: int | None = None
    act_bits: int | None = None
    act_fl: dict[str, int] = field(default_factory=dict)
    ste: bool = True
    calibrating: bool = False
    act_max: dict[str, float] = field(default_factory=dict)
    act_size: dict[str, int] = field(default_factory=dict)


class _FixedPointConv(nn.Module):
    """A convolution (with the BatchNorm after it folded in) on fixed-point weights."""

    def __init__(self, conv: nn.Module, bn: _BatchNorm | None, name: str,
                 settings: _Settings) -> None:
        super().__init__()
        self.conv = conv
        self.bn = bn
        self.name = name
        self._settings = settings

    def folded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        w, b = self.conv.weight, self.conv.bias
        bn = self.bn
        if bn is None:
            return w, b
        # Frozen statistics, in training too: what the target stores is the folded kernel
        # of the finished model, and batch statistics would move it every step.
        inv = torch.rsqrt(bn.running_var + bn.eps)
        scale = bn.weight * inv if bn.weight is not None else inv
        shift = bn.bias if bn.bias is not None else torch.zeros_like(scale)
        w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
        b0 = b if b is not None else torch.zeros_like(scale)
        return w, (b0 - bn.running_mean) * scale + shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.folded()
        bits = self._settings.conv_bits
        if bits:
            w = _rounded(w, bits, _fl_of(w, bits), self._settings.ste)
            b = None if b is None else _rounded(b, bits, _fl_of(b, bits), self._settings.ste)
        return self.conv._conv_forward(x, w, b)

    def parameter_count(self) -> int:
        w, b = self.folded()
        return w.numel() + (b.numel() if b is not None else 0)


class _FixedPointLinear(nn.Module):
    def __init__(self, linear: nn.Linear, name: str, settings: _Settings) -> None:
        super().__init__()
        self.linear = linear
        self.name = name
        self._settings = settings

    def folded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.linear.weight, self.linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.folded()
        bits = self._settings.fc_bits
        if bits:
            w = _rounded(w, bits, _fl_of(w, bits), self._settings.ste)
            b = None if b is None else _rounded(b, bits, _fl_of(b, bits), self._settings.ste)
        return nn.functional.linear(x, w, b)

    def parameter_count(self) -> int:
        return self.linear.weight.numel() + (
            self.linear.bias.numel() if self.linear.bias is not None else 0)


def _fl_of(t: torch.Tensor, bits: int) -> int:
    return fractional_length(float(t.detach().abs().max()) if t.numel() else 0.0, bits)


def _shared_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every parameter and buffer with ``model``:
    swapping modules in it leaves ``model`` intact, while training it trains ``model``."""
    memo: dict[int, Any] = {id(t): t for t in itertools.chain(model.parameters(),
                                                               model.buffers())}
    return copy.deepcopy(model, memo)


def _foldable(bn: nn.Module | None, conv: nn.Module) -> bool:
    return (isinstance(bn, _BatchNorm) and bn.track_running_stats
            and bn.running_var is not None and bn.num_features == conv.out_channels)


class FixedPointModel(nn.Module):
    """``model`` running in simulated fixed point, sharing its parameters.

    Bit widths of ``None`` leave that group in float. Training this module trains the
    wrapped model's float weights through the straight-through estimator (``ste``).
    """

    def __init__(self, model: nn.Module, *, conv_bits: int | None = None,
                 fc_bits: int | None = None, act_bits: int | None = None,
                 act_fl: dict[str, int] | None = None, ste: bool = True) -> None:
        super().__init__()
        self.settings = _Settings(ste=ste)
        self.sim = _shared_copy(model)
        self.sim.train(model.training)
        self.weight_layers: dict[str, _FixedPointConv | _FixedPointLinear] = {}
        self._convert()
        self.activation_points: list[str] = []
        self._hook_activations()
        self.set_bits(conv_bits, fc_bits, act_bits, act_fl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sim(x)

    def set_bits(self, conv_bits: int | None, fc_bits: int | None, act_bits: int | None,
                 act_fl: dict[str, int] | None = None) -> None:
        for name, bits in (("conv", conv_bits), ("fc", fc_bits), ("act", act_bits)):
            _check_bits(name, bits)
        s = self.settings
        s.conv_bits, s.fc_bits, s.act_bits = conv_bits, fc_bits, act_bits
        s.act_fl = {k: int(v) for k, v in (act_fl or {}).items()}
        if act_bits:
            missing = [p for p in self.activation_points if p not in s.act_fl]
            extra = [p for p in s.act_fl if p not in self.activation_points]
            if missing or extra:
                raise StreamKWSError(
                    "the solution's activation fractional lengths do not match this model "
                    f"(missing: {', '.join(missing[:5]) or 'none'}; unknown: "
                    f"{', '.join(extra[:5]) or 'none'}): was it made for another "
                    "architecture?")

    # -- structure --

    def _convert(self) -> None:
        s = self.settings
        for parent_name, parent in list(self.sim.named_modules()):
            children = list(parent._modules.items())
            for i, (child_name, child) in enumerate(children):
                full = f"{parent_name}.{child_name}" if parent_name else child_name
                wrapped: _FixedPointConv | _FixedPointLinear
                if type(child) in _CONV_TYPES:
                    bn = None
                    # Only a BatchNorm that directly follows in a plain Sequential is
                    # certainly applied to this conv's output alone (the fusion rule).
                    if type(parent) is nn.Sequential and i + 1 < len(children):
                        nxt_name, nxt = children[i + 1]
                        if _foldable(nxt, child):
                            bn = nxt
                            parent._modules[nxt_name] = nn.Identity()
                    wrapped = _FixedPointConv(child, bn, full, s)
                elif type(child) is nn.Linear:
                    wrapped = _FixedPointLinear(child, full, s)
                else:
                    continue
                parent._modules[child_name] = wrapped
                self.weight_layers[full] = wrapped

    def _hook_activations(self) -> None:
        net = getattr(self.sim, "net", self.sim)  # KWSModel: after the normalisation
        net.register_forward_pre_hook(self._input_hook)
        self.activation_points.append("input")
        for name, m in self.sim.named_modules():
            if isinstance(m, (_FixedPointConv, _FixedPointLinear, *_ACT_TYPES, *_POOL_TYPES)):
                m.register_forward_hook(self._output_hook(name))
                self.activation_points.append(name)
            elif isinstance(m, FloatFunctional):
                # FloatFunctional passes every add/cat result through this child.
                m.activation_post_process.register_forward_hook(self._output_hook(name))
                self.activation_points.append(name)

    def _input_hook(self, module: nn.Module, args: tuple) -> tuple | None:
        return (self._activation("input", args[0]), *args[1:])

    def _output_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            return self._activation(name, output)

        return hook

    def _activation(self, name: str, x: torch.Tensor) -> torch.Tensor:
        s = self.settings
        if s.calibrating:
            m = float(x.detach().abs().max()) if x.numel() else 0.0
            s.act_max[name] = max(s.act_max.get(name, 0.0), m)
            s.act_size[name] = x[0].numel() if x.dim() else 1
            return x
        if not s.act_bits:
            return x
        return _rounded(x, s.act_bits, s.act_fl[name], s.ste)

    # -- calibration and bookkeeping --

    @torch.no_grad()
    def calibrate(self, batches: Iterable[torch.Tensor]) -> dict[str, float]:
        """Largest magnitude of every activation over ``batches``, run in float."""
        s = self.settings
        was_training = self.training
        saved = s.conv_bits, s.fc_bits
        # Ranges of the float network: the reference every bit width is then fitted to.
        s.calibrating, s.act_max, s.act_size = True, {}, {}
        s.conv_bits = s.fc_bits = None
        self.eval()
        try:
            for x in batches:
                self.sim(x)
        finally:
            s.calibrating = False
            s.conv_bits, s.fc_bits = saved
            self.train(was_training)
        if not s.act_max:
            raise StreamKWSError("calibration needs at least one batch of clips")
        return dict(s.act_max)

    def activation_fractional_lengths(self, bits: int) -> dict[str, int]:
        if not self.settings.act_max:
            raise StreamKWSError("activation ranges are unknown: calibrate first")
        return {k: fractional_length(v, bits) for k, v in self.settings.act_max.items()}

    @torch.no_grad()
    def weight_fractional_lengths(self, conv_bits: int | None,
                                  fc_bits: int | None) -> dict[str, int]:
        """Per stored tensor (after BatchNorm folding), named like the float model's."""
        out = {}
        for name, layer in self.weight_layers.items():
            bits = conv_bits if isinstance(layer, _FixedPointConv) else fc_bits
            if not bits:
                continue
            w, b = layer.folded()
            out[f"{name}.weight"] = _fl_of(w, bits)
            if b is not None:
                out[f"{name}.bias"] = _fl_of(b, bits)
        return out

    def parameter_counts(self) -> dict[str, int]:
        counts = {"conv": 0, "fc": 0}
        for layer in self.weight_layers.values():
            counts["conv" if isinstance(layer, _FixedPointConv) else "fc"] += \
                layer.parameter_count()
        return counts

    def peak_activation(self) -> int:
        """Elements of the largest activation tensor of one clip (known after calibrating)."""
        return max(self.settings.act_size.values(), default=0)

    def cost_bits(self, conv_bits: int | None, fc_bits: int | None,
                  act_bits: int | None) -> int:
        n = self.parameter_counts()
        return ((conv_bits or FLOAT_BITS) * n["conv"] + (fc_bits or FLOAT_BITS) * n["fc"]
                + (act_bits or FLOAT_BITS) * self.peak_activation())


def _check_bits(group: str, bits: object) -> None:
    if bits is None:
        return
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise StreamKWSError(
            f"{group} bits must be an integer from {MIN_BITS} to {MAX_BITS} or null (float); "
            f"got {bits!r}")


def attach_fixed_point(model: nn.Module, solution: dict, ste: bool = True) -> FixedPointModel:
    """``model`` in simulated fixed point as ``solution`` prescribes.

    The result shares the model's parameters (fine-tuning it trains ``model``) and leaves
    ``model`` itself untouched. Weight fractional lengths are recomputed from the weights;
    the activations' come from ``solution["fractional_lengths"]["activations"]``.
    """
    sol = validate_solution(solution)
    return FixedPointModel(model, conv_bits=sol["conv_bits"], fc_bits=sol["fc_bits"],
                           act_bits=sol["act_bits"],
                           act_fl=_activation_fls(sol), ste=ste)


def apply_solution(bundle: Bundle, solution: dict) -> FixedPointModel:
    """The bundle's model running in simulated fixed point, in eval mode."""
    _require_float(bundle)
    sol = validate_solution(solution)
    if sol.get("model_sha256") and bundle.sha256 and sol["model_sha256"] != bundle.sha256:
        # Legitimate after fine-tuning elsewhere, but activation ranges were calibrated on
        # another model, so say so.
        log.warning("the fixed-point solution was made for model %s (sha256 %s…), not this "
                    "one; its activation ranges may not fit", sol.get("model", "?"),
                    str(sol["model_sha256"])[:12])
    return attach_fixed_point(bundle.model, sol).eval()


def _require_float(bundle: Bundle) -> None:
    if bundle.quantization != "none":
        raise StreamKWSError(
            f"model '{bundle.name}' is {bundle.quantization}-quantized; the fixed-point "
            "simulation starts from float weights (use its float bundle, e.g. default-float)")


# -- solutions on disk ----------------------------------------------------------------------


def validate_solution(solution: object) -> dict:
    if not isinstance(solution, dict):
        raise StreamKWSError("a fixed-point solution must be a mapping")
    for group in GROUPS:
        if f"{group}_bits" not in solution:
            raise StreamKWSError(f"the fixed-point solution has no {group}_bits")
        _check_bits(group, solution[f"{group}_bits"])
    fls = solution.get("fractional_lengths") or {}
    if not isinstance(fls, dict):
        raise StreamKWSError("fractional_lengths must be a mapping")
    for kind in ("weights", "activations"):
        part = fls.get(kind) or {}
        if not isinstance(part, dict) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in part.values()):
            raise StreamKWSError(f"fractional_lengths.{kind} must map tensor names to integers")
    if solution["act_bits"] and not fls.get("activations"):
        raise StreamKWSError("the solution quantizes activations but has no activation "
                             "fractional lengths")
    return solution


def _activation_fls(solution: dict) -> dict[str, int]:
    return dict((solution.get("fractional_lengths") or {}).get("activations") or {})


def save_solution(solution: dict, path: str | Path) -> Path:
    yaml = _yaml()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(validate_solution(solution), sort_keys=False))
    return path


def load_solution(path: str | Path) -> dict:
    yaml = _yaml()
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise StreamKWSError(f"{path}: cannot read the fixed-point solution ({exc})") from None
    except yaml.YAMLError as exc:
        raise StreamKWSError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    try:
        return validate_solution(data)
    except StreamKWSError as exc:
        raise StreamKWSError(f"{path}: {exc}") from None


def _yaml():
    try:
        import yaml
    except ImportError:
        raise StreamKWSError("fixed-point solutions need PyYAML "
                             "(pip install 'streamkws[train]')") from None
    return yaml


# -- evaluation -----------------------------------------------------------------------------


def _load_clips(bundle: Bundle, data: str | Path,
                progress: bool = False) -> tuple[np.ndarray, Any]:
    """The clips ``evaluate`` would score (the testing split of a full download)."""
    download = is_speech_commands_download(Path(data))
    ds = load_dataset(data, bundle.labels, split="testing" if download else None)
    x, ds = ClipCache().load_all(ds, progress)
    if len(ds) == 0:
        raise StreamKWSError(f"{data}: no readable clips")
    return x, ds


def _features(bundle: Bundle, x: np.ndarray) -> np.ndarray:
    # Batched exactly like evaluate.predict_clips, so the numbers agree with it.
    logmel = LogMel(bundle.frontend)
    n = bundle.frontend.window_frames
    return np.concatenate([logmel(x[i : i + _BATCH])[:, :n] for i in range(0, len(x), _BATCH)])


def _predict(model: nn.Module, feats: np.ndarray) -> np.ndarray:
    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(feats), _BATCH):
            x = torch.from_numpy(np.ascontiguousarray(feats[i : i + _BATCH], np.float32))
            out.append(torch.softmax(model(x), dim=-1).numpy())
    return np.concatenate(out)


def evaluate_with_solution(bundle: Bundle, data: str | Path, solution: dict | None = None,
                           progress: bool = False) -> dict:
    """``evaluate``'s report for the bundle run in simulated fixed point.

    Without ``solution``, the one a fine-tuned bundle carries in ``meta["fixed_point"]``.
    """
    from streamkws.tools.evaluate import metrics_from_predictions

    solution = solution if solution is not None else bundle.meta.get("fixed_point")
    if solution is None:
        raise StreamKWSError(f"model '{bundle.name}' carries no fixed-point solution: pass "
                             "one (streamkws quantize --sweep --out-solution S.yaml)")
    model = apply_solution(bundle, solution)
    x, ds = _load_clips(bundle, data, progress)
    probs = _predict(model, _features(bundle, x))
    m = metrics_from_predictions(ds.targets(), probs.argmax(1), bundle.labels)
    m.update({"model": bundle.name, "model_sha256": bundle.sha256,
              "quantization": "fixed-point",
              "fixed_point": {f"{g}_bits": solution[f"{g}_bits"] for g in GROUPS} | {
                  "note": SIMULATION_NOTE},
              "data": str(data), "skipped": ds.skipped})
    return m


# -- the sweep ------------------------------------------------------------------------------


def sweep(bundle: Bundle, data: str | Path, bits: Sequence[int] = DEFAULT_BITS,
          margin: float = 0.01, calib_clips: int = 256, seed: int = 0,
          progress: bool = False) -> dict:
    """Accuracy per group and bit width, and the cheapest combination within ``margin``.

    Returns ``{"table": {group: {bits: accuracy}}, "tried": [...], "solution": dict or
    None, "float_accuracy", ...}``; accuracies are rounded to 4 places like ``evaluate``.
    """
    _require_float(bundle)
    bits = sorted({int(b) for b in bits}, reverse=True)
    for b in bits:
        _check_bits("sweep", b)
    if not 0 <= margin < 1:
        raise StreamKWSError(f"--margin must be within 0..1 (got {margin})")
    t0 = time.monotonic()
    x, ds = _load_clips(bundle, data, progress)
    y = ds.targets()
    feats = _features(bundle, x)
    float_hits = int((_predict(bundle.model, feats).argmax(1) == y).sum())
    n = len(y)
    floor = float_hits / n - margin

    sim = FixedPointModel(bundle.model)
    # Calibrate on a seeded subset: "a few batches", not the whole evaluation set.
    idx = np.sort(np.random.default_rng(seed).permutation(n)[:max(1, calib_clips)])
    sim.calibrate(torch.from_numpy(feats[idx[i : i + _BATCH]])
                  for i in range(0, len(idx), _BATCH))

    def accuracy(combo: tuple[int | None, int | None, int | None]) -> tuple[int, float]:
        act_fl = sim.activation_fractional_lengths(combo[2]) if combo[2] else None
        sim.set_bits(*combo, act_fl=act_fl)
        hits = int((_predict(sim, feats).argmax(1) == y).sum())
        return hits, round(hits / n, 4)

    table: dict[str, dict[int, float]] = {g: {} for g in GROUPS}
    passed: dict[str, list[int]] = {g: [] for g in GROUPS}
    for gi, group in enumerate(GROUPS):
        for b in bits:
            combo = tuple(b if j == gi else None for j in range(3))
            hits, acc = accuracy(combo)  # type: ignore[arg-type]
            table[group][b] = acc
            if hits / n >= floor - 1e-12:
                passed[group].append(b)
            log.info("%s at %d bits: accuracy %.4f", group, b, acc)

    candidates = sorted(itertools.product(*(passed[g] for g in GROUPS)),
                        key=lambda c: (sim.cost_bits(*c), sum(c), c))
    tried, chosen = [], None
    for combo in candidates:
        hits, acc = accuracy(combo)
        ok = hits / n >= floor - 1e-12
        tried.append({"conv_bits": combo[0], "fc_bits": combo[1], "act_bits": combo[2],
                      "cost_bits": sim.cost_bits(*combo), "accuracy": acc, "within": ok})
        log.info("conv %d / fc %d / act %d bits: accuracy %.4f", *combo, acc)
        if ok:
            chosen = combo
            break

    solution = None
    if chosen is not None:
        conv_bits, fc_bits, act_bits = chosen
        solution = {
            "format": SOLUTION_FORMAT,
            "model": bundle.name,
            "model_sha256": bundle.sha256,
            "conv_bits": conv_bits,
            "fc_bits": fc_bits,
            "act_bits": act_bits,
            "fractional_lengths": {
                "weights": sim.weight_fractional_lengths(conv_bits, fc_bits),
                "activations": sim.activation_fractional_lengths(act_bits),
            },
            "accuracy": tried[-1]["accuracy"],
            "float_accuracy": round(float_hits / n, 4),
            "margin": margin,
            "data": str(data),
            "clips": n,
            "calibration_clips": len(idx),
            "cost_bits": sim.cost_bits(*chosen),
            "rounding": "nearest (ties to even), saturating",
            "note": SIMULATION_NOTE,
        }
    counts = sim.parameter_counts()
    return {
        "model": bundle.name, "model_sha256": bundle.sha256, "data": str(data), "n": n,
        "float_accuracy": round(float_hits / n, 4), "margin": margin, "bits": bits,
        "table": table, "tried": tried, "solution": solution,
        "sizes": {"conv_parameters": counts["conv"], "fc_parameters": counts["fc"],
                  "peak_activation": sim.peak_activation(),
                  "activation_points": len(sim.activation_points),
                  "float_cost_bits": sim.cost_bits(None, None, None)},
        "seconds": round(time.monotonic() - t0, 1),
    }


def format_sweep(r: dict) -> str:
    bits = r["bits"]
    s = r["sizes"]
    lines = [
        f"fixed-point sweep of {r['model']} on {r['data']}: {r['n']} clips",
        f"float accuracy {r['float_accuracy']:.4f}; allowed drop {r['margin']:.4f}",
        f"conv parameters {s['conv_parameters']}, fc parameters {s['fc_parameters']}, "
        f"largest activation {s['peak_activation']} values "
        f"({s['activation_points']} activation tensors)",
        "",
        "accuracy with one group in fixed point, the others float:",
        f"{'group':<6}" + "".join(f"{f'{b} bits':>9}" for b in bits),
    ]
    for group in GROUPS:
        lines.append(f"{group:<6}" + "".join(f"{r['table'][group][b]:>9.4f}" for b in bits))
    lines += ["", "combinations tried, cheapest first (conv/fc/act bits):"]
    for t in r["tried"]:
        lines.append(f"  {t['conv_bits']:>2}/{t['fc_bits']:>2}/{t['act_bits']:>2}  "
                     f"{t['cost_bits'] / 8 / 1024:8.1f} KiB  accuracy {t['accuracy']:.4f}"
                     f"{'  within margin' if t['within'] else ''}")
    sol = r["solution"]
    if sol is None:
        lines.append("no combination is within the margin of float accuracy")
    else:
        lines += ["", f"solution: conv {sol['conv_bits']} bits, fc {sol['fc_bits']} bits, "
                      f"activations {sol['act_bits']} bits: accuracy {sol['accuracy']:.4f} "
                      f"(float {sol['float_accuracy']:.4f}); "
                      f"{sol['cost_bits'] / 8 / 1024:.1f} KiB vs "
                      f"{s['float_cost_bits'] / 8 / 1024:.1f} KiB in float"]
    return "\n".join(lines)


def _bits_list(text: str) -> list[int]:
    try:
        bits = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected bit widths like 16,8,4,2 (got {text!r})"
                                         ) from None
    if not bits or any(not MIN_BITS <= b <= MAX_BITS for b in bits):
        raise argparse.ArgumentTypeError(
            f"bit widths must be {MIN_BITS}..{MAX_BITS} (got {text!r})")
    return bits


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``streamkws quantize --sweep``.

    Options the parser already has (``--model``, ``--data``, ``--json`` of ``quantize``
    itself) are left as they are; ``--data`` is checked by :func:`run_sweep` rather than
    made required, so the other modes of ``quantize`` do not need it.
    """
    have = set(parser._option_string_actions)  # argparse has no public query for this

    def add(flag: str, **kw: Any) -> None:
        if flag not in have:
            parser.add_argument(flag, **kw)

    add("--model", default="default-float", metavar="M",
        help="float bundle path or name (default: default-float)")
    add("--data", metavar="DIR", help="labelled clips to measure accuracy on (sweep: required)")
    add("--bits", type=_bits_list, default=list(DEFAULT_BITS), metavar="B,B,...",
        help="bit widths to try per group (default: 16,8,4,2)")
    add("--margin", type=float, default=0.01, metavar="F",
        help="allowed accuracy drop from float (default: 0.01)")
    add("--calib-clips", type=int, default=256, metavar="N",
        help="clips to calibrate activation ranges on (default: 256)")
    add("--out-solution", metavar="S.yaml", help="write the chosen solution here")
    add("--json", action="store_true", help="one JSON object on stdout")


def run_sweep(args: argparse.Namespace) -> int:
    """``streamkws quantize --sweep``: 0 with a solution, 1 when none is within margin."""
    from streamkws.bundle import load_bundle

    if not getattr(args, "data", None):
        raise StreamKWSError("--sweep needs --data DIR: the clips to measure accuracy on")
    bits = getattr(args, "bits", None) or list(DEFAULT_BITS)
    if isinstance(bits, str):
        bits = _bits_list(bits)
    bundle = load_bundle(getattr(args, "model", None) or "default-float")
    if getattr(args, "out_solution", None):  # before the sweep's minutes, not after
        from streamkws.tools.outputs import check_output

        check_output(args.out_solution, "--out-solution", inputs=(bundle.path,))
    as_json = bool(getattr(args, "json", False))
    r = sweep(bundle, args.data, bits, getattr(args, "margin", 0.01),
              getattr(args, "calib_clips", 256), progress=not as_json)
    out = getattr(args, "out_solution", None)
    if out and r["solution"] is not None:
        save_solution(r["solution"], out)
    if as_json:
        print(json.dumps(r))
    else:
        print(format_sweep(r))
        if out and r["solution"] is not None:
            print(f"solution written to {out}")
    if r["solution"] is None:
        # Exit 1 is the answer "no", not a failure; but a script's log should say which.
        print(f"streamkws quantize: no combination of --bits is within --margin "
              f"{r['margin']:g} of float accuracy"
              + (f"; nothing written to {out}" if out else "")
              + " (a larger --margin, or wider --bits)", file=sys.stderr)
        return 1
    return 0


# -- quantization-aware fine-tuning ---------------------------------------------------------


def qat_finetune(bundle: Bundle, solution: dict, data_dirs: Sequence[str | Path],
                 epochs: int = 3, *, out: str | Path | None = None, lr: float = 3e-4,
                 config: Any = None, calib_clips: int = 256) -> Bundle:
    """Fine-tune ``bundle`` with its forward pass in the solution's fixed point.

    Weights stay float and are re-rounded each forward; gradients pass the rounding
    straight through. BatchNorm statistics are frozen (folded, as the target stores them).
    Data preparation, speaker split and augmentation are the trainer's (``config``, a
    ``TrainConfig``, supplies batch size, seed, noise, augmentation; its labels and front
    end are the bundle's). The weights kept are the epoch with the best fixed-point
    validation accuracy, the starting weights included, so fine-tuning never makes it
    worse on validation. ``lr`` defaults low: this starts from a trained model.

    The returned bundle (saved to ``out`` when given) carries the solution in
    ``meta["fixed_point"]``, its activation ranges unchanged and its weight fractional
    lengths and accuracies updated; its float weights are what the daemon runs.
    """
    from streamkws.data import UNKNOWN
    from streamkws.tools.evaluate import metrics_from_predictions, metrics_summary
    from streamkws.tools.train import (
        BatchMaker,
        TrainConfig,
        accuracy,
        balanced_epoch,
        evaluate_arrays,
        prepare_data,
        seed_everything,
        train_epoch,
    )

    _require_float(bundle)
    sol = copy.deepcopy(validate_solution(solution))
    if epochs < 0:
        raise StreamKWSError(f"epochs must be >= 0 (got {epochs})")
    dirs = [Path(d) for d in data_dirs]
    for d in dirs:
        if not d.is_dir():
            raise no_folder(d)
    base = config if config is not None else TrainConfig(data=dirs, out=Path(out or "qat.skw"),
                                                         progress=False)
    cfg = dataclasses.replace(base, data=dirs, epochs=epochs, lr=lr,
                              out=Path(out) if out else base.out,
                              labels=tuple(bundle.labels), frontend=bundle.frontend)
    t0 = time.monotonic()
    seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    logmel = LogMel(cfg.frontend)
    n_frames = cfg.frontend.window_frames
    train_s, val_s, noise, summary = prepare_data(cfg)
    val_feats = logmel(val_s.x)[:, :n_frames]

    model = copy.deepcopy(bundle.model)  # the caller's bundle stays as it was
    mean = model.mean.detach().numpy().astype(np.float32)
    sim = FixedPointModel(model, ste=True)
    act_fl = _activation_fls(sol)
    if sol["act_bits"] and (sol.get("model_sha256") != bundle.sha256
                            or set(act_fl) != set(sim.activation_points)):
        # The ranges were measured on another model: measure this one's, in float, on
        # training clips (never validation ones).
        take = rng.permutation(len(train_s.x))[:max(1, calib_clips)]
        feats = logmel(train_s.x[np.sort(take)])[:, :n_frames]
        sim.calibrate(torch.from_numpy(feats[i : i + _BATCH])
                      for i in range(0, len(feats), _BATCH))
        act_fl = sim.activation_fractional_lengths(sol["act_bits"])
        log.info("calibrated activation ranges on %d training clips", len(take))
    sim.set_bits(sol["conv_bits"], sol["fc_bits"], sol["act_bits"], act_fl)

    labels = list(cfg.labels)
    make_batch = BatchMaker(train_s.x, train_s.y, labels, noise, cfg.augment, logmel, mean)
    unknown_index = labels.index(UNKNOWN) if UNKNOWN in labels else -1
    steps = int(np.ceil(len(train_s.y) / cfg.batch_size))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    def val_accuracy() -> float:
        return accuracy(sim, val_feats, val_s.y)

    acc0 = val_accuracy()
    best = {"accuracy": acc0, "epoch": 0, "state": copy.deepcopy(model.state_dict())}
    history = [{"epoch": 0, "loss": None, "val_accuracy_fixed_point": acc0}]
    for epoch in range(epochs):
        order = balanced_epoch(train_s.y, rng, unknown_index, cfg.unknown_share)
        loss = train_epoch(sim, order, cfg.batch_size, steps, make_batch, rng, loss_fn, opt,
                           sched)
        acc = val_accuracy()
        history.append({"epoch": epoch + 1, "loss": loss, "val_accuracy_fixed_point": acc})
        log.info("QAT epoch %d: loss %.4f, fixed-point validation accuracy %.4f",
                 epoch + 1, loss, acc)
        if acc > best["accuracy"]:
            best = {"accuracy": acc, "epoch": epoch + 1,
                    "state": copy.deepcopy(model.state_dict())}
    model.load_state_dict(best["state"])
    model.eval()
    sim.eval()

    fixed = metrics_from_predictions(val_s.y, evaluate_arrays(sim, val_feats).argmax(1),
                                     labels)
    floatm = metrics_from_predictions(val_s.y, evaluate_arrays(model, val_feats).argmax(1),
                                      labels)
    for stale in ("margin", "cost_bits", "calibration_clips"):
        sol.pop(stale, None)  # the sweep's, and the solution may have been edited since
    sol.update({
        "model": cfg.name if config is not None else bundle.name,
        # The solution now lives inside the bundle it describes, which cannot hold its
        # own hash; the starting model's is under fine_tuning.
        "model_sha256": None,
        "fractional_lengths": {
            "weights": sim.weight_fractional_lengths(sol["conv_bits"], sol["fc_bits"]),
            "activations": dict(act_fl),
        },
        "accuracy": fixed["accuracy"],
        "float_accuracy": floatm["accuracy"],
        "data": "fine-tuning validation split (speaker-disjoint)",
        "clips": fixed["n"],
        "note": SIMULATION_NOTE,
    })
    meta = copy.deepcopy(bundle.meta)
    for key in ("created", "streamkws_version", "size_bytes_weights"):
        meta.pop(key, None)
    if config is not None:
        meta["name"] = cfg.name
    meta["fixed_point"] = sol
    meta["fine_tuning"] = {
        "kind": "quantization-aware (fixed point forward, straight-through backward)",
        "init": str(bundle.path) if bundle.path else None,
        "init_sha256": bundle.sha256,
        "epochs_run": epochs,
        "best_epoch": best["epoch"],
        "lr": cfg.lr,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "validation": summary["validation"],
        "split": summary["split"],
        "minutes": round((time.monotonic() - t0) / 60, 2),
        "history": history,
    }
    meta.setdefault("metrics", {})
    meta["metrics"]["validation"] = metrics_summary(floatm)
    meta["metrics"]["validation_fixed_point"] = metrics_summary(fixed)
    result = Bundle(model, meta)
    if out is not None or config is not None:
        result.save(cfg.out)
    return result


def _short(m: dict) -> dict:
    return {"accuracy": m["accuracy"], "n": m["n"],
            "recall": {k: v["recall"] for k, v in m["per_class"].items()}}
