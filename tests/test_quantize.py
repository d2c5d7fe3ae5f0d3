"""``streamkws quantize``: every mode writes a bundle that ``load_bundle`` rebuilds and that
stays close to the float model on real clips.

The tests run the real ``torch.ao.quantization`` calls (prepare, convert, quantize_dynamic):
a torch release that drops the eager API must fail here, not on a device.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import streamkws.tools.quantize as qz
from streamkws.bundle import Bundle, load_bundle, rebuild, weight_bytes
from streamkws.data import ClipCache, load_dataset
from streamkws.errors import StreamKWSError
from streamkws.tools.evaluate import predict_clips

torch.set_num_threads(1)

INT8_TOLERANCE = 0.1
FP16_TOLERANCE = 1e-2
ENGINES = [pytest.param(e, marks=pytest.mark.skipif(
    e not in torch.backends.quantized.supported_engines, reason=f"no {e} kernels here"))
    for e in qz.ENGINES]


@pytest.fixture(autouse=True)
def restore_engine() -> Iterator[None]:
    # Loading a static bundle selects its engine globally; keep tests independent.
    old = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = old


@pytest.fixture(scope="module")
def clips(tiny_bundle: Bundle, small_data: Path) -> np.ndarray:
    x, _ = ClipCache().load_all(load_dataset(small_data, tiny_bundle.labels))
    return x


@pytest.fixture(scope="module")
def float_probs(tiny_bundle: Bundle, clips: np.ndarray) -> np.ndarray:
    return predict_clips(tiny_bundle, clips)


def saved(bundle: Bundle, path: Path) -> Bundle:
    """Save and load back: what the daemon gets, rebuilt from the metadata alone."""
    bundle.save(path)
    return load_bundle(path)


def assert_close(q: Bundle, clips: np.ndarray, ref: np.ndarray, tol: float,
                 agree: float = 0.9, corr: float = 0.9) -> None:
    p = predict_clips(q, clips)
    assert np.abs(p - ref).max() < tol
    assert (p.argmax(1) == ref.argmax(1)).mean() >= agree
    # The tiny model is barely trained (every clip near 1/4 per class), so closeness alone
    # would pass a miswired network too; its outputs must also move with the float ones.
    for k in range(ref.shape[1]):
        assert np.corrcoef(p[:, k], ref[:, k])[0, 1] > corr


def quantized_types(model: nn.Module) -> list[str]:
    return [type(m).__name__ for m in model.modules()
            if type(m).__module__.startswith(("torch.ao.nn.quantized",
                                              "torch.ao.nn.intrinsic.quantized"))]


# --- modes -----------------------------------------------------------------------------------


def test_dynamic_mode_round_trips_close_to_float(tiny_bundle, clips, float_probs, tmp_path):
    q = saved(qz.quantize(tiny_bundle, "dynamic"), tmp_path / "d.skw")
    assert q.meta["quantization"] == {"mode": "dynamic", "dtype": "qint8"}
    assert isinstance(q.model.net.head[3], torch.ao.nn.quantized.dynamic.Linear)
    assert_close(q, clips, float_probs, INT8_TOLERANCE)
    assert q.meta["quantized_from"]["sha256"] == tiny_bundle.sha256
    assert "metrics" not in q.meta  # the float model's numbers do not describe this one


@pytest.mark.parametrize("engine", ENGINES)
def test_static_mode_is_really_int8_and_close_to_float(tiny_bundle, small_data, clips,
                                                       float_probs, tmp_path, engine):
    q = qz.quantize(tiny_bundle, "static", calibration=small_data, engine=engine)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = saved(q, tmp_path / "s.skw")
    # Loading is quiet: neither the ao deprecation nor the uncalibrated-observer notice.
    assert [str(w.message) for w in caught] == []
    meta = loaded.meta["quantization"]
    assert meta["mode"] == "static" and meta["engine"] == engine
    assert meta["calibration"]["clips"] == 96  # all of small_data (<= 200), 24 per label
    assert torch.backends.quantized.engine == engine
    kinds = quantized_types(loaded.model)
    assert "Quantize" in kinds and "DeQuantize" in kinds
    assert kinds.count("ConvReLU2d") == 3 and "Linear" in kinds
    float_compute = [type(m).__name__ for m in loaded.model.modules()
                     if type(m) in (nn.Conv2d, nn.Linear, nn.BatchNorm2d)]
    assert float_compute == []
    assert weight_bytes(loaded.model) < 0.6 * weight_bytes(tiny_bundle.model)
    assert_close(loaded, clips, float_probs, INT8_TOLERANCE)
    # The rebuilt structure holds exactly the calibrated model's numbers.
    x = torch.from_numpy(np.random.default_rng(0).normal(-6, 2, (3, 98, 40)).astype("f4"))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), q.model(x), atol=0, rtol=0)


def test_static_skip_keeps_a_layer_float(tiny_bundle, small_data, clips, float_probs,
                                         tmp_path):
    q = saved(qz.quantize(tiny_bundle, "static", calibration=small_data, skip=["head.3"]),
              tmp_path / "s.skw")
    assert type(q.model.net.head[3].module) is nn.Linear
    assert "ConvReLU2d" in quantized_types(q.model)
    assert_close(q, clips, float_probs, INT8_TOLERANCE)


def test_mixed_mode_follows_the_per_submodule_choice(tiny_bundle, small_data, clips,
                                                     float_probs, tmp_path):
    q = saved(qz.quantize(tiny_bundle, "mixed", calibration=small_data, static=["blocks"],
                          dynamic=["head.3"], skip=["blocks.0.3"]), tmp_path / "m.skw")
    net = q.model.net
    assert q.meta["quantization"]["static"] == ["blocks"]
    assert q.meta["quantization"]["skip"] == ["blocks.0.3"]
    # blocks: its own quant/dequant pair, int8 inside, but the skipped conv is float.
    assert isinstance(net.blocks.quant, torch.ao.nn.quantized.Quantize)
    assert type(net.blocks.module[0][0]).__name__ == "ConvReLU2d"
    assert type(net.blocks.module[0][3].module) is nn.Conv2d
    # Unlisted: the stem stays float and unfused; the network's own stubs stay identities.
    assert type(net.stem[0]) is nn.Conv2d and type(net.stem[1]) is nn.BatchNorm2d
    assert type(net.quant) is torch.ao.quantization.QuantStub
    assert isinstance(net.head[3], torch.ao.nn.quantized.dynamic.Linear)
    assert_close(q, clips, float_probs, INT8_TOLERANCE)


def test_mixed_dynamic_only_needs_no_calibration(tiny_bundle, tmp_path):
    q = saved(qz.quantize(tiny_bundle, "mixed", dynamic=["head"]), tmp_path / "m.skw")
    assert "engine" not in q.meta["quantization"]
    assert isinstance(q.model.net.head[3], torch.ao.nn.quantized.dynamic.Linear)


def test_calibration_for_a_mode_that_uses_none_is_refused(tiny_bundle, small_data):
    for mode in ("dynamic", "fp16"):
        with pytest.raises(StreamKWSError, match="--calibration applies to static"):
            qz.quantize(tiny_bundle, mode, calibration=small_data)
    with pytest.raises(StreamKWSError, match="--calibration applies to static"):
        qz.quantize(tiny_bundle, "mixed", dynamic=["head"], calibration=small_data)


def test_layer_names_are_taken_as_profile_prints_them(tiny_bundle, tmp_path):
    """`profile --layers` and the sweep name layers from the bundle's wrapper (net.head)."""
    q = saved(qz.quantize(tiny_bundle, "mixed", dynamic=["net.head"]), tmp_path / "n.skw")
    assert q.meta["quantization"]["dynamic"] == ["head"]
    assert isinstance(q.model.net.head[3], torch.ao.nn.quantized.dynamic.Linear)
    with pytest.raises(StreamKWSError) as err:
        qz.quantize(tiny_bundle, "mixed", dynamic=["net.nowhere"])
    assert "activation_post_process" not in str(err.value)


