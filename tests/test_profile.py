"""``streamkws profile``: MACs against hand counts, the compare table, the JSON report."""

from __future__ import annotations

import argparse
import copy
import json
import warnings

import pytest
import torch
import torch.ao.quantization as tq
from torch import nn

from streamkws.bundle import Bundle, load_bundle
from streamkws.errors import StreamKWSError
from streamkws.models import build_model, count_parameters
from streamkws.models.quant import quantize_dynamic, quiet_ao_deprecation
from streamkws.tools import profile

torch.set_num_threads(1)


def out_size(n: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
    """PyTorch's convolution output length: floor((n + 2p - d (k - 1) - 1) / s) + 1."""
    return (n + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        tq.QuantStub(),
        nn.Conv2d(1, 4, 3, stride=2),                                  # plain, strided
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4),           # depthwise, dilated
        nn.Conv2d(4, 8, 1),                                            # pointwise
        nn.Flatten(),
        nn.Linear(8 * 9 * 7, 10),
        tq.DeQuantStub(),
    ).eval()


H, W = 20, 16
# Conv2d(1, 4, 3, stride 2): 9 x 7 outputs, each 1 * 3 * 3 products, 4 channels.
H1, W1 = out_size(H, 3, stride=2), out_size(W, 3, stride=2)
# Depthwise 3x3, padding 2, dilation 2 keeps 9 x 7; each output sees 4/4 = 1 input channel.
H2, W2 = out_size(H1, 3, padding=2, dilation=2), out_size(W1, 3, padding=2, dilation=2)
HAND_MACS = (
    4 * H1 * W1 * (1 * 3 * 3)       # conv: C_out * H_out * W_out * (C_in / groups) * k_h * k_w
    + 4 * H2 * W2 * (4 // 4 * 3 * 3)  # depthwise
    + 8 * H2 * W2 * (4 * 1 * 1)     # pointwise
    + (8 * H2 * W2) * 10            # linear: in_features * out_features
)


def test_hand_counted_small_net() -> None:
    assert (H1, W1, H2, W2) == (9, 7, 9, 7)
    assert HAND_MACS == 2268 + 2268 + 2016 + 5040
    counts = profile.count_macs(small_net(), torch.randn(1, 1, H, W))
    assert counts.macs == HAND_MACS
    assert [layer.macs for layer in counts.layers] == [2268, 2268, 2016, 5040]
    assert counts.uncounted == []
    # Largest working set of one layer: the pointwise conv, float input 4 x 9 x 7 plus
    # output 8 x 9 x 7 (the first conv has 20 x 16 in, 4 x 9 x 7 out: less).
    assert counts.peak_activation_bytes == 4 * (4 * H2 * W2 + 8 * H2 * W2) == 3024
    assert counts.largest_activation_bytes == 4 * 8 * H2 * W2


def test_quantized_modules_count_the_same() -> None:
    x = torch.randn(1, 1, H, W)
    with quiet_ao_deprecation(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # observer/qconfig notices
        dyn = quantize_dynamic(small_net())
        static = copy.deepcopy(small_net())
        static.qconfig = tq.get_default_qconfig("x86")
        tq.prepare(static, inplace=True)
        static(x)
        tq.convert(static, inplace=True)
    assert type(static[1]).__module__.startswith("torch.ao.nn.quantized")
    assert profile.count_macs(dyn, x).macs == HAND_MACS
    counts = profile.count_macs(static, x)
    assert counts.macs == HAND_MACS
    # int8 activations: the largest tensor is now the float input of Quantize (4 bytes
    # each); the pointwise output is 8 x 9 x 7 at one byte.
    assert counts.largest_activation_bytes == 4 * H * W
    assert [layer.activation_bytes for layer in counts.layers][2] == 4 * H2 * W2 + 8 * H2 * W2
    assert profile.count_weights(static)[0] == profile.count_weights(small_net())[0]


def test_conv1d_and_transposed() -> None:
    net = nn.Sequential(nn.Conv1d(3, 6, 5, stride=2, padding=1, dilation=2, groups=3),
                        nn.ConvTranspose1d(6, 4, 3, stride=2))
    length = out_size(50, 5, stride=2, padding=1, dilation=2)
    assert length == 22
    conv = 6 * length * (3 // 3) * 5
    transposed = 6 * length * 4 * 3  # every input element times C_out / groups * kernel
    assert profile.count_macs(net, torch.randn(1, 3, 50)).macs == conv + transposed


def test_tutorial_cnn_at_98_by_40() -> None:
    net = build_model("tutorial_cnn", n_classes=12, n_frames=98, n_mels=40).eval()
    hand = (
        32 * 98 * 40 * (1 * 8 * 20)      # 'same' conv (8, 20), 32 channels, full resolution
        + 8 * 49 * 20 * (32 * 4 * 10)    # after the 2x2 max-pool: 'same' conv (4, 10), 8 ch
        + (8 * 49 * 20) * 128            # flatten -> Linear(7840, 128)
        + 128 * 12                       # Linear(128, 12)
    )
    assert hand == 31_110_656
    assert profile.count_macs(net, torch.randn(1, 98, 40)).macs == hand


@pytest.fixture(scope="module")
def dyn_bundle(tiny_bundle: Bundle, tmp_path_factory) -> Bundle:
    meta = {**tiny_bundle.meta, "name": "tiny-dyn",
            "quantization": {"mode": "dynamic", "dtype": "qint8"}}
    path = tmp_path_factory.mktemp("dyn") / "tiny-dyn.skw"
    Bundle(quantize_dynamic(tiny_bundle.model), meta).save(path)
    return load_bundle(path)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    profile.add_arguments(p)
    return p.parse_args(argv)


def test_json_report(tiny_bundle: Bundle, capsys) -> None:
    assert profile.run(parse(["--model", str(tiny_bundle.path), "--runs", "200",
                              "--warmup", "5", "--json"])) == 0
    r = json.loads(capsys.readouterr().out)
    for key in ("model", "quantization", "params", "params_nonzero", "macs", "weight_bytes",
                "file_bytes", "peak_activation_bytes", "largest_activation_bytes",
                "latency_ms", "input_shape", "layers"):
        assert key in r, key
    assert "accuracy" not in r
    assert r["params"] == count_parameters(tiny_bundle.model)
    assert r["input_shape"] == [1, 98, 40]
    assert r["file_bytes"] == tiny_bundle.path.stat().st_size
    assert r["latency_ms"]["runs"] == 200 and r["latency_ms"]["threads"] == 1
    assert 0 < r["latency_ms"]["p50"] <= r["latency_ms"]["p99"]
    # dscnn(16 channels, 1 block) with freq_stride 2: stem 16 x 49 x 20 outputs of 10*4.
    stem = 16 * 49 * 20 * 40
    block = 16 * 49 * 20 * 9 + 16 * 49 * 20 * 16
    assert r["macs"] == stem + block + 16 * 4


def test_compare_table(tiny_bundle: Bundle, dyn_bundle: Bundle, small_data, capsys) -> None:
    assert profile.run(parse(["--compare", str(tiny_bundle.path), str(dyn_bundle.path),
                              "--runs", "200", "--warmup", "5", "--data",
                              str(small_data)])) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 2  # header, rule, a row per model
    cols = [c.strip() for c in table[0].strip("|").split("|")]
    assert cols == ["model", "quantization", "params", "nonzero", "MACs", "weight KiB",
                    "file KiB", "p50 ms", "p99 ms", "accuracy", "Δ accuracy"]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    assert [r[0] for r in rows] == ["tiny.skw", "tiny-dyn.skw"]
    assert [r[1] for r in rows] == ["none", "dynamic"]
    assert rows[0][2] == rows[1][2]  # same parameters, same MACs
    assert rows[0][4] == rows[1][4]
    assert rows[0][-1] == "+0.0000"
    assert all(len(r) == len(cols) for r in rows)


def test_compare_without_data_has_no_accuracy(tiny_bundle: Bundle) -> None:
    row = profile.profile_bundle(tiny_bundle, latency=False, name="t")
    table = profile.format_compare([row, row]).splitlines()
    assert "accuracy" not in table[0] and len(table) == 4


def test_too_few_runs_is_a_user_error(tiny_bundle: Bundle) -> None:
    with pytest.raises(StreamKWSError, match="at least 200"):
        profile.run(parse(["--model", str(tiny_bundle.path), "--runs", "50"]))



def test_latency_is_timed_before_any_hook_or_warning_filter_touches_the_model(tiny_bundle,
                                                                              monkeypatch):
    """Timing after the MAC-counting hooks, or inside warnings.catch_warnings, measured a
    quantized model ~75 % slower than the daemon runs it."""
    import warnings

    import streamkws.tools.profile as profile

    events = []
    real_latency, real_macs = profile.measure_latency, profile.count_macs

    def timed(*args, **kwargs):
        events.append(("time", len(warnings.filters)))
        return real_latency(*args, **kwargs)

    def counted(*args, **kwargs):
        events.append(("count", None))
        return real_macs(*args, **kwargs)

    baseline = len(warnings.filters)
    monkeypatch.setattr(profile, "measure_latency", timed)
    monkeypatch.setattr(profile, "count_macs", counted)
    profile.profile_bundle(tiny_bundle, runs=200, warmup=5)
    assert events[0] == ("time", baseline) and events[1][0] == "count"


def test_compare_gives_no_accuracy_difference_between_models_of_other_labels(
        tiny_bundle: Bundle) -> None:
    """The default model scores a user's own keywords as _unknown_: its accuracy beside
    theirs is on another task, and a difference would mean nothing."""
    row = profile.profile_bundle(tiny_bundle, latency=False, name="mine")
    row.update(accuracy=0.9, n_clips=10, data="d")
    other = {**row, "model": "default", "labels": ["up", "down", "_unknown_", "_silence_"],
             "accuracy": 0.5}
    table = profile.format_compare([row, other]).splitlines()
    assert table[2].rstrip(" |").endswith("+0.0000")
    assert table[3].rstrip(" |").endswith("0.5000 | other labels")
