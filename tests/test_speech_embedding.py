"""The speech_embedding architecture: a frozen pretrained backbone, a bridge from our
log-Mel features, and a trained head."""

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from streamkws.bundle import load_bundle, new_bundle
from streamkws.cli import main
from streamkws.errors import StreamKWSError
from streamkws.features import FrontEndConfig, LogMel
from streamkws.models import build_model
from streamkws.models.speech_embedding import (
    EMBED_DIM,
    EMBED_FRAMES,
    EMBED_STARTS,
    backbone_from_onnx,
    embedding_filterbank,
    load_backbone,
)
from streamkws.tools.ensemble import build_ensemble
from streamkws.tools.train import TrainConfig, train

LABELS = ("yes", "no", "_unknown_", "_silence_")


def _onnx_dir() -> Path | None:
    """openWakeWord's feature models: where CI unpacked them, or an installed package."""
    env = os.environ.get("STREAMKWS_EMBEDDING_ONNX_DIR")
    if env:
        return Path(env)  # CI sets it: a missing file there must fail, not skip
    spec = importlib.util.find_spec("openwakeword")
    if spec and spec.submodule_search_locations:
        d = Path(list(spec.submodule_search_locations)[0]) / "resources" / "models"
        if (d / "embedding_model.onnx").is_file():
            return d
    return None


needs_onnx = pytest.mark.skipif(_onnx_dir() is None, reason="openWakeWord's ONNX feature "
                                "models not found (CI unpacks them; see .ci/run)")


@pytest.fixture(scope="module")
def random_backbone(tmp_path_factory) -> Path:
    """A speech_embedding bundle whose backbone is randomly initialised: the weights a test
    run can take its backbone from without openWakeWord's file."""
    torch.manual_seed(0)
    net = build_model("speech_embedding", n_classes=len(LABELS), n_frames=98, n_mels=40)
    fe = FrontEndConfig()
    net.fit_bridge(LogMel(fe))
    b = new_bundle(net, np.zeros(40), np.ones(40), list(LABELS), fe, "random-backbone")
    path = tmp_path_factory.mktemp("backbone") / "random.skw"
    b.save(path)
    return path


