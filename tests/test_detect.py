"""Smoothing and decisions: one detection per utterance, thresholds, refractory period."""

import numpy as np
import pytest

from streamkws.config import DetectConfig
from streamkws.detect import Smoother
from streamkws.errors import ConfigError

LABELS = ["yes", "no", "_unknown_", "_silence_"]
HOP, SPAN = 1600, 15920


def probs(**p: float) -> np.ndarray:
    v = np.array([p.get("yes", 0.0), p.get("no", 0.0), p.get("unknown", 0.0), 0.0])
    v[3] = max(0.0, 1.0 - v.sum())
    return v


def feed(sm: Smoother, seq: list[np.ndarray | None], first: int = 0):
    out = []
    for k, p in enumerate(seq):
        start = (first + k) * HOP
        d = sm.push(p, start, start + SPAN)
        if d is not None:
            out.append((first + k, d))
    return out


def test_one_utterance_seen_by_many_windows_fires_once():
    sm = Smoother(LABELS, DetectConfig(threshold=0.6, average_windows=2, min_windows=2))
    seq = [probs()] * 3 + [probs(yes=0.9)] * 8 + [probs()] * 5
    (k, d), = feed(sm, seq)
    assert d.keyword == "yes" and d.score == pytest.approx(0.9)
    # Averaged over 2 windows, the first 0.9 reads 0.45; windows 4 and 5 are above.
    assert k == 5
    assert d.emit == 5 * HOP + SPAN


def test_the_span_is_where_the_firing_windows_overlap():
    sm = Smoother(LABELS, DetectConfig(threshold=0.6, average_windows=1, min_windows=3))
    (_, d), = feed(sm, [probs()] * 2 + [probs(yes=0.95)] * 4)
    assert (d.start, d.end) == (4 * HOP, 2 * HOP + SPAN)


def test_a_single_spike_is_not_enough_with_min_windows():
    sm = Smoother(LABELS, DetectConfig(threshold=0.5, average_windows=1, min_windows=2))
    assert feed(sm, [probs(), probs(yes=0.99), probs(), probs(yes=0.99), probs()]) == []


def test_averaging_suppresses_isolated_high_windows():
    sm = Smoother(LABELS, DetectConfig(threshold=0.7, average_windows=4, min_windows=1))
    assert feed(sm, [probs(), probs(), probs(yes=0.95), probs(), probs()]) == []


def test_per_keyword_thresholds():
    cfg = DetectConfig(threshold=0.5, thresholds={"yes": 0.95}, average_windows=1,
                       min_windows=1)
    hits = feed(Smoother(LABELS, cfg), [probs(yes=0.9)] * 3 + [probs()] + [probs(no=0.9)] * 3)
    assert [d.keyword for _, d in hits] == ["no"]


def test_refractory_period_blocks_a_quick_repeat_of_the_same_keyword():
    cfg = DetectConfig(threshold=0.5, average_windows=1, min_windows=1, refractory_ms=1000)
    seq = [probs(yes=0.9)] * 2 + [probs()] * 3 + [probs(yes=0.9)] * 2 + [probs()] * 8 + \
        [probs(yes=0.9)] * 2
    hits = feed(Smoother(LABELS, cfg), seq)
    # 0.5 s later is inside the refractory second; 1.5 s later is a new utterance.
    assert [k for k, _ in hits] == [0, 15]


def test_rival_keywords_do_not_fire_inside_the_same_utterance():
    cfg = DetectConfig(threshold=0.4, average_windows=1, min_windows=1, refractory_ms=0)
    seq = [probs(yes=0.8, no=0.1), probs(yes=0.45, no=0.5), probs(yes=0.1, no=0.85), probs()]
    assert [d.keyword for _, d in feed(Smoother(LABELS, cfg), seq)] == ["yes"]


def test_silence_and_unknown_never_publish():
    sm = Smoother(LABELS, DetectConfig(threshold=0.3, average_windows=1, min_windows=1))
    assert feed(sm, [probs(unknown=0.99)] * 5 + [probs()] * 5) == []


def test_closed_gate_windows_count_as_no_evidence():
    sm = Smoother(LABELS, DetectConfig(threshold=0.6, average_windows=2, min_windows=2))
    assert feed(sm, [probs(yes=0.9), None, probs(yes=0.9), None, probs(yes=0.9)]) == []


def test_threshold_for_a_keyword_the_model_lacks_names_the_key():
    with pytest.raises(ConfigError, match=r"detect\.thresholds\.hello"):
        Smoother(LABELS, DetectConfig(thresholds={"hello": 0.9}))


def test_an_unset_threshold_is_the_models_calibrated_one_else_0_75():
    assert DetectConfig().for_model(0.62).threshold == 0.62
    assert DetectConfig().for_model(None).threshold == 0.75
    assert DetectConfig(threshold=0.8).for_model(0.62).threshold == 0.8  # the config wins
    # Used without a model (tools, tests), the smoother falls back to 0.75 as well.
    assert Smoother(LABELS, DetectConfig()).thresholds.tolist() == [0.75, 0.75]


def test_the_log_says_which_threshold_is_in_force_and_where_it_comes_from():
    assert DetectConfig().describe(0.64) == "threshold 0.64 (calibrated in the model)"
    assert DetectConfig().describe(None) == "threshold 0.75 (built-in default)"
    own = DetectConfig(threshold=0.8, thresholds={"yes": 0.9, "go": 0.7})
    assert own.describe(0.64) == "threshold 0.8 (the config's), per keyword go 0.7, yes 0.9"


def test_the_daemon_uses_a_bundles_calibrated_threshold_unless_the_config_sets_one(tmp_path):
    from streamkws.bundle import load_bundle
    from streamkws.config import Config
    from streamkws.daemon import Pipeline

    b = load_bundle("default")
    b.meta["detect"] = {"threshold": 0.6}
    b.save(tmp_path / "calibrated.skw")
    b = load_bundle(tmp_path / "calibrated.skw")  # the threshold survives saving
    assert b.threshold == 0.6
    kws = len(b.labels) - 2
    assert Pipeline(Config(), b).smoother.thresholds.tolist() == [0.6] * kws
    own = Config().replace(detect=DetectConfig(threshold=0.8, thresholds={"yes": 0.9}))
    assert Pipeline(own, b).smoother.thresholds.tolist() == [0.9] + [0.8] * (kws - 1)
    del b.meta["detect"]
    b.save(tmp_path / "uncalibrated.skw")
    plain = load_bundle(tmp_path / "uncalibrated.skw")
    assert Pipeline(Config(), plain).smoother.thresholds.tolist() == [0.75] * kws


@pytest.mark.parametrize("bad", [0.0, 1.5, "0.6", True])
def test_a_bundle_with_a_nonsense_threshold_is_refused_by_name(tmp_path, bad):
    from streamkws.bundle import load_bundle
    from streamkws.config import Config
    from streamkws.daemon import Pipeline
    from streamkws.errors import StreamKWSError

    b = load_bundle("default")
    b.meta["detect"] = {"threshold": bad}
    b.save(tmp_path / "bad.skw")
    with pytest.raises(StreamKWSError, match=r"bad\.skw: calibrated threshold must be within"):
        Pipeline(Config(), load_bundle(tmp_path / "bad.skw"))


def test_an_unset_threshold_survives_a_written_config(tmp_path):
    from streamkws.config import Config, dumps, load

    (tmp_path / "c.toml").write_text(dumps(Config()))
    assert load(tmp_path / "c.toml").detect.threshold is None
