"""Ensembles: trained bundles averaged into one model."""

import json

import numpy as np
import pytest

from streamkws.bundle import Bundle, load_bundle
from streamkws.cli import main
from streamkws.errors import StreamKWSError
from streamkws.models import build_model
from streamkws.tools.ensemble import build_ensemble
from streamkws.tools.train import TrainConfig, train

LABELS = ("yes", "no", "_unknown_", "_silence_")


def _config(small_data, tmp_path, name, **kw):
    return TrainConfig(data=[small_data], out=tmp_path / name, arch="dscnn",
                       arch_kwargs={"channels": 8, "blocks": 1}, epochs=1, batch_size=32,
                       val_fraction=0.3, progress=False, threads=1, labels=LABELS, **kw)


@pytest.fixture(scope="module")
def second_member(tmp_path_factory, small_data, tiny_bundle):
    """Another seed of a small network, on the tiny bundle's speaker split."""
    out = tmp_path_factory.mktemp("member")
    cfg = _config(small_data, out, "m2.skw", seed=5)
    return train(cfg)


@pytest.fixture
def windows():
    return np.random.default_rng(0).normal(size=(6, 98, 40)).astype(np.float32) - 5


def test_ensemble_posteriors_are_the_mean_of_its_members(tiny_bundle, second_member, windows):
    ens = build_ensemble([tiny_bundle, second_member], "pair")
    want = (tiny_bundle.predict(windows) + second_member.predict(windows)) / 2
    np.testing.assert_allclose(ens.predict(windows), want, atol=1e-6)
    assert ens.meta["arch"] == "ensemble"
    assert ens.meta["parameters"] == tiny_bundle.meta["parameters"] + \
        second_member.meta["parameters"]
    members = ens.meta["training"]["members"]
    assert [m["sha256"] for m in members] == [tiny_bundle.sha256, second_member.sha256]


def test_ensemble_bundle_reloads_and_quantizes_like_any_model(tiny_bundle, second_member,
                                                              windows, tmp_path, capsys):
    rc = main(["ensemble", "--model", str(tiny_bundle.path), "--model",
               str(second_member.path), "--out", str(tmp_path / "pair.skw")])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["arch"] == "ensemble"
    assert report["members"] == [tiny_bundle.name, second_member.name]
    pair = load_bundle(tmp_path / "pair.skw")
    want = (tiny_bundle.predict(windows) + second_member.predict(windows)) / 2
    np.testing.assert_allclose(pair.predict(windows), want, atol=1e-6)

    assert main(["quantize", "--model", str(tmp_path / "pair.skw"), "--mode", "dynamic",
                 "--out", str(tmp_path / "pair-int8.skw")]) == 0
    q = load_bundle(tmp_path / "pair-int8.skw")
    assert q.quantization == "dynamic"
    assert np.abs(q.predict(windows) - want).max() < 0.05


def test_ensemble_quantizes_statically_member_by_member(tiny_bundle, second_member, windows,
                                                        small_data, tmp_path):
    from streamkws.tools.quantize import quantize

    pair = build_ensemble([tiny_bundle, second_member], "pair")
    pair.save(tmp_path / "pair.skw")
    q = quantize(load_bundle(tmp_path / "pair.skw"), "static", calibration=small_data,
                 name="pair-static")
    q.save(tmp_path / "pair-static.skw")
    loaded = load_bundle(tmp_path / "pair-static.skw")
    np.testing.assert_allclose(loaded.predict(windows), q.predict(windows), atol=1e-6)
    assert (loaded.predict(windows).argmax(1) == pair.predict(windows).argmax(1)).mean() >= 0.5


def _with_training(b: Bundle, **changes) -> Bundle:
    return Bundle(b.model, {**b.meta, "training": {**b.meta["training"], **changes}},
                  b.path, b.sha256)