def test_fp16_mode_is_nearly_exact(tiny_bundle, clips, float_probs, tmp_path):
    q = saved(qz.quantize(tiny_bundle, "fp16"), tmp_path / "h.skw")
    assert q.meta["quantization"]["dtype"] == "float16"
    head = q.model.net.head[3]
    assert isinstance(head, torch.ao.nn.quantized.dynamic.Linear)
    assert head._packed_params.dtype == torch.float16
    assert_close(q, clips, float_probs, FP16_TOLERANCE)


@pytest.mark.parametrize(("mode", "kw", "tol"), [
    ("dynamic", {}, 0.05),
    ("static", {"calibration": True}, 0.2),
    ("mixed", {"calibration": True, "static": ["stem", "blocks"], "dynamic": ["head"]}, 0.2),
    ("fp16", {}, 1e-3),
])
def test_the_trained_default_model_stays_close(small_data, tmp_path, mode, kw, tol):
    """On a well trained 12-class model the outputs are confident and spread out, so this
    measures the quantization error itself (int8 static: about 0.13 at worst here)."""
    fb = load_bundle("default-float")
    x, _ = ClipCache().load_all(load_dataset(small_data, fb.labels))
    if kw.pop("calibration", False):
        kw["calibration"] = small_data
    q = saved(qz.quantize(fb, mode, **kw), tmp_path / "q.skw")
    assert_close(q, x, predict_clips(fb, x), tol, agree=0.97, corr=0.95)


