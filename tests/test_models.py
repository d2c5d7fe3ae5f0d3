"""Specification of the model registry and the architectures in it.

Every registered architecture maps (B, T, F) log-Mel features to (B, n_classes) logits,
can be rebuilt from its recorded JSON kwargs, and survives dynamic and eager-mode static
int8 quantization. These tests call ``torch.ao.quantization`` directly on purpose: a torch
release that removes it must fail here, not in the daemon.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.ao.quantization as tq
from torch import nn

from streamkws.errors import StreamKWSError
from streamkws.models import ARCHITECTURES, build_model, count_parameters
from streamkws.models.bcresnet import SubSpectralNorm
from streamkws.models.quant import ao_deprecation_pattern, quantize_dynamic, quiet_ao_deprecation
from streamkws.models.registry import FloatIsland, KWSNet

torch.set_num_threads(1)

ARCHS = sorted(ARCHITECTURES)
N_CLASSES = 12
# get_default_qconfig("x86") builds observers with reduce_range, which torch warns about;
# that notice is about the qconfig, not the model, and is not part of the ao deprecation.
QCONFIG_NOISE = "ignore:Please use quant_min and quant_max:UserWarning"


def features(batch: int, frames: int = 98, mels: int = 40, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, mels, generator=g)


def required_options(arch: str, frames: int = 98, mels: int = 40) -> dict:
    """What an architecture cannot be built without: an ensemble needs its members (two
    different small families, so the tests see both kinds of layers averaged)."""
    if arch != "ensemble":
        return {}
    sizes = {"n_classes": N_CLASSES, "n_frames": frames, "n_mels": mels}
    return {"members": [
        {"arch": "dscnn", "arch_kwargs": {**sizes, "channels": 16, "blocks": 1}},
        {"arch": "mobilenetv2", "arch_kwargs": {**sizes, "width": 0.5}},
    ]}


def built(arch: str, frames: int = 98, mels: int = 40, seed: int = 0, **kw: object) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(arch, n_classes=N_CLASSES, n_frames=frames, n_mels=mels,
                        **{**required_options(arch, frames, mels), **kw})
    if arch == "speech_embedding":
        # Its bridge to the embedding's bands is fitted to a front end before it can work
        # (train does it); left at zero, every input would look the same.
        from streamkws.features import FrontEndConfig, LogMel

        model.fit_bridge(LogMel(FrontEndConfig(n_mels=mels)))
    return model


def family(arch: str) -> type:
    """The registered class, to read what it declares it can do."""
    return ARCHITECTURES[arch]


def calibrate_bn(model: nn.Module, frames: int = 98, mels: int = 40) -> nn.Module:
    """Give BatchNorm realistic statistics, so a random network's activations keep their
    scale instead of collapsing to the logits' bias, and the quantization checks compare
    meaningful outputs."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for i in range(3):
            model(features(8, frames, mels, seed=100 + i))
    return model.eval()


@pytest.fixture
def quant_engine() -> Iterator[str]:
    old = torch.backends.quantized.engine
    engine = "x86" if "x86" in torch.backends.quantized.supported_engines else "qnnpack"
    torch.backends.quantized.engine = engine
    yield engine
    torch.backends.quantized.engine = old


# --- registry -----------------------------------------------------------------------------


def test_registry_holds_every_family() -> None:
    expected = {"tutorial_cnn", "dscnn", "bcresnet", "bcresnet1", "bcresnet2", "bcresnet3",
                "mobilenetv2"}
    assert expected <= set(ARCHITECTURES)


def test_unknown_architecture_lists_known_names() -> None:
    with pytest.raises(StreamKWSError) as exc:
        build_model("bcresnt", n_classes=12, n_frames=98, n_mels=40)
    msg = str(exc.value)
    assert "'bcresnt'" in msg
    assert "did you mean 'bcresnet'" in msg
    for name in ARCHS:
        assert name in msg


def test_unknown_kwarg_is_named() -> None:
    with pytest.raises(StreamKWSError) as exc:
        build_model("dscnn", n_classes=12, n_frames=98, n_mels=40, chanels=32)
    msg = str(exc.value)
    assert "'chanels'" in msg and "'dscnn'" in msg
    assert "did you mean 'channels'" in msg


def test_required_sizes_cannot_be_passed_twice_or_wrong() -> None:
    with pytest.raises(StreamKWSError, match="n_frames"):
        build_model("dscnn", n_classes=12, n_frames=0, n_mels=40)
    with pytest.raises(StreamKWSError, match="n_classes"):
        build_model("dscnn", n_classes=True, n_frames=98, n_mels=40)