def test_ensemble_keeps_its_members_split_seed_even_from_bundles_that_predate_it(
        tiny_bundle, second_member):
    """Older bundles record only ``seed``, which was also their split seed; the ensemble's
    own ``seed`` is the list of its members' seeds and must not stand in for it."""
    old = Bundle(tiny_bundle.model, {**tiny_bundle.meta, "training": {
        k: v for k, v in tiny_bundle.meta["training"].items() if k != "split_seed"}},
        tiny_bundle.path, tiny_bundle.sha256)
    old.meta["training"]["seed"] = tiny_bundle.split_seed
    pair = build_ensemble([old, second_member], "pair")
    assert pair.split_seed == tiny_bundle.split_seed == second_member.split_seed == 0
    assert pair.meta["training"]["seed"] == [0, 5]


def test_ensemble_refuses_a_member_trained_on_another_speaker_split(tiny_bundle,
                                                                    second_member):
    other = _with_training(second_member, split_seed=3)
    with pytest.raises(StreamKWSError, match="another speaker split.*--split-seed"):
        build_ensemble([tiny_bundle, other], "pair")


def test_ensemble_refuses_quantized_members_other_labels_and_a_single_model(
        tiny_bundle, second_member):
    q = Bundle(second_member.model, {**second_member.meta,
                                     "quantization": {"mode": "dynamic"}})
    with pytest.raises(StreamKWSError, match="must be float models"):
        build_ensemble([tiny_bundle, q], "pair")
    relabelled = Bundle(second_member.model, {**second_member.meta,
                                              "labels": list(reversed(LABELS))})
    with pytest.raises(StreamKWSError, match="labels"):
        build_ensemble([tiny_bundle, relabelled], "pair")
    with pytest.raises(StreamKWSError, match="two or more"):
        build_ensemble([tiny_bundle], "pair")


def test_ensemble_refuses_a_member_that_hears_other_features(tiny_bundle, second_member):
    other = Bundle(second_member.model, {**second_member.meta, "frontend": {
        **second_member.meta["frontend"], "f_max": 7000.0}})
    with pytest.raises(StreamKWSError, match="front-end settings differ from the first"):
        build_ensemble([tiny_bundle, other], "pair")


def test_teachers_and_members_answer_to_one_compatibility_rule(tiny_bundle, second_member):
    """Labels first, then features, then (when asked) the held-out speakers."""
    b = second_member
    assert b.mismatch(tiny_bundle.labels, tiny_bundle.frontend, tiny_bundle.speaker_split) \
        is None
    assert "labels" in b.mismatch(list(reversed(LABELS)), tiny_bundle.frontend)
    other_fe = type(b.frontend)(**{**b.frontend.to_dict(), "n_mels": 32})
    assert "front-end" in b.mismatch(b.labels, other_fe)
    split = {**b.speaker_split, "split_seed": 9}
    assert b.mismatch(b.labels, b.frontend) is None  # split not asked
    assert "another speaker split" in b.mismatch(b.labels, b.frontend, split)


def test_an_ensemble_is_built_from_bundles_not_trained(capsys, small_data, tmp_path):
    with pytest.raises(StreamKWSError, match="streamkws ensemble"):
        build_model("ensemble", n_classes=4, n_frames=98, n_mels=40)
    rc = main(["train", "--data", str(small_data), "--arch", "ensemble", "--epochs", "1",
               "--out", str(tmp_path / "x.skw"), "--quiet"])
    assert rc == 2
    assert "streamkws ensemble" in capsys.readouterr().err


def _warped_mean(bundles, windows, factors):
    """The specification, in numpy: every member on every warp of the windows, averaged."""
    from streamkws.features import mel_centres_hz, warp_bands

    centres = mel_centres_hz(bundles[0].frontend)
    outs = []
    for f in factors:
        lo, hi, w = warp_bands(centres, f)
        outs += [b.predict(windows[..., lo] * (1 - w) + windows[..., hi] * w) for b in bundles]
    return np.mean(outs, axis=0)