@pytest.fixture(scope="module")
def embedding_bundle(random_backbone, small_data, tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("emb") / "emb.skw"
    cfg = TrainConfig(data=[small_data], out=out, arch="speech_embedding",
                      backbone=random_backbone, passes=2, noise=data_dir / "noise",
                      epochs=3, batch_size=32, val_fraction=0.3, seed=1, progress=False,
                      threads=1, labels=LABELS)
    return train(cfg)


@needs_onnx
def test_the_converted_backbone_gives_onnxruntimes_embeddings():
    ort = pytest.importorskip("onnxruntime")
    path = _onnx_dir() / "embedding_model.onnx"
    net = build_model("speech_embedding", n_classes=4, n_frames=98, n_mels=40).eval()
    net.backbone.load_state_dict(backbone_from_onnx(path))
    x = np.random.default_rng(0).normal(1.0, 1.0, size=(8, 76, 32)).astype(np.float32)
    want = ort.InferenceSession(str(path)).run(None, {"input_1": x[..., None]})[0]
    with torch.inference_mode():
        got = net.backbone(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want.reshape(8, EMBED_DIM), atol=1e-3)
    assert np.abs(want).max() > 1  # a real comparison, not of two near-zero outputs
    # The one pass the model makes over a window gives each 80-ms-apart slice's own.
    span = np.random.default_rng(1).normal(1.0, 1.0, size=(2, 92, 32)).astype(np.float32)
    slices = np.concatenate([span[:, s:s + 76] for s in (0, 8, 16)])[..., None]
    want = ort.InferenceSession(str(path)).run(None, {"input_1": slices})[0]
    with torch.inference_mode():
        got = net.backbone.maps(torch.from_numpy(span)).squeeze(3).permute(2, 0, 1)
    np.testing.assert_allclose(got.reshape(6, EMBED_DIM),
                               want.reshape(6, EMBED_DIM), atol=1e-3)


@needs_onnx
def test_the_embeddings_filterbank_is_the_mel_models_own():
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    graph = onnx.load(str(_onnx_dir() / "melspectrogram.onnx")).graph
    mel_w = next(numpy_helper.to_array(i) for i in graph.initializer if i.name == "1.melW")
    np.testing.assert_allclose(embedding_filterbank(), mel_w, rtol=1e-4, atol=1e-7)


def test_one_pass_over_a_window_equals_embedding_each_slice_alone():
    """The window's three embeddings come from one convolutional pass over its 92 frames,
    not three passes over overlapping slices: the same numbers for 40% of the work."""
    torch.manual_seed(0)
    net = build_model("speech_embedding", n_classes=4, n_frames=98, n_mels=40).eval()
    net.fit_bridge(LogMel(FrontEndConfig()))
    x = torch.from_numpy(np.random.default_rng(0).normal(-4, 2, (5, 98, 40)).astype(np.float32))
    with torch.inference_mode():
        m = net.embedding_mels(x)
        alone = torch.stack([net.backbone(m[:, s:s + EMBED_FRAMES]) for s in EMBED_STARTS], 1)
        together = net.embed(x)
    assert together.shape == (5, len(EMBED_STARTS), EMBED_DIM)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    assert alone.std(dim=0).mean() > 0.01  # inputs give different embeddings: a real check


def test_a_file_that_is_not_the_embedding_is_refused_by_name(tmp_path):
    bad = tmp_path / "other.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(StreamKWSError, match="other.onnx"):
        backbone_from_onnx(bad)


def test_the_bridge_is_exact_when_our_bands_are_the_embeddings_own():
    # A front end with the embedding's own bands: the bridge must be the identity, and the
    # embedding's input its dB scale of our power (int16-scaled, 80 dB floor, /10 + 2).
    fe = FrontEndConfig(n_mels=32, f_min=60.0, f_max=3800.0)
    lm = LogMel(fe)
    net = build_model("speech_embedding", n_classes=4, n_frames=98, n_mels=32)
    net.fit_bridge(lm)
    np.testing.assert_allclose(net.bridge.numpy(), np.eye(32), atol=1e-4)
    audio = np.random.default_rng(1).normal(0, 0.05, size=(2, 16000)).astype(np.float32)
    feats = lm(audio)[:, :98]
    power = (np.exp(feats.astype(np.float64)) - fe.log_offset) * 32767.0 ** 2
    db = 10 * np.log10(np.maximum(power, 1e-10))
    want = np.maximum(db, db.max(axis=(1, 2), keepdims=True) - 80) / 10 + 2
    got = net.embedding_mels(torch.from_numpy(feats)).numpy()
    np.testing.assert_allclose(got, want, atol=2e-3)


def test_only_the_head_learns_and_the_bundle_reads_raw_features(embedding_bundle,
                                                                random_backbone):
    source = load_bundle(random_backbone).model.state_dict()
    trained = embedding_bundle.model.state_dict()
    backbone = [k for k in source if ".backbone." in k]
    assert backbone and all(torch.equal(source[k], trained[k]) for k in backbone)
    head = [k for k in source if ".head." in k]
    assert any(not torch.equal(source[k], trained[k]) for k in head)
    assert torch.equal(trained["mean"], torch.zeros(40))  # identity normalisation
    assert torch.equal(trained["inv_std"], torch.ones(40))
    t = embedding_bundle.meta["training"]
    assert t["backbone"] == {"file": "random.skw", "passes": 2, "unfreeze": 0}
    # embedded once: the clean clips and two augmented passes
    assert embedding_bundle.meta["arch"] == "speech_embedding"


def test_unfreeze_trains_the_last_convolutions_too_and_nothing_before_them(
        random_backbone, small_data, tmp_path, data_dir):
    out = tmp_path / "tuned.skw"
    cfg = TrainConfig(data=[small_data], out=out, arch="speech_embedding",
                      backbone=random_backbone, passes=1, unfreeze=2, noise=data_dir / "noise",
                      epochs=2, batch_size=32, val_fraction=0.3, seed=1, progress=False,
                      threads=1, labels=LABELS)
    tuned = train(cfg)
    source = load_bundle(random_backbone).model.net.backbone
    convs = [(a.weight, b.weight) for a, b in zip(source.convs(),
                                                   tuned.model.net.backbone.convs(), strict=True)]
    moved = [not torch.equal(a, b) for a, b in convs]
    assert moved == [False] * 18 + [True, True]  # the last two convolutions, and only they
    assert tuned.meta["training"]["backbone"]["unfreeze"] == 2
    x = np.random.default_rng(0).normal(-6, 2, size=(3, 98, 40)).astype(np.float32)
    np.testing.assert_allclose(load_bundle(out).predict(x), tuned.predict(x), atol=1e-6)


def test_high_bands_feed_the_head_the_bands_the_embedding_cannot_hear(
        random_backbone, small_data, tmp_path, data_dir):
    """With high_bands the head also reads the front end's top bands (80 ms averages); the
    cached examples then hold embeddings and those values, and the bundle predicts from a
    raw window exactly as training saw it."""
    net = build_model("speech_embedding", n_classes=4, n_frames=98, n_mels=40, high_bands=9)
    net.fit_bridge(LogMel(FrontEndConfig()))
    net.eval()
    x = torch.from_numpy(np.random.default_rng(0).normal(-4, 2, (3, 98, 40)).astype(np.float32))
    end = len(net.backbone.layers)
    with torch.inference_mode():
        cached = net.frozen_part(x, end)
        assert cached.shape == (3, 3 * EMBED_DIM + 11 * 9)
        # The side values move with the top bands and with nothing below them.
        y = x.clone()
        y[:, :, :31] += 1.0
        assert torch.equal(net.side(y), net.side(x))
        y[:, :, 31:] += 1.0
        assert not torch.equal(net.side(y), net.side(x))
        torch.testing.assert_close(net.trainable_part(end)(cached), net.body(x.unsqueeze(1)))
    with pytest.raises(StreamKWSError, match="high_bands"):
        build_model("speech_embedding", n_classes=4, n_frames=98, n_mels=40, high_bands=41)
    out = tmp_path / "hb.skw"
    cfg = TrainConfig(data=[small_data], out=out, arch="speech_embedding",
                      arch_kwargs={"high_bands": 9}, backbone=random_backbone, passes=1,
                      noise=data_dir / "noise", epochs=2, batch_size=32, val_fraction=0.3,
                      seed=1, progress=False, threads=1, labels=LABELS)
    trained = train(cfg)
    feats = np.random.default_rng(1).normal(-6, 2, size=(3, 98, 40)).astype(np.float32)
    np.testing.assert_allclose(load_bundle(out).predict(feats), trained.predict(feats),
                               atol=1e-6)


def test_a_trained_embedding_bundle_reloads_and_predicts_the_same(embedding_bundle):
    again = load_bundle(embedding_bundle.path)
    x = np.random.default_rng(2).normal(-5, 2, size=(3, 98, 40)).astype(np.float32)
    np.testing.assert_allclose(again.predict(x), embedding_bundle.predict(x), atol=1e-6)
    assert np.allclose(again.predict(x).sum(axis=1), 1.0, atol=1e-5)


def test_an_embedding_bundle_ensembles_with_a_cnn_of_the_same_split(embedding_bundle,
                                                                     small_data, tmp_path):
    cnn = train(TrainConfig(data=[small_data], out=tmp_path / "cnn.skw", arch="dscnn",
                            arch_kwargs={"channels": 8, "blocks": 1}, epochs=1,
                            batch_size=32, val_fraction=0.3, progress=False, threads=1,
                            labels=LABELS))
    pair = build_ensemble([cnn, embedding_bundle], "pair")
    x = np.random.default_rng(3).normal(-5, 2, size=(4, 98, 40)).astype(np.float32)
    want = (cnn.predict(x) + embedding_bundle.predict(x)) / 2
    np.testing.assert_allclose(pair.predict(x), want, atol=1e-5)


def test_a_new_head_can_take_its_backbone_from_a_trained_bundle(embedding_bundle):
    net = build_model("speech_embedding", n_classes=4, n_frames=98, n_mels=40)
    load_backbone(net, embedding_bundle.path)
    src = embedding_bundle.model.net.backbone.state_dict()
    assert all(torch.equal(v, net.backbone.state_dict()[k]) for k, v in src.items())


def test_backbone_options_are_refused_before_any_data_is_read(random_backbone, tmp_path,
                                                              capsys):
    base = ["train", "--data", str(tmp_path / "no-such-data"), "--out",
            str(tmp_path / "x.skw"), "--quiet"]
    cases = [
        (["--arch", "speech_embedding"], "needs --backbone"),
        (["--arch", "dscnn", "--backbone", str(random_backbone)], "only goes with it"),
        (["--arch", "speech_embedding", "--backbone", str(tmp_path / "none.onnx")],
         "no such file"),
        (["--arch", "speech_embedding", "--backbone", str(random_backbone), "--passes", "0"],
         "--passes must be within"),
        (["--arch", "speech_embedding", "--backbone", str(random_backbone), "--ema", "0.99"],
         "do not apply"),
        (["--arch", "speech_embedding", "--backbone", str(random_backbone), "--unfreeze",
          "10"], "--unfreeze must be within 0..9"),
        (["--arch", "dscnn", "--unfreeze", "2"], "--unfreeze goes with --backbone"),
        (["--arch", "speech_embedding", "--backbone", str(random_backbone), "--unfreeze", "2",
          "--arch-arg", "high_bands=9"], "do not go together"),
    ]
    for extra, message in cases:
        cfg_args = base + extra
        with pytest.raises(StreamKWSError, match=message):
            from streamkws.cli import build_parser
            from streamkws.tools.train import config_from_args

            config_from_args(build_parser().parse_args(cfg_args)).check_backbone()
    assert main(base + ["--arch", "speech_embedding"]) == 2
    assert "needs --backbone" in capsys.readouterr().err


def test_pruning_and_static_quantization_refuse_the_frozen_backbone(embedding_bundle,
                                                                    tmp_path, capsys,
                                                                    small_data):
    assert main(["prune", "--model", str(embedding_bundle.path), "--sparsity", "0.5",
                 "--out", str(tmp_path / "p.skw")]) == 2
    assert "frozen pretrained weights" in capsys.readouterr().err
    # inside an ensemble too: a member is pruned like any network
    build_ensemble([embedding_bundle, embedding_bundle], "pair").save(tmp_path / "pair.skw")
    assert main(["prune", "--model", str(tmp_path / "pair.skw"), "--sparsity", "0.5",
                 "--out", str(tmp_path / "pp.skw")]) == 2
    assert "frozen pretrained weights (speech_embedding)" in capsys.readouterr().err
    assert main(["quantize", "--model", str(embedding_bundle.path), "--mode", "static",
                 "--calibration", str(small_data), "--out", str(tmp_path / "s.skw")]) == 2
    assert "cannot be statically quantized" in capsys.readouterr().err
    assert main(["quantize", "--model", str(embedding_bundle.path), "--mode", "dynamic",
                 "--out", str(tmp_path / "d.skw")]) == 0
    q = load_bundle(tmp_path / "d.skw")
    x = np.random.default_rng(4).normal(-5, 2, size=(2, 98, 40)).astype(np.float32)
    assert np.abs(q.predict(x) - embedding_bundle.predict(x)).max() < 0.05