@pytest.mark.parametrize(
    ("arch", "kwargs", "key"),
    [
        ("bcresnet", {"scale": -1}, "scale"),
        ("bcresnet", {"swish": 1}, "swish"),
        ("dscnn", {"channels": "64"}, "channels"),
        ("mobilenetv2", {"width": 100.0}, "width"),
        ("tutorial_cnn", {"dropout": 1.5}, "dropout"),
    ],
)
def test_bad_option_values_are_user_errors(arch: str, kwargs: dict, key: str) -> None:
    with pytest.raises(StreamKWSError, match=key):
        build_model(arch, n_classes=12, n_frames=98, n_mels=40, **kwargs)


def test_options_must_be_json() -> None:
    with pytest.raises(StreamKWSError, match="JSON"):
        build_model("bcresnet", n_classes=12, n_frames=98, n_mels=40, scale=object())


def test_count_parameters_includes_frozen() -> None:
    model = built("dscnn")
    total = count_parameters(model)
    for p in model.parameters():
        p.requires_grad_(False)
    assert count_parameters(model) == total


# --- shapes -------------------------------------------------------------------------------


@pytest.mark.parametrize("mels", [40, 64])
@pytest.mark.parametrize("frames", [98, 101])
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_shape(arch: str, frames: int, mels: int) -> None:
    model = built(arch, frames, mels).eval()
    # An ensemble is a container; what it contains follows the single-network contract.
    nets = [m.net for m in model.members] if arch == "ensemble" else [model]
    assert nets and all(isinstance(n, KWSNet) for n in nets)
    with torch.no_grad():
        out = model(features(3, frames, mels))
    assert out.shape == (3, N_CLASSES)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(("frames", "mels"), [(49, 32), (49, 80), (100, 33)])
@pytest.mark.parametrize("arch", ARCHS)
def test_edge_sizes(arch: str, frames: int, mels: int) -> None:
    need = getattr(family(arch), "min_frames", 1)
    if frames < need:
        with pytest.raises(StreamKWSError, match=f"at least {need} frames"):
            built(arch, frames, mels)
        return
    model = built(arch, frames, mels).eval()
    with torch.no_grad():
        assert model(features(1, frames, mels)).shape == (1, N_CLASSES)


@pytest.mark.parametrize("arch", ARCHS)
def test_frame_count_flexibility(arch: str) -> None:
    model = built(arch).eval()
    with torch.no_grad():
        if model.fixed_frames:
            with pytest.raises(StreamKWSError, match="98 frames"):
                model(features(1, 99))
        else:
            # Globally pooled networks take any window length the stream gives them.
            for frames in (49, 150):
                assert model(features(1, frames)).shape == (1, N_CLASSES)


@pytest.mark.parametrize("arch", ARCHS)
def test_wrong_feature_layout_is_rejected(arch: str) -> None:
    model = built(arch).eval()
    with pytest.raises(StreamKWSError, match="40"):
        model(features(1, 98, 64))
    with pytest.raises(StreamKWSError):
        model(torch.zeros(1, 1, 98, 40))


# --- parameter counts ---------------------------------------------------------------------


@pytest.mark.parametrize(("frames", "mels"), [(98, 40), (101, 64)])
def test_tutorial_cnn_parameter_count(frames: int, mels: int) -> None:
    conv1 = 1 * 32 * 8 * 20 + 2 * 32  # no conv bias; BN weight + bias
    conv2 = 32 * 8 * 4 * 10 + 2 * 8
    flat = 8 * (frames // 2) * (mels // 2)
    fc = flat * 128 + 128 + 128 * N_CLASSES + N_CLASSES
    assert count_parameters(built("tutorial_cnn", frames, mels)) == conv1 + conv2 + fc
    if (frames, mels) == (98, 40):
        assert conv1 + conv2 + fc == 1_020_636


def test_tutorial_cnn_feature_map_layout() -> None:
    model = built("tutorial_cnn", 101, 41).eval()
    with torch.no_grad():
        fmap = model.features(features(2, 101, 41).unsqueeze(1))
    assert fmap.shape == (2, 8, 50, 20)


def test_dscnn_parameter_count() -> None:
    c = 64
    stem = 10 * 4 * c + 2 * c
    block = 9 * c + 2 * c + c * c + 2 * c
    n = count_parameters(built("dscnn"))
    assert n == stem + 4 * block + c * N_CLASSES + N_CLASSES == 23_180
    assert 20_000 <= n <= 30_000


@pytest.mark.parametrize(
    ("arch", "kwargs", "paper_k"),
    [("bcresnet", {}, 9.2), ("bcresnet1", {}, 9.2), ("bcresnet", {"scale": 1.5}, None),
     ("bcresnet2", {}, 27.3), ("bcresnet3", {}, 54.2)],
)
def test_bcresnet_parameter_counts(arch: str, kwargs: dict, paper_k: float | None) -> None:
    n = count_parameters(built(arch, **kwargs))
    if arch in ("bcresnet", "bcresnet1") and not kwargs:
        assert 8_000 <= n <= 10_000
    if paper_k is not None:
        # The paper's Table 1 counts, to its one-decimal precision.
        assert round(n / 1000, 1) == paper_k


def test_bcresnet_aliases_match_scale_kwarg() -> None:
    a = built("bcresnet2").state_dict()
    b = built("bcresnet", scale=2).state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


def test_mobilenetv2_is_small() -> None:
    assert 20_000 <= count_parameters(built("mobilenetv2")) <= 60_000
    assert count_parameters(built("mobilenetv2", width=2.0)) > count_parameters(
        built("mobilenetv2")
    )


# --- rebuilding from JSON -----------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_rebuild_from_recorded_kwargs(arch: str) -> None:
    extra = {"bcresnet": {"scale": 1.5}, "dscnn": {"channels": 32, "blocks": 3}}.get(arch, {})
    model = built(arch, 101, 64, **extra)
    assert model.arch_name == arch
    kwargs = json.loads(json.dumps(model.arch_kwargs))
    assert kwargs["n_classes"] == N_CLASSES
    assert kwargs["n_frames"] == 101
    assert kwargs["n_mels"] == 64
    for key, value in extra.items():
        assert kwargs[key] == value
    twin = build_model(json.loads(json.dumps(model.arch_name)), **kwargs)
    want = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in twin.state_dict().items()} == want
    twin.load_state_dict(model.state_dict())
    x = features(2, 101, 64)
    with torch.no_grad():
        torch.testing.assert_close(twin.eval()(x), model.eval()(x))


