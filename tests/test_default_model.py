"""The models shipped in the package: what every user meets first."""

import json
import re

import numpy as np
import pytest

from streamkws.bundle import BUNDLED_DIR, load_bundle
from streamkws.cli import main
from streamkws.data import DEFAULT_LABELS
from streamkws.features import FrontEndConfig
from streamkws.tools.make_default import distillation_note


def test_default_is_int8_small_and_has_the_twelve_classes():
    b = load_bundle("default")
    assert b.labels == list(DEFAULT_LABELS)
    assert b.quantization == "dynamic"
    assert any("quantized" in type(m).__module__ for m in b.model.modules())
    assert (BUNDLED_DIR / "default.skw").stat().st_size <= 300 * 1024
    assert b.frontend == FrontEndConfig()


def test_default_float_is_the_same_network_unquantized():
    f, q = load_bundle("default-float"), load_bundle("default")
    assert f.quantization == "none" and f.meta["arch"] == q.meta["arch"]
    x = np.random.default_rng(0).normal(-6, 2, size=(8, 98, 40)).astype(np.float32)
    assert np.abs(f.predict(x) - q.predict(x)).max() < 0.05


def test_the_model_card_states_the_validation_figures():
    card = (BUNDLED_DIR / "MODEL_CARD.md").read_text()
    acc = load_bundle("default").meta["metrics"]["validation"]["accuracy"]
    assert f"{acc:.4f}" in card and "CC BY 4.0" in card


def test_the_stored_thresholds_keep_within_one_false_alarm_per_5_min_at_90_percent():
    """The cards are regenerated whenever a model or the rule changes: a threshold whose
    calibration no longer meets the rule fails here."""
    from streamkws.tools.calibration import FA_BUDGET_PER_5_MIN, poisson_upper

    for name in ("default", "accurate"):
        b = load_bundle(name)
        cal = b.meta["detect"]["calibration"]
        false, minutes = (float(x) for x in re.search(r"(\d+) false in ([\d.]+) min",
                                                       cal).groups())
        assert poisson_upper(int(false)) / minutes * 5 <= FA_BUDGET_PER_5_MIN, (name, cal)


def test_accurate_is_the_default_network_paired_with_a_speech_embedding_head():
    a, f = load_bundle("accurate"), load_bundle("default-float")
    assert a.meta["arch"] == "ensemble" and a.quantization == "dynamic"
    assert [m["arch"] for m in a.meta["arch_kwargs"]["members"]] == [f.meta["arch"],
                                                                     "speech_embedding"]
    assert a.labels == f.labels and a.frontend == f.frontend
    assert a.meta["training"]["members"][0]["sha256"] == f.sha256
    assert (BUNDLED_DIR / "accurate.skw").stat().st_size <= 2 * 1024 * 1024


@pytest.mark.parametrize("name, card", [("default", "MODEL_CARD.md"),
                                        ("default-float", "MODEL_CARD.md"),
                                        ("accurate", "MODEL_CARD-accurate.md")])
def test_a_shipped_model_carries_the_threshold_its_card_calibrates(name, card):
    thr = load_bundle(name).threshold
    assert thr is not None and 0.5 <= thr <= 0.98
    text = (BUNDLED_DIR / card).read_text()
    assert f"`detect.threshold` **{thr}**" in text and f"| {thr:.2f} (stored) |" in text
    assert "90% upper limit" in text
    # The contract: a bundle holds its metrics; the card quotes the same accuracy.
    v = load_bundle(name).meta["metrics"]["validation"]
    assert 0.9 < v["accuracy"] <= 1 and v["n"] > 600 and set(v["recall"]) == set(
        load_bundle(name).labels)
    assert f"{v['accuracy']:.4f}" in text


def test_accurate_peaks_lower_than_default_and_says_whose_weights_it_holds():
    """A mean of two opinions peaks lower than one network's: its threshold travels with it."""
    assert load_bundle("accurate").threshold < load_bundle("default").threshold
    assert "Apache License 2.0" in (BUNDLED_DIR / "MODEL_CARD-accurate.md").read_text()


def test_the_calibration_takes_the_most_recall_surely_within_budget_and_the_higher_of_ties():
    from streamkws.errors import StreamKWSError
    from streamkws.tools.calibration import choose_threshold

    # 30 min of other audio: 3 false alarms are 0.5 per 5 min on average, but a rate of
    # 1.1 is as likely to have given them; 2 stay under one per 5 min with 90 % confidence.
    rows = [(0.5, 0.95, 95, 100, 9, 30.0), (0.6, 0.92, 92, 100, 3, 30.0),
            (0.62, 0.9, 90, 100, 2, 30.0), (0.64, 0.9, 90, 100, 1, 30.0),
            (0.7, 0.8, 80, 100, 0, 30.0)]
    assert choose_threshold(rows)[0] == 0.64
    with pytest.raises(StreamKWSError, match="no threshold"):
        choose_threshold(rows[:2])
    # Ten minutes cannot show a rate under one per 5 min, even with no false alarm at all.
    with pytest.raises(StreamKWSError, match="takes 11.5 min"):
        choose_threshold([(0.9, 0.5, 50, 100, 0, 10.0)])


def test_the_poisson_upper_limit_matches_its_tables():
    from streamkws.tools.calibration import poisson_upper

    # chi-square tables: half the 90 % point with 2k + 2 degrees of freedom
    for k, table in [(0, 2.3026), (1, 3.8897), (2, 5.3223), (3, 6.6808), (10, 15.4066),
                     (800, 837.478)]:  # past where exp(-mean) underflows
        assert poisson_upper(k) == pytest.approx(table, abs=1e-3)


def test_the_card_names_the_teacher_of_a_distilled_model_and_nothing_otherwise():
    t = {"teacher": {"name": "four-seeds", "arch": "ensemble", "sha256": "9cf7f73d732c" + "0" * 52,
                     "weight": 0.5}}
    note = distillation_note(t)
    assert "Distilled from `four-seeds` (architecture ensemble, sha256 9cf7f73d732c)" in note
    assert "50% the label and 50% the teacher's" in note
    assert distillation_note({}) == ""


def test_evaluate_default_on_the_real_test_layout(speech_dir, capsys):
    assert main(["evaluate", "--model", "default", "--data", str(speech_dir), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["n"] == 3624 and m["labels"] == list(DEFAULT_LABELS)
    # Most of these clips were trained on; far below this would mean a broken bundle.
    assert m["accuracy"] > 0.85


@pytest.mark.parametrize("word", ["yes", "stop", "left"])
def test_held_out_speakers_are_recognised(speech_dir, word):
    """Clips of speakers in the model's validation split, never trained on."""
    from streamkws.data import load_dataset, speaker_split
    from streamkws.tools.predict import predict_files

    _, val = speaker_split(load_dataset(speech_dir), 0.15, 0)
    paths = [it.path for it in val.items if it.label == word][:10]
    preds, errors = predict_files(load_bundle("default"), paths)
    assert not errors
    assert sum(p.label == word for p in preds) >= 7
