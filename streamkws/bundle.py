"""The model bundle: one file holding a network, its labels, the exact front-end settings
it was trained with, and its metadata.

On disk it is a ``torch.save`` archive of plain data only — a JSON metadata string and a
state dict of tensors — read back with ``torch.load(weights_only=True)``, whose restricted
unpickler refuses arbitrary objects. The network is rebuilt from the architecture registry
(``meta["arch"]``, ``meta["arch_kwargs"]``), the recorded quantization is re-applied to
give the same module structure, and then the stored weights are loaded strictly.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import re
import time
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from streamkws import __version__
from streamkws.config import BUNDLED_MODELS
from streamkws.errors import StreamKWSError
from streamkws.features import FrontEndConfig
from streamkws.models.registry import KWSModel

log = logging.getLogger(__name__)

FORMAT = "streamkws-bundle"
VERSION = 1
BUNDLED_DIR = Path(__file__).resolve().parent / "models" / "bundled"


# Quantization modes register how to rebuild their module structure from metadata, so a
# bundle of any mode loads through one path. The optimisation tools add modes here.
Rebuilder = Callable[[KWSModel, dict], nn.Module]
QUANT_REBUILDERS: dict[str, Rebuilder] = {}


def register_quantization(mode: str) -> Callable[[Rebuilder], Rebuilder]:
    def deco(fn: Rebuilder) -> Rebuilder:
        QUANT_REBUILDERS[mode] = fn
        return fn

    return deco


@register_quantization("none")
def _float(model: KWSModel, q: dict) -> nn.Module:
    return model


@register_quantization("dynamic")
def _dynamic(model: KWSModel, q: dict) -> nn.Module:
    from streamkws.models.quant import quantize_dynamic

    return quantize_dynamic(model)


def split_identity(split_seed: int | None, sources: list, validation_clips: int | None) -> dict:
    """See :attr:`Bundle.speaker_split`; also built by ``train`` before its bundle exists."""
    return {"split_seed": split_seed, "data": sorted(Path(s).name for s in sources),
            "validation_clips": validation_clips}


@dataclass
class Bundle:
    model: nn.Module
    meta: dict
    path: Path | None = None
    sha256: str = ""
    _frontend: FrontEndConfig | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.meta.get("name", "model")

    @property
    def labels(self) -> list[str]:
        return list(self.meta["labels"])

    @property
    def quantization(self) -> str:
        return self.meta.get("quantization", {}).get("mode", "none")

    @property
    def split_seed(self) -> int | None:
        """The seed of the speaker split it was validated on (None: not trained here).

        Bundles from before ``train --split-seed`` split by their ``seed``.
        """
        t = self.meta.get("training", {})
        return t.get("split_seed", t.get("seed"))

    @property
    def validation_fraction(self) -> float | None:
        """The share of speakers held out for its validation (None: not trained here).
        Bundles from before it was stored as a number have it only as a whole percent."""
        exact = self.meta.get("training", {}).get("val_fraction")
        if isinstance(exact, int | float):
            return float(exact)
        split = self.meta.get("training", {}).get("split", "")
        m = re.search(r"(\d+(?:\.\d+)?)% of speakers held out", split)
        return float(m.group(1)) / 100 if m else None

    @property
    def speaker_split(self) -> dict:
        """What two bundles must share for one's validation speakers to be unheard by the
        other: the split seed, the labelled data, and so the validation clips. Ensembles
        and distillation teachers are checked against it."""
        t = self.meta.get("training", {})
        return split_identity(self.split_seed, t.get("sources", []),
                              t.get("validation", {}).get("clips"))

    def mismatch(self, labels: list[str], frontend: FrontEndConfig,
                 speaker_split: dict | None = None, other: str = "the other model's") -> str | None:
        """Why this bundle's posteriors cannot be set beside another model's, or None.

        The one rule for ensemble members and distillation teachers: the same classes in
        the same order, the same features, and (when given) the same held-out speakers, so
        that no model has trained on the speakers the other is validated on."""
        if self.labels != list(labels):
            return f"labels {self.labels} differ from {other} {list(labels)}"
        if self.frontend != frontend:
            return f"front-end settings differ from {other}; both must hear the same features"
        if speaker_split is not None and self.speaker_split != speaker_split:
            return (f"trained on another speaker split or data ({self.speaker_split}) than "
                    f"{other} ({speaker_split}); one would have trained on the other's "
                    "validation speakers (train both with the same --split-seed and --data)")
        return None

    def inherited_detect(self) -> dict | None:
        """This bundle's calibrated threshold as a model derived from it (quantized,
        pruned) should carry it: still the best guess, marked as not calibrated for the
        derived network, whose posteriors differ."""
        thr = self.threshold
        if thr is None:
            return None
        how = self.meta["detect"].get("calibration", "calibrated")
        if how.startswith("inherited from"):
            return dict(self.meta["detect"])
        source = self.name + (f" ({self.sha256[:12]})" if self.sha256 else "")
        return {"threshold": thr,
                "calibration": f"inherited from {source}, not recalibrated: {how}"}

    def carry_detect(self, meta: dict) -> None:
        """Put ``inherited_detect`` into the ``meta`` of a model derived from this one, and
        tell the operator it is a guess for the new network, not a calibration."""
        if (detect := self.inherited_detect()) is None:
            return
        meta["detect"] = detect
        log.info("the calibrated threshold %.2f of %s carries over; its posteriors differ, "
                 "so recalibrate with stream-eval before relying on it", detect["threshold"],
                 self.name)

    @property
    def threshold(self) -> float | None:
        """The detection threshold calibrated for this model, if its maker stored one.

        The daemon uses it wherever its config leaves ``detect.threshold`` unset."""
        value = self.meta.get("detect", {}).get("threshold")
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
            where = self.path or self.name
            raise StreamKWSError(f"{where}: calibrated threshold must be within (0, 1] "
                                 f"(got {value!r})")
        return float(value)

    @property
    def frontend(self) -> FrontEndConfig:
        if self._frontend is None:
            self._frontend = FrontEndConfig.from_dict(self.meta["frontend"])
        return self._frontend

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Class probabilities for log-Mel windows ``(B, T, F)`` or one window ``(T, F)``."""
        x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
        single = x.ndim == 2
        if single:
            x = x[None]
        with torch.inference_mode():
            p = torch.softmax(self.model(x), dim=-1).numpy()
        return p[0] if single else p

    def check_frontend(self, stream: FrontEndConfig) -> None:
        """Refuse to run on a stream whose front end differs from the one we trained on."""
        mine, theirs = self.frontend.to_dict(), stream.to_dict()
        diff = [f"{k}: model {mine[k]!r}, stream {theirs[k]!r}" for k in mine
                if mine[k] != theirs[k]]
        if diff:
            raise StreamKWSError(
                f"model '{self.name}' was trained with other front-end settings than the "
                f"stream provides ({'; '.join(diff)}); set [frontend] to match or use "
                "another model"
            )

    def save(self, path: str | Path) -> str:
        """Write the bundle; return its SHA-256."""
        path = Path(path)
        meta = dict(self.meta)
        meta.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        meta["streamkws_version"] = __version__
        meta["size_bytes_weights"] = weight_bytes(self.model)
        buf = io.BytesIO()
        torch.save({"format": FORMAT, "version": VERSION, "meta": json.dumps(meta),
                    "state_dict": self.model.state_dict()}, buf)
        data = buf.getvalue()
        tmp = path.with_name(path.name + ".tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            tmp.replace(path)  # never leave a half-written bundle under the real name
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StreamKWSError(f"cannot write the bundle {path}: "
                                 f"{exc.strerror or exc}") from None
        self.meta, self.path = meta, path
        self.sha256 = hashlib.sha256(data).hexdigest()
        return self.sha256


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the stored weights (quantized tensors count at their integer width)."""
    total = 0
    for v in model.state_dict().values():
        tensors = tensors_in(v)
        for t in tensors:
            total += t.numel() * t.element_size()
    return total


def tensors_in(v: object) -> list[torch.Tensor]:
    """The tensors in a value, looking inside tuples and lists (a module's state or I/O)."""
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, tuple | list):
        return [t for x in v for t in tensors_in(x)]
    return []


def new_bundle(
    net: nn.Module,
    mean: np.ndarray,
    std: np.ndarray,
    labels: list[str],
    frontend: FrontEndConfig,
    name: str,
    **meta: object,
) -> Bundle:
    from streamkws.models import count_parameters

    model = KWSModel(net, torch.as_tensor(mean), torch.as_tensor(1.0 / np.maximum(std, 1e-5)))
    info = {
        "name": name,
        "arch": net.arch_name,
        "arch_kwargs": net.arch_kwargs,
        "labels": list(labels),
        "frontend": frontend.to_dict(),
        "quantization": {"mode": "none"},
        "parameters": count_parameters(net),
        **meta,
    }
    return Bundle(model.eval(), info)


def resolve_model(spec: str | Path) -> Path:
    """A bundle path, or the name of a model shipped in the package."""
    s = str(spec)
    if s in BUNDLED_MODELS:
        path = BUNDLED_DIR / BUNDLED_MODELS[s]
        if not path.is_file():
            raise StreamKWSError(f"the bundled model '{s}' is missing from the package ({path})")
        return path
    path = Path(s)
    if path.is_dir():
        raise StreamKWSError(f"{path}: is a folder; give a model bundle file (.skw)")
    if not path.is_file():
        names = ", ".join(BUNDLED_MODELS)
        raise StreamKWSError(f"{path}: no such model bundle (bundled models: {names})")
    return path


def _what_it_is(data: bytes) -> str:
    """What a file that did not load as a bundle looks like, as a noun phrase."""
    if not data:
        return "an empty file"
    if data.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(io.BytesIO(data)):
                pass
        except zipfile.BadZipFile:
            return "a damaged or truncated zip file (a bundle cut short?)"
        return "a torch or zip file without a bundle's contents"
    if data.startswith(b"RIFF"):
        return "a WAV file"
    if data[:1] == b"\x80":  # pickle protocol 2+: torch's old format, or any pickle
        return "a Python pickle, not a bundle"
    try:
        head = data[:512].decode("utf-8")
    except UnicodeDecodeError as exc:
        # Cut mid-character at the 512th byte is still text; anything else is not.
        head = "" if exc.start < 509 else data[:exc.start].decode("utf-8")
    if head and all(c.isprintable() or c in "\t\r\n" for c in head):
        return "a text file"
    return "unknown binary data"


def load_bundle(spec: str | Path) -> Bundle:
    path = resolve_model(spec)
    data = path.read_bytes()
    try:
        with _quiet_loading():
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:  # torch raises many types for foreign or unsafe files
        # Not torch's own text: it is about pickles ("pop from empty list", "101") or, for
        # a torch file holding code, advises turning weights_only off, which a file that
        # is not ours must never get.
        raise StreamKWSError(f"{path}: not a streamkws model bundle "
                             f"({_what_it_is(data)})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise StreamKWSError(f"{path}: not a streamkws model bundle")
    if obj.get("version", 0) > VERSION:
        raise StreamKWSError(
            f"{path}: bundle format version {obj['version']} is newer than this streamkws "
            f"understands ({VERSION}); upgrade streamkws"
        )
    try:
        meta = json.loads(obj["meta"])
        missing = [k for k in ("arch", "arch_kwargs", "frontend", "labels") if k not in meta]
    except (KeyError, TypeError, ValueError):
        meta, missing = {}, ["meta"]
    if missing or "state_dict" not in obj:
        # A damaged or hand-edited file: say so, not which dictionary lookup failed.
        raise StreamKWSError(f"{path}: damaged model bundle (no "
                             f"{', '.join(missing or ['weights'])} recorded)")
    try:
        with _quiet_loading():
            model = rebuild(meta)
            model.load_state_dict(obj["state_dict"], strict=True)
    except RuntimeError as exc:
        raise StreamKWSError(f"{path}: weights do not match the recorded architecture "
                             f"({str(exc).splitlines()[0]})") from None
    model.eval()
    return Bundle(model, meta, path, hashlib.sha256(data).hexdigest())


@contextlib.contextmanager
def _quiet_loading():
    """Quantized weights make torch warn that quantized tensors and TypedStorage are
    deprecated; a user loading a model can do nothing about either."""
    from streamkws.models.quant import quiet_ao_deprecation

    with quiet_ao_deprecation(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated",
                                category=UserWarning)
        # About a foreign pickle (protocol 4): it is refused anyway, and said once.
        warnings.filterwarnings("ignore", message="Detected pickle protocol",
                                category=UserWarning)
        yield


def rebuild(meta: dict) -> nn.Module:
    """The module structure a bundle's weights belong to, from its metadata alone."""
    from streamkws.models import build_model

    kwargs = dict(meta["arch_kwargs"])
    net = build_model(meta["arch"], **kwargs)
    n_mels = FrontEndConfig.from_dict(meta["frontend"]).n_mels
    model = KWSModel(net, torch.zeros(n_mels), torch.ones(n_mels)).eval()
    q = meta.get("quantization", {"mode": "none"})
    mode = q.get("mode", "none")
    if mode not in QUANT_REBUILDERS:
        _load_optional_quant_modes()
    if mode not in QUANT_REBUILDERS:
        raise StreamKWSError(f"unknown quantization mode {mode!r} in bundle")
    return QUANT_REBUILDERS[mode](model, q)


def _load_optional_quant_modes() -> None:
    """Modes beyond none/dynamic live with the optimisation tools; import registers them."""
    with contextlib.suppress(ImportError):
        import streamkws.tools.quantize  # noqa: F401