# --- SubSpectralNorm ----------------------------------------------------------------------


def test_ssn_matches_reference_reshape_when_bands_are_equal() -> None:
    # Qualcomm's SSN: view (B, C*S, H/S, W) -> BatchNorm2d(C*S) -> view back.
    b, c, h, w, s = 4, 3, 20, 7, 5
    x = torch.randn(b, c, h, w)
    ssn = SubSpectralNorm(c, h).train()
    ref = nn.functional.batch_norm(x.reshape(b, c * s, h // s, w), None, None, training=True)
    torch.testing.assert_close(ssn(x), ref.reshape(b, c, h, w), atol=1e-5, rtol=1e-5)


def test_ssn_normalises_each_uneven_band() -> None:
    x = torch.randn(6, 2, 13, 9) * 3 + torch.arange(13.0).view(1, 1, 13, 1)
    y = SubSpectralNorm(2, 13).train()(x)
    for band in torch.tensor_split(y, 5, dim=2):
        mean = band.mean(dim=(0, 2, 3))
        var = band.var(dim=(0, 2, 3), unbiased=False)
        torch.testing.assert_close(mean, torch.zeros(2), atol=1e-5, rtol=0)
        torch.testing.assert_close(var, torch.ones(2), atol=1e-3, rtol=0)


# --- quantization -------------------------------------------------------------------------


def test_quiet_ao_deprecation_silences_only_the_ao_notices() -> None:
    ao_msg = "torch.ao.quantization is deprecated and will be removed in 2.10. \nFor migrations"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_ao_deprecation():
            warnings.warn(ao_msg, DeprecationWarning, stacklevel=1)
            warnings.warn("some other API is deprecated", DeprecationWarning, stacklevel=1)
            warnings.warn("Please use quant_min and quant_max", UserWarning, stacklevel=1)
            tq.quantize_dynamic(nn.Sequential(nn.Linear(4, 4)), {nn.Linear}, dtype=torch.qint8)
        warnings.warn(ao_msg, DeprecationWarning, stacklevel=1)
    texts = [str(w.message) for w in caught]
    assert not any(ao_deprecation_pattern().match(t) for t in texts[:-1])
    assert "some other API is deprecated" in texts
    assert "Please use quant_min and quant_max" in texts
    assert texts[-1] == ao_msg  # filters are restored on exit


@pytest.mark.parametrize("arch", ARCHS)
def test_dynamic_quantization_close_to_float(arch: str) -> None:
    model = calibrate_bn(built(arch))
    x = features(16, seed=7)
    with torch.no_grad():
        ref = model(x)
        out = quantize_dynamic(model)(x)
        with quiet_ao_deprecation():
            direct = tq.quantize_dynamic(
                model, {nn.Linear, nn.LSTM, nn.GRU}, dtype=torch.qint8
            )(x)
    assert out.shape == ref.shape
    assert (out.softmax(-1) - ref.softmax(-1)).abs().max() <= 0.05
    torch.testing.assert_close(out, direct)


def test_quantize_dynamic_helper_leaves_the_model_alone() -> None:
    model = built("tutorial_cnn").train()
    q = quantize_dynamic(model)
    assert model.training and not q.training
    assert type(model.classifier[1]) is nn.Linear
    assert isinstance(q.classifier[1], torch.ao.nn.quantized.dynamic.Linear)
    assert q.arch_name == "tutorial_cnn" and q.arch_kwargs == model.arch_kwargs


@pytest.mark.parametrize("arch", ARCHS)
def test_fuse_model_keeps_outputs_and_is_idempotent(arch: str) -> None:
    model = calibrate_bn(built(arch))
    if not getattr(family(arch), "statically_quantizable", True):
        with pytest.raises(StreamKWSError, match="cannot be statically quantized"):
            model.fuse_model()
        return
    x = features(4, seed=3)
    with torch.no_grad():
        ref = model(x)
        model.fuse_model()
        model.fuse_model()
        torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-4)
    fused_bns = [m for m in model.modules() if type(m) is nn.BatchNorm2d]
    # Only SubSpectralNorm's per-band BNs follow no conv they could fold into.
    assert all(
        any(bn is n for s in model.modules() if isinstance(s, SubSpectralNorm) for n in s.norms)
        for bn in fused_bns
    )


def test_fuse_model_needs_eval_mode() -> None:
    with pytest.raises(RuntimeError, match="eval"):
        built("dscnn").train().fuse_model()


@pytest.mark.filterwarnings(QCONFIG_NOISE)
@pytest.mark.parametrize(
    ("arch", "kwargs"),
    # Those that declare they cannot are held to their refusal in the fuse test above.
    [pytest.param(a, {}, id=a) for a in ARCHS
     if getattr(ARCHITECTURES[a], "statically_quantizable", True)]
    + [pytest.param("bcresnet", {"swish": False}, id="bcresnet-relu")],
)
def test_static_quantization_end_to_end(arch: str, kwargs: dict, quant_engine: str) -> None:
    model = calibrate_bn(built(arch, **kwargs))
    x = features(8, seed=11)
    with torch.no_grad():
        ref = model(x)
    with quiet_ao_deprecation():
        model.eval()
        model.fuse_model()
        model.qconfig = tq.get_default_qconfig(quant_engine)
        tq.prepare(model, inplace=True)
        with torch.no_grad():
            for i in range(8):
                model(features(2, seed=200 + i))
        tq.convert(model, inplace=True)
        with torch.no_grad():
            out = model(x)
    assert out.shape == (8, N_CLASSES)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # Every conv, linear and BN now runs in int8; the only float compute left is what a
    # FloatIsland keeps in float on purpose (BC-ResNet's SiLU).
    islands = {id(m.module) for m in model.modules() if isinstance(m, FloatIsland)}
    float_compute = [
        type(m).__name__
        for m in model.modules()
        if type(m) in (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.SiLU) and id(m) not in islands
    ]
    assert float_compute == []
    if kwargs.get("swish") is False:
        assert not islands
    # Loose agreement: a wiring mistake gives unrelated logits, int8 noise does not.
    cos = nn.functional.cosine_similarity(out, ref, dim=1)
    assert cos.mean() > 0.8


# --- training -----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_training_reduces_loss(arch: str) -> None:
    # Short windows and few mels keep 30 steps cheap; the sizes are still in the spec.
    frames, mels = max(49, getattr(family(arch), "min_frames", 1)), 32
    model = built(arch, frames, mels, seed=1).train()
    x = features(8, frames, mels, seed=5)
    y = torch.arange(8) % N_CLASSES
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0]


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_quantizes_dynamically_and_runs_in_the_daemon(arch, speech_stream,
                                                                         tmp_path):
    """Bundle it, quantize it, reload it, and drive the daemon's pipeline on real speech."""
    from streamkws.audio.chunk import Chunk
    from streamkws.bundle import Bundle, load_bundle, new_bundle
    from streamkws.config import Config, VadConfig
    from streamkws.daemon import Pipeline
    from streamkws.data import DEFAULT_LABELS
    from streamkws.features import FrontEndConfig
    from streamkws.models.quant import quantize_dynamic

    cfg = Config(vad=VadConfig(kind="off")).validate()
    net = build_model(arch, n_classes=12, n_frames=98, n_mels=40, **required_options(arch))
    b = new_bundle(net, np.full(40, -6.0), np.full(40, 2.0), list(DEFAULT_LABELS),
                   FrontEndConfig(), arch)
    q = Bundle(quantize_dynamic(b.model), {**b.meta, "quantization": {"mode": "dynamic"}})
    q.save(tmp_path / "q.skw")
    pipeline = Pipeline(cfg, load_bundle(tmp_path / "q.skw"))
    for i in range(0, 48000, 1600):
        pipeline.process(Chunk(speech_stream[i : i + 1600], i))
    assert pipeline.inferences == pipeline.windows > 0