def test_a_warped_ensemble_averages_every_member_over_every_warp_of_the_window(
        tiny_bundle, second_member, windows):
    from streamkws.features import warp_factors

    pair = build_ensemble([tiny_bundle, second_member], "pair", warp=(0.15, 5))
    factors = warp_factors(0.15, 5)
    assert factors[2] == pytest.approx(1.0)
    assert factors[0] == pytest.approx(1 / 1.15) and factors[-1] == pytest.approx(1.15)
    np.testing.assert_allclose(pair.predict(windows),
                               _warped_mean([tiny_bundle, second_member], windows, factors),
                               atol=1e-6)
    # Not the plain mean: the warps change what the members hear (these one-epoch members
    # are close to uniform, so the change is small, but far above the tolerance above).
    assert np.abs(pair.predict(windows) - build_ensemble(
        [tiny_bundle, second_member], "plain").predict(windows)).max() > 5e-5
    assert pair.meta["training"]["warp"] == {
        "range": 0.15, "count": 5, "factors": [round(f, 4) for f in factors]}
    # One window alone gets the same answer as in a batch.
    np.testing.assert_allclose(pair.predict(windows[3]), pair.predict(windows)[3], atol=1e-6)


def test_one_member_averaged_over_warps_is_a_model_that_reloads_and_quantizes(
        tiny_bundle, windows, tmp_path, capsys):
    from streamkws.features import warp_factors

    rc = main(["ensemble", "--model", str(tiny_bundle.path), "--warp", "0.1:3",
               "--out", str(tmp_path / "warped.skw")])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["members"] == [tiny_bundle.name]
    warped = load_bundle(tmp_path / "warped.skw")
    want = _warped_mean([tiny_bundle], windows, warp_factors(0.1, 3))
    np.testing.assert_allclose(warped.predict(windows), want, atol=1e-6)
    assert main(["quantize", "--model", str(tmp_path / "warped.skw"), "--mode", "dynamic",
                 "--out", str(tmp_path / "warped-int8.skw")]) == 0
    q = load_bundle(tmp_path / "warped-int8.skw")
    assert q.meta["arch_kwargs"]["warp_factors"] == warped.meta["arch_kwargs"]["warp_factors"]
    assert np.abs(q.predict(windows) - want).max() < 0.05


@pytest.mark.parametrize("warp", ["0", "0.5:5", "0.1:1", "0.1:12", "wide", "0.1:x", "-0.1:3"])
def test_a_warp_outside_its_rule_is_one_line_naming_the_rule(tiny_bundle, tmp_path, capsys,
                                                             warp):
    rc = main(["ensemble", "--model", str(tiny_bundle.path), f"--warp={warp}",
               "--out", str(tmp_path / "w.skw")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "expected R:N" in err
    assert not (tmp_path / "w.skw").exists()


def test_warp_options_that_a_bundle_could_carry_wrongly_are_refused_by_name():
    spec = [{"arch": "dscnn", "arch_kwargs": {"n_classes": 4, "n_frames": 98, "n_mels": 40}}]
    centres = [float(100 + 50 * i) for i in range(40)]
    with pytest.raises(StreamKWSError, match="warp_factors"):
        build_model("ensemble", n_classes=4, n_frames=98, n_mels=40, members=spec,
                    warp_factors=[1.0], band_centres_hz=centres)
    with pytest.raises(StreamKWSError, match="band_centres_hz"):
        build_model("ensemble", n_classes=4, n_frames=98, n_mels=40, members=spec,
                    warp_factors=[0.9, 1.1], band_centres_hz=centres[:32])
    with pytest.raises(StreamKWSError, match="band_centres_hz"):
        build_model("ensemble", n_classes=4, n_frames=98, n_mels=40, members=spec,
                    warp_factors=[0.9, 1.1], band_centres_hz=centres[::-1])
    with pytest.raises(StreamKWSError, match="two or more members"):
        build_model("ensemble", n_classes=4, n_frames=98, n_mels=40, members=spec)


def test_the_same_model_twice_is_built_but_not_in_silence(tiny_bundle, second_member,
                                                          tmp_path, capsys, caplog):
    import shutil

    copy = tmp_path / "copy.skw"
    shutil.copy(tiny_bundle.path, copy)
    args = ["ensemble", "--model", str(tiny_bundle.path), "--model", str(second_member.path),
            "--model", str(copy), "--out", str(tmp_path / "e.skw")]
    assert main(args) == 0
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert said == [f"--model {copy} is the same model as {tiny_bundle.path}: it counts "
                    "twice in the mean"]
    assert len(json.loads(capsys.readouterr().out)["members"]) == 3