def test_bundles_load_in_a_fresh_process(tiny_bundle, small_data, tmp_path):
    # There nothing has imported streamkws.tools.quantize: load_bundle must find the modes.
    paths = []
    for mode, kw in (("static", {"calibration": small_data}), ("fp16", {}),
                     ("mixed", {"calibration": small_data, "static": ["stem"]})):
        paths.append(tmp_path / f"{mode}.skw")
        qz.quantize(tiny_bundle, mode, **kw).save(paths[-1])
    code = ("import sys; from streamkws.bundle import load_bundle\n"
            "for p in sys.argv[1:]: print(load_bundle(p).quantization)")
    out = subprocess.run([sys.executable, "-c", code, *map(str, paths)], capture_output=True,
                         text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.split() == ["static", "fp16", "mixed"]


# --- refusals --------------------------------------------------------------------------------


def test_unknown_submodule_lists_the_valid_names(tiny_bundle):
    with pytest.raises(StreamKWSError, match=r"'blok'.*did you mean 'blocks'.*blocks\.0\.3"):
        qz.quantize(tiny_bundle, "mixed", static=["blok"], calibration=np.zeros((1, 98, 40)))
    with pytest.raises(StreamKWSError, match="no such submodule"):
        qz.quantize(tiny_bundle, "mixed", dynamic=["head.3"], skip=["head.9"])


@pytest.mark.parametrize(("mode", "kw"), [("static", {}), ("mixed", {"static": ["blocks"]})])
def test_static_parts_need_calibration(tiny_bundle, mode, kw):
    with pytest.raises(StreamKWSError, match="--calibration"):
        qz.quantize(tiny_bundle, mode, **kw)


@pytest.mark.parametrize(("kw", "match"), [
    ({"static": ["blocks"], "dynamic": ["blocks.0"]}, "lies inside"),
    ({"static": ["blocks.0"], "skip": ["blocks"]}, "lies inside --skip"),
    ({"dynamic": ["blocks"]}, "no Linear"),
    ({"static": ["head"], "skip": ["head"]}, "given twice"),
    ({}, "at least one"),
])
def test_contradictory_mixed_choices_are_refused(tiny_bundle, kw, match):
    with pytest.raises(StreamKWSError, match=match):
        qz.quantize(tiny_bundle, "mixed", calibration=np.zeros((1, 98, 40)), **kw)


def test_options_of_other_modes_are_refused(tiny_bundle):
    with pytest.raises(StreamKWSError, match="--mode mixed"):
        qz.quantize(tiny_bundle, "static", static=["blocks"])
    with pytest.raises(StreamKWSError, match="--engine"):
        qz.quantize(tiny_bundle, "dynamic", engine="qnnpack")


def test_an_already_quantized_bundle_points_to_its_own_float_version(tiny_bundle):
    q = qz.quantize(tiny_bundle, "dynamic")
    with pytest.raises(StreamKWSError,
                       match=r"already quantized \(dynamic\); quantize its float version "
                             r"instead$"):
        qz.quantize(q, "static")
    # The shipped ones: default has a float twin; accurate ships only quantized.
    with pytest.raises(StreamKWSError, match=r"instead \(--model default-float\)$"):
        qz.quantize(load_bundle("default"), "static")
    with pytest.raises(StreamKWSError, match="accurate ships only quantized"):
        qz.quantize(load_bundle("accurate"), "static")


def test_unsupported_engine_is_refused_when_quantizing_and_loading(tiny_bundle, small_data,
                                                                    tmp_path, monkeypatch):
    q = qz.quantize(tiny_bundle, "static", calibration=small_data)
    q.save(tmp_path / "s.skw")
    monkeypatch.setattr(qz, "supported_engines", lambda: ["qnnpack"])
    with pytest.raises(StreamKWSError, match="'x86'.*not supported.*--engine qnnpack"):
        qz.quantize(tiny_bundle, "static", calibration=small_data, engine="x86")
    with pytest.raises(StreamKWSError, match="statically quantized for the 'x86' engine"):
        load_bundle(tmp_path / "s.skw")
    with pytest.raises(StreamKWSError, match="not supported"):
        rebuild(q.meta)


# --- command line and daemon -----------------------------------------------------------------


def cli(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    qz.add_arguments(p)
    return p.parse_args(argv)


def test_run_writes_the_bundle_and_a_json_comparison(tiny_bundle, small_data, tmp_path,
                                                     capsys):
    out = tmp_path / "static.skw"
    rc = qz.run(cli("--model", str(tiny_bundle.path), "--mode", "static", "--calibration",
                    str(small_data), "--calibration-clips", "40", "--data", str(small_data),
                    "--json", "--out", str(out)))
    assert rc == 0
    r = json.loads(capsys.readouterr().out)
    assert load_bundle(out).meta["name"] == "static"
    # What it was measured on is recorded in the bundle, as the comparison reports it.
    ev = load_bundle(out).meta["metrics"]["evaluation"]
    assert ev["data"] == str(small_data) and ev["n"] == 96
    assert r["mode"] == "static" and r["quantization"]["calibration"]["clips"] == 40
    f, q = r["float"], r["quantized"]
    assert q["weight_bytes"] < f["weight_bytes"] and q["file_bytes"] == out.stat().st_size
    assert f["clips"] == q["clips"] == 96
    assert abs(f["accuracy"] - q["accuracy"]) <= 0.1
    assert ev["accuracy"] == q["accuracy"]
    assert f["latency_ms_p50"] > 0 and q["latency_ms_p50"] > 0
    assert r["latency"] == {"batch": 1, "threads": 1, "runs": 200, "statistic": "median",
                            "timed": "Bundle.predict (features in, probabilities out)"}


def test_run_prints_a_table(tiny_bundle, tmp_path, capsys):
    assert qz.run(cli("--model", str(tiny_bundle.path), "--out", str(tmp_path / "d.skw"))) == 0
    text = capsys.readouterr().out
    print(text)
    for row in ("weights (bytes)", "file (bytes)", "latency p50 (ms)"):
        assert row in text
    assert "dynamic" in text and "accuracy" not in text


def test_run_refuses_to_overwrite_its_input(tiny_bundle):
    with pytest.raises(StreamKWSError, match="overwrite"):
        qz.run(cli("--model", str(tiny_bundle.path), "--out", str(tiny_bundle.path)))


def test_static_bundle_runs_in_the_daemon_pipeline(tiny_bundle, small_data, speech_stream,
                                                   tmp_path):
    from streamkws.audio.chunk import Chunk
    from streamkws.config import Config
    from streamkws.daemon import Pipeline

    loaded = saved(qz.quantize(tiny_bundle, "static", calibration=small_data),
                   tmp_path / "s.skw")
    runs = {}
    for name, bundle in (("float", tiny_bundle), ("static", loaded)):
        pipe = Pipeline(Config(), bundle)
        dets = []
        for i in range(0, len(speech_stream), 1600):  # 100 ms chunks, as a microphone
            dets += pipe.process(Chunk(speech_stream[i : i + 1600].astype(np.float32), i))
        assert all(d.keyword in bundle.labels for d in dets)
        runs[name] = pipe.inferences
    assert runs["static"] == runs["float"] > 10


def test_a_quantized_model_carries_its_sources_threshold_marked_as_inherited(tiny_bundle,
                                                                             tmp_path):
    from streamkws.bundle import Bundle

    calibrated = Bundle(tiny_bundle.model, {**tiny_bundle.meta, "detect": {
        "threshold": 0.66, "calibration": "six streams"}})
    q = saved(qz.quantize(calibrated, "dynamic"), tmp_path / "d.skw")
    assert q.threshold == 0.66
    how = q.meta["detect"]["calibration"]
    assert how.startswith(f"inherited from {tiny_bundle.name}") and how.endswith("six streams")
    # derived once more (pruned, say), it still names where the number was calibrated
    assert q.inherited_detect() == q.meta["detect"]
    assert "detect" not in qz.quantize(tiny_bundle, "dynamic").meta
