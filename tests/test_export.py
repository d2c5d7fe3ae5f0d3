"""``streamkws export``: TorchScript and ONNX files that match the bundle on real clips."""

from __future__ import annotations

import argparse
import json
import logging

import numpy as np
import pytest
import torch
from torch import nn

from streamkws.bundle import Bundle, load_bundle
from streamkws.models.quant import quantize_dynamic
from streamkws.tools import export

torch.set_num_threads(1)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    export.add_arguments(p)
    return p.parse_args(argv)


@pytest.fixture(scope="module")
def clips(tiny_bundle: Bundle, small_data) -> np.ndarray:
    """Log-Mel windows of 12 real clips, three per label."""
    from streamkws.data import ClipCache, load_dataset
    from streamkws.features import LogMel

    ds = load_dataset(small_data, tiny_bundle.labels)
    picks = [i for label in tiny_bundle.labels
             for i in [j for j, it in enumerate(ds.items) if it.label == label][:3]]
    cache = ClipCache()
    audio = np.stack([cache.load(ds.items[i]) for i in picks])
    fe = tiny_bundle.frontend
    return LogMel(fe)(audio)[:, : fe.window_frames].astype(np.float32)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("mobile", [True, False], ids=["mobile", "plain"])
def test_torchscript_reloads_and_matches(tiny_bundle, small_data, clips, tmp_path, mobile,
                                         capsys) -> None:
    out = tmp_path / "tiny.pt"
    argv = ["--model", str(tiny_bundle.path), "--format", "torchscript", "--out", str(out),
            "--check-data", str(small_data), "--json"] + ([] if mobile else ["--no-mobile"])
    assert export.run(parse(argv)) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["max_abs_prob_diff"] <= 1e-4
    assert report["checked_on"].startswith("20 clips of")

    extra = {"streamkws.json": ""}
    loaded = torch.jit.load(str(out), _extra_files=extra)
    with torch.inference_mode():
        got = np.concatenate([softmax(loaded(torch.from_numpy(c[None])).numpy())
                              for c in clips])
    want = np.stack([tiny_bundle.predict(c) for c in clips])
    assert np.abs(got - want).max() <= 1e-4
    assert got.argmax(1).tolist() == want.argmax(1).tolist()

    meta = json.loads(extra["streamkws.json"])
    assert meta["labels"] == tiny_bundle.labels
    assert meta["frontend"] == tiny_bundle.frontend.to_dict()
    assert meta["input"]["shape"] == ["batch", 98, 40]
    if mobile:
        from torch.jit.mobile import _load_for_lite_interpreter

        with export.quiet_export():
            lite = _load_for_lite_interpreter(str(out))
        x = torch.from_numpy(clips[:1])
        assert torch.allclose(lite(x), loaded(x))


def test_onnx_export_matches_with_metadata(tiny_bundle, small_data, clips, tmp_path) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    out = tmp_path / "tiny.onnx"
    r = export.export(tiny_bundle, "onnx", out, check_data=small_data, check_clips=8)
    assert r["passed"], r
    props = export.read_onnx_metadata(out)
    assert json.loads(props["labels"]) == tiny_bundle.labels
    assert json.loads(props["frontend"]) == tiny_bundle.frontend.to_dict()
    assert json.loads(props["streamkws.json"])["name"] == tiny_bundle.name
    ort = pytest.importorskip("onnxruntime")
    assert r["max_abs_prob_diff"] is not None and r["max_abs_prob_diff"] <= 1e-4
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["features"]
    # The batch axis is dynamic: all clips at once match the bundle's batch prediction.
    logits = sess.run(None, {"features": clips})[0]
    assert np.abs(softmax(logits) - tiny_bundle.predict(clips)).max() <= 1e-4


def test_dynamic_bundle_exports_float_equivalent_to_onnx(tiny_bundle, small_data, tmp_path,
                                                         caplog) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    meta = {**tiny_bundle.meta, "quantization": {"mode": "dynamic", "dtype": "qint8"}}
    path = tmp_path / "dyn.skw"
    Bundle(quantize_dynamic(tiny_bundle.model), meta).save(path)
    dyn = load_bundle(path)
    with caplog.at_level(logging.WARNING, logger="streamkws.tools.export"):
        r = export.export(dyn, "onnx", tmp_path / "dyn.onnx", check_data=small_data,
                          check_clips=8)
    assert r["passed"] and r["tolerance"] == 1e-2
    assert "float equivalent" in caplog.text


def test_tolerance_violation_fails_and_writes_nothing(tiny_bundle, tmp_path, monkeypatch,
                                                      caplog, capsys) -> None:
    class Off(nn.Module):  # an export that is subtly wrong: logits scaled by 1.5
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x) * 1.5

    real = export.export_module
    monkeypatch.setattr(export, "export_module", lambda m: Off(real(m)).eval())
    out = tmp_path / "bad.pt"
    with caplog.at_level(logging.WARNING, logger="streamkws.tools.export"):
        rc = export.run(parse(["--model", str(tiny_bundle.path), "--format", "torchscript",
                               "--out", str(out), "--no-mobile"]))
    assert rc != 0
    assert not out.exists() and list(tmp_path.iterdir()) == []
    err = capsys.readouterr().err
    assert "differs from the bundle" in err and "not written" in err
    assert "random features" in caplog.text  # no --check-data: warned
