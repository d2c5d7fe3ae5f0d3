"""``streamkws stream-eval``: the daemon's own pipeline, scored on long labelled recordings."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from streamkws.bundle import load_bundle
from streamkws.config import Config, dumps, load, parse
from streamkws.detect import Detection
from streamkws.tools import stream_eval as se
from tests.e2e import Subscriber, free_port


def streamkws(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamkws", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def recording(data_dir, tmp_path_factory) -> Path:
    """~1.5 min of held-out speakers: 3 of each keyword, 10 other words, real noise."""
    out = tmp_path_factory.mktemp("se") / "rec.wav"
    r = streamkws("stream-eval", str(out), "--build", "--data",
                  str(data_dir / "speech_commands_v2_real"), "--noise", str(data_dir / "noise"),
                  "--speakers", "heldout", "--per-keyword", "3", "--unknown", "10", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["keyword_utterances"] == 30 and info["other_words"] == 10
    return out


@pytest.fixture(scope="module")
def pipeline_run(recording):
    cfg = Config().validate()
    run = se.run_pipeline(cfg, load_bundle("default"), recording, progress=False)
    return cfg, run, se.read_labels(recording.with_suffix(".csv"))


def test_build_writes_a_label_row_for_every_keyword_utterance_and_none_for_other_words(recording):
    rows = se.read_labels(recording.with_suffix(".csv"))
    assert len(rows) == 30
    assert {r.keyword for r in rows} == set(load_bundle("default").labels) - {"_silence_",
                                                                               "_unknown_"}
    assert all(0 < r.start < r.end for r in rows)
    assert all(a.end < b.start for a, b in zip(rows, rows[1:], strict=False))


def test_re_deciding_the_trace_reproduces_the_pipeline_detections_exactly(pipeline_run):
    cfg, run, _ = pipeline_run
    assert run.detections, "the default model should detect something on held-out speech"
    assert se.decide(run, cfg.detect) == run.detections


def test_a_higher_threshold_never_adds_detections(pipeline_run):
    cfg, run, _ = pipeline_run
    counts = [len(se.decide(run, dataclasses.replace(cfg.detect, threshold=t)))
              for t in (0.5, 0.8, 0.95)]
    assert counts == sorted(counts, reverse=True)


def test_pooling_a_recording_with_itself_doubles_every_count_at_every_threshold(pipeline_run):
    """Calibration pools several streams' counts, so its confidence rule sees all the audio."""
    cfg, run, truth = pipeline_run
    points = se.sweep(run, truth, cfg.detect, (0.5, 0.8, 0.95))
    assert [t for t, _ in points] == [0.5, 0.8, 0.95]
    for (t, s), pooled in zip(points, se.pool([points, points]), strict=True):
        o = s["overall"]
        assert pooled == (t, 2 * o["hits"], 2 * o["utterances"], 2 * o["false_alarms"],
                          2 * s["non_keyword_hours"] * 60.0)
    assert points[0][1]["overall"]["hits"] > 0, "the default model finds held-out keywords"


def test_pooling_refuses_sweeps_over_different_thresholds():
    """Summing counts decided at different thresholds would describe no threshold at all."""
    with pytest.raises(ValueError, match="different thresholds"):
        se.pool([[(0.5, {})], [(0.6, {})]])
    with pytest.raises(ValueError):
        se.pool([[(0.5, {})], []])


def det(keyword: str, t0: float, t1: float, emit: float) -> Detection:
    return Detection(keyword, 0.9, int(t0 * 16000), int(t1 * 16000), int(emit * 16000))


def test_scoring_counts_hits_duplicates_substitutions_and_false_alarms():
    truth = [se.Utterance("yes", 10.0, 10.6), se.Utterance("no", 20.0, 20.5),
             se.Utterance("marvin", 30.0, 30.5)]
    detections = [
        det("yes", 9.9, 10.4, 10.7),   # hit, decided 100 ms after the word ended
        det("yes", 10.2, 10.5, 10.9),  # the same utterance again: a duplicate
        det("up", 20.1, 20.4, 20.6),   # wrong keyword on "no": a false alarm for "up"
        det("go", 30.1, 30.4, 30.6),   # on a word that is not a keyword: a false alarm
    ]
    s = se.score(detections, truth, ["yes", "no", "up", "go"], duration_s=3600.0 + 1.1)
    o = s["overall"]
    assert (o["utterances"], o["hits"], o["duplicates"], o["false_alarms"]) == (2, 1, 1, 2)
    assert o["recall"] == 0.5 and o["frr"] == 0.5
    # False alarms per hour of audio outside keyword utterances (exactly one hour here).
    assert o["fa_per_hour"] == pytest.approx(2.0)
    assert s["per_keyword"]["yes"]["latency_ms"]["p50"] == pytest.approx(100.0, abs=0.1)
    assert s["per_keyword"]["up"]["false_alarms"] == 1
    assert s["per_keyword"]["no"]["recall"] == 0.0
    assert [m["keyword"] for m in o["missed"]] == ["no"]
    assert s["per_keyword"]["yes"]["duplicates"] == 1 and s["per_keyword"]["no"]["duplicates"] == 0


def test_the_order_of_detections_cannot_change_which_utterances_are_hit():
    """Two close utterances of one word: a detection spanning both must take the one not
    yet hit, whichever detection comes first."""
    truth = [se.Utterance("yes", 10.0, 11.0), se.Utterance("yes", 11.5, 12.5)]
    short, wide = det("yes", 10.2, 10.8, 11.0), det("yes", 10.5, 12.0, 12.6)
    for order in ([short, wide], [wide, short]):
        o = se.score(order, truth, ["yes"], duration_s=60.0)["overall"]
        assert (o["hits"], o["duplicates"], o["false_alarms"]) == (2, 0, 0), order


def test_published_detections_score_as_the_pipeline_detections_do():
    """The end-to-end tests score what subscribers receive (seconds), stream-eval scores the
    pipeline's own detections (samples): one matching rule decides both."""
    from streamkws.tools.streams import Placed, score

    words = [("yes", 10.0, 10.6), ("no", 20.0, 20.5), ("marvin", 30.0, 30.5),
             ("up", 40.0, 40.4)]
    detections = [det("yes", 9.9, 10.4, 10.7), det("yes", 10.2, 10.5, 10.9),
                  det("up", 20.1, 20.4, 20.6), det("go", 30.1, 30.4, 30.6),
                  det("up", 40.4, 40.9, 41.0)]  # starts as "up" ends: no overlap, false
    published = [{"keyword": d.keyword, "t_start": d.start / 16000, "t_end": d.end / 16000}
                 for d in detections]
    e2e = score(published, [Placed(w, a, b, "") for w, a, b in words], ["yes", "no", "up", "go"])
    ev = se.score(detections, [se.Utterance(*w) for w in words], ["yes", "no", "up", "go"],
                  duration_s=60.0)["overall"]
    assert (e2e["hits"], e2e["duplicates"], len(e2e["false"])) == \
        (ev["hits"], ev["duplicates"], ev["false_alarms"]) == (1, 1, 3)
    assert [p.word for p in e2e["missed"]] == [m["keyword"] for m in ev["missed"]] == ["no", "up"]


def test_stream_eval_reports_what_the_daemon_publishes_on_the_same_recording(recording,
                                                                             tmp_path):
    """Same pipeline code: the detections stream-eval counts are the daemon's, to the ms."""
    plot = tmp_path / "det.png"
    r = streamkws("stream-eval", str(recording), "--json", "--plot", str(plot))
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    sub = Subscriber(endpoint, timeout=120)
    sub.start()
    daemon = subprocess.run(
        [sys.executable, "-m", "streamkws", "run", "--source", f"wav:{recording}", "--fast",
         "--quiet", "--publish", endpoint, "--wait-subscribers", "1"],
        capture_output=True, text=True, timeout=120)
    sub.join(30)
    assert daemon.returncode == 0, daemon.stderr
    published = [(d["keyword"], d["t_start"], d["t_end"], d["t_emit"])
                 for d in sub.detections()]
    counted = [(d["keyword"], d["t_start"], d["t_end"], d["t_emit"])
               for d in report["detections"]]
    assert counted == published
    o = report["overall"]
    assert o["hits"] == sum(v["hits"] for v in report["per_keyword"].values())
    assert o["recall"] == pytest.approx(o["hits"] / o["utterances"], abs=1e-4)
    assert len(report["detections"]) == o["hits"] + o["false_alarms"] + o["duplicates"]
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"
    frr = [p["frr"] for p in report["det"]]
    fa = [p["fa_per_hour"] for p in report["det"]]
    # Raising the threshold trades false alarms for misses.
    assert fa[0] >= fa[-1] and frr[-1] >= frr[0]


def test_calibration_writes_thresholds_that_meet_the_budget_on_the_negative_recording(
        data_dir, tmp_path):
    neg = tmp_path / "neg.wav"
    r = streamkws("stream-eval", str(neg), "--build", "--negative", "--data",
                  str(data_dir / "speech_commands_v2_real"), "--noise",
                  str(data_dir / "noise"), "--unknown", "60", "--gap", "0.5:1.0")
    assert r.returncode == 0, r.stderr
    tuned = tmp_path / "tuned.toml"
    r = streamkws("stream-eval", str(neg), "--negative", "--target-fa-per-hour", "20",
                  "--write-config", str(tuned), "--json")
    assert r.returncode == 0, r.stderr
    # A few minutes cannot measure 20 per hour: "met" only says none were heard, and it
    # is said.
    assert "where one false alarm is already" in r.stderr
    assert "; 9 min or more of it (three false alarms' worth) measures it" in r.stderr
    report = json.loads(r.stdout)
    cal = report["calibration"]
    cfg = load(tuned)  # the daemon's own loader accepts the file
    assert cfg.detect.thresholds == cal["thresholds"]
    assert cfg.detect.calibrated_for == report["model_sha256"][:12]  # for which model
    assert set(cal["thresholds"]) == set(report["per_keyword"])
    assert all(0.5 <= t <= 1.0 for t in cal["thresholds"].values())
    assert cal["met"] and cal["overall"]["fa_per_hour"] <= 20
    # Evaluated again as the daemon will run it, the tuned config keeps within budget.
    r = streamkws("stream-eval", str(neg), "--negative", "--config", str(tuned), "--json")
    again = json.loads(r.stdout)
    assert again["overall"]["fa_per_hour"] <= 20
    assert again["overall"]["false_alarms"] <= report["overall"]["false_alarms"]
    r = streamkws("stream-eval", str(neg), "--negative", "--target-fa-per-hour", "1000",
                  "--json")
    assert r.returncode == 0 and "false alarm is already" not in r.stderr, r.stderr


def test_calibrated_thresholds_are_the_lowest_that_fit_each_keywords_share(pipeline_run):
    cfg, run, truth = pipeline_run
    cal = se.calibrate(run, truth, cfg.detect, target_fa_per_hour=1e-6, progress=False)
    grid = [t for t in se.THRESHOLDS if t >= 0.5]
    for kw, t in cal["thresholds"].items():
        fa = se._keyword_false_alarms(run, truth, cfg.detect, kw, t)
        assert fa == 0 or t == grid[-1]
        if t > grid[0] and fa == 0:  # one step lower would have raised a false alarm
            lower = grid[grid.index(t) - 1]
            assert se._keyword_false_alarms(run, truth, cfg.detect, kw, lower) > 0


def test_config_dump_reads_back_to_the_same_config():
    cfg = Config().validate()
    cfg = cfg.replace(detect=dataclasses.replace(cfg.detect, thresholds={"yes": 0.91, "go": 0.7}))
    import tomllib

    assert parse(tomllib.loads(dumps(cfg, header="a\nb"))) == cfg


@pytest.mark.parametrize("content, message", [
    ("word,begin\nyes,1\n", "needs a header 'keyword,start,end'"),
    ("keyword,start,end\nyes,abc,2\n", ":2: expected keyword,start,end"),
    ("keyword,start,end\nyes,3,2\n", "0 <= start < end (got 'yes', 3, 2)"),
])
def test_a_bad_label_file_is_one_error_line_naming_the_file(recording, tmp_path, content,
                                                            message):
    labels = tmp_path / "bad.csv"
    labels.write_text(content)
    r = streamkws("stream-eval", str(recording), "--labels", str(labels))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and message in r.stderr and str(labels) in r.stderr


def test_a_recording_without_labels_needs_negative(tmp_path, recording):
    lone = tmp_path / "lone.wav"
    lone.write_bytes(recording.read_bytes())
    r = streamkws("stream-eval", str(lone))
    assert r.returncode == 2 and "--negative" in r.stderr


def test_stream_eval_refuses_to_write_over_its_inputs_or_into_the_data_set(recording, data_dir,
                                                                          tmp_path):
    before = recording.read_bytes()
    r = streamkws("stream-eval", str(recording), "--target-fa-per-hour", "1",
                  "--write-config", str(recording))
    assert r.returncode == 2 and "--write-config" in r.stderr
    assert recording.read_bytes() == before
    clips = data_dir / "speech_commands_v2_real"
    r = streamkws("stream-eval", str(clips / "yes" / "x.wav"), "--build", "--data", str(clips))
    assert r.returncode == 2 and "would write into the --data folder" in r.stderr
    assert not (clips / "yes" / "x.wav").exists()
    for bad in (["--min-threshold", "1.5", "--target-fa-per-hour", "1"],
                ["--plot", str(tmp_path / "det.xyz")]):
        r = streamkws("stream-eval", str(recording), *bad)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_building_over_a_link_replaces_the_link_not_what_it_points_to(data_dir, tmp_path):
    precious = tmp_path / "precious.wav"
    precious.write_bytes(b"keep me")
    link = tmp_path / "rec.wav"
    link.symlink_to(precious)
    r = streamkws("stream-eval", str(link), "--build", "--data",
                  str(data_dir / "speech_commands_v2_real"), "--per-keyword", "1",
                  "--unknown", "0", "--json")
    assert r.returncode == 0, r.stderr
    assert precious.read_bytes() == b"keep me"
    assert not link.is_symlink() and link.stat().st_size > 10_000


def test_labels_that_run_past_the_recording_are_refused(recording, tmp_path):
    labels = tmp_path / "other.csv"
    labels.write_text("keyword,start,end\nyes,1.0,1.5\nno,500.0,500.6\n")
    r = streamkws("stream-eval", str(recording), "--labels", str(labels), "--json")
    assert r.returncode == 2 and r.stdout == ""
    assert "start after the recording ends" in r.stderr and "'no' at 500.0 s" in r.stderr


def test_calibration_refuses_a_model_validated_on_another_speaker_split(tiny_bundle,
                                                                       data_dir):
    """tiny_bundle holds out 30 % of speakers: the held-out streams (15 %, split seed 0)
    would then contain speakers it trained on."""
    from streamkws.errors import StreamKWSError
    from streamkws.tools.calibration import stream_tradeoff
    from streamkws.tools.streams import heldout_split_problem

    assert heldout_split_problem(load_bundle("default")) is None
    assert heldout_split_problem(load_bundle("accurate")) is None
    with pytest.raises(StreamKWSError, match="validated on 30% with split seed 0"):
        stream_tradeoff(tiny_bundle, data_dir)


def test_build_places_your_keywords_and_never_one_of_them_as_a_distractor(data_dir, tmp_path):
    clips = data_dir / "speech_commands_v2_real"
    r = streamkws("stream-eval", str(tmp_path / "kw.wav"), "--build", "--data", str(clips),
                  "--keywords", "eight,zero", "--per-keyword", "2", "--unknown", "10", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["keywords"] == ["eight", "zero"] and info["keyword_utterances"] == 4
    assert {u.keyword for u in se.read_labels(tmp_path / "kw.csv")} == {"eight", "zero"}
    r = streamkws("stream-eval", str(tmp_path / "neg.wav"), "--build", "--negative", "--data",
                  str(clips), "--keywords", "eight,zero", "--unknown", "60", "--json")
    assert r.returncode == 0, r.stderr
    placed = json.loads(r.stdout)
    assert placed["keyword_utterances"] == 0 and placed["other_words"] == 60
    # Without them, a folder of only other words has no keyword to place: said, not empty.
    others = tmp_path / "others"
    others.mkdir()
    (others / "_unknown_").symlink_to(clips / "_unknown_")
    r = streamkws("stream-eval", str(tmp_path / "none.wav"), "--build", "--data", str(others),
                  "--json")
    assert r.returncode == 2 and "--keywords" in r.stderr


def test_the_latency_benchmark_refuses_a_model_of_other_keywords(tiny_bundle, capsys):
    from streamkws.tools.bench_latency import main as bench_latency

    assert bench_latency(["--model", str(tiny_bundle.path)]) == 2
    assert "does not spot up, down" in capsys.readouterr().err


@pytest.mark.parametrize("snr", ["nan", "inf", "-1000", "-21", "61"])
def test_build_refuses_an_snr_it_cannot_honour_and_writes_nothing(data_dir, tmp_path, snr):
    """NaN built an all-zero recording whose labels still promised keywords; -1000 dB one
    of noise alone."""
    out = tmp_path / "new" / "rec.wav"
    r = streamkws("stream-eval", str(out), "--build", "--data",
                  str(data_dir / "speech_commands_v2_real"), "--noise", str(data_dir / "noise"),
                  f"--snr={snr}")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "--snr must be within -20..60 dB" in r.stderr
    assert not out.parent.exists()  # not even the folder it would have been written in


@pytest.mark.parametrize(("option", "message"), [
    ("--per-keyword=100000", "--per-keyword must be within 1..500 (got 100000)"),
    ("--per-keyword=0", "--per-keyword must be within 1..500 (got 0)"),
    ("--unknown=-1", "--unknown must be within 0..5000 (got -1)"),
])
def test_build_refuses_a_recording_too_long_to_be_meant(data_dir, tmp_path, option, message):
    out = tmp_path / "new" / "rec.wav"
    r = streamkws("stream-eval", str(out), "--build", "--data",
                  str(data_dir / "speech_commands_v2_real"), option)
    assert r.returncode == 2 and r.stderr.strip().endswith(message), r.stderr
    assert not out.parent.exists()


@pytest.mark.parametrize("build", [True, False])
def test_an_empty_keyword_list_is_refused_not_read_as_the_default_ten(data_dir, tmp_path,
                                                                      build):
    out = tmp_path / "rec.wav"
    extra = ["--build", "--data", str(data_dir / "speech_commands_v2_real")] if build else []
    r = streamkws("stream-eval", str(out), *extra, "--keywords=")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert ("--keywords: expected comma-separated words" if build
            else "--keywords goes with --build") in r.stderr
    assert not out.exists()


@pytest.mark.parametrize("budget", ["nan", "inf", "0", "-1"])
def test_calibration_refuses_a_budget_that_is_not_a_positive_finite_rate(recording, tmp_path,
                                                                         budget):
    """NaN calibrated every threshold to 0.999 (a deaf daemon), inf every one to 0.5."""
    tuned = tmp_path / "tuned.toml"
    r = streamkws("stream-eval", str(recording), "--negative", "--target-fa-per-hour", budget,
                  "--write-config", str(tuned), "--json")
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
    assert "--target-fa-per-hour must be positive and finite" in r.stderr
    assert not tuned.exists()


def test_build_writes_its_labels_to_labels_when_given_and_evaluation_reads_them_there(
        data_dir, tmp_path):
    rec, labels = tmp_path / "rec.wav", tmp_path / "elsewhere" / "mylabels.csv"
    r = streamkws("stream-eval", str(rec), "--build", "--data",
                  str(data_dir / "speech_commands_v2_real"), "--per-keyword", "1",
                  "--unknown", "0", "--labels", str(labels), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["labels"] == str(labels)
    assert len(se.read_labels(labels)) == 10 and not rec.with_suffix(".csv").exists()
    r = streamkws("stream-eval", str(rec), "--labels", str(labels), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["overall"]["utterances"] == 10
    # Never over the recording it has just written.
    r = streamkws("stream-eval", str(rec), "--build", "--data",
                  str(data_dir / "speech_commands_v2_real"), "--labels", str(rec))
    assert r.returncode == 2 and "--labels" in r.stderr and r.stderr.count("\n") == 1


def test_a_recording_that_is_not_audio_is_reported_before_its_missing_label_file(tmp_path):
    text = tmp_path / "text.wav"
    text.write_text("not audio\n")
    r = streamkws("stream-eval", str(text))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "text.wav: not a WAV file" in r.stderr and "label file" not in r.stderr


def test_a_folder_given_as_the_recording_is_called_a_folder(tmp_path):
    r = streamkws("stream-eval", str(tmp_path))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "is a folder" in r.stderr and "no such recording" not in r.stderr


def test_build_refuses_an_snr_without_a_noise_bed_to_set_it_against(data_dir, tmp_path):
    out = tmp_path / "new" / "rec.wav"
    r = streamkws("stream-eval", str(out), "--build", "--data",
                  str(data_dir / "speech_commands_v2_real"), "--snr", "0")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "--snr needs --noise DIR" in r.stderr
    assert not out.parent.exists()


def test_build_without_a_model_names_the_word_folders_it_places_as_other_words(data_dir,
                                                                               tmp_path):
    """A user's own keyword folders (marvin/) built without --model or --keywords became
    other words, so a 'negative' recording held their keywords, silently."""
    clips = data_dir / "speech_commands_v2_real"
    mine = tmp_path / "mydata"
    (mine / "marvin").mkdir(parents=True)
    for p in sorted((clips / "_unknown_").glob("marvin_*.wav"))[:3]:
        (mine / "marvin" / p.name).symlink_to(p)
    (mine / "yes").symlink_to(clips / "yes")
    (mine / "NO").symlink_to(clips / "no")  # the keyword "no", as the loader reads it
    r = streamkws("stream-eval", str(tmp_path / "neg.wav"), "--build", "--negative",
                  "--data", str(mine), "--unknown", "3", "--json")
    assert r.returncode == 0, r.stderr
    assert "WARNING streamkws.tools.stream_eval: marvin: not keywords here" in r.stderr
    assert "give --model or --keywords" in r.stderr
    assert "no --noise: the words sit in digital silence" in r.stderr
    r = streamkws("stream-eval", str(tmp_path / "kw.wav"), "--build", "--data", str(mine),
                  "--keywords", "marvin", "--per-keyword", "1", "--unknown", "1", "--json")
    assert r.returncode == 0 and "not keywords here" not in r.stderr, r.stderr


def test_held_out_speakers_are_those_of_the_models_own_split(tiny_bundle, data_dir, tmp_path,
                                                            monkeypatch):
    """tiny_bundle held out 30 % of speakers: its held-out recording must come from those,
    not from the default split's 15 %."""
    from streamkws.cli import main

    seen = {}

    def build(*args, **kwargs):
        seen.update(kwargs)
        return {"audio": "", "duration_s": 0, "keyword_utterances": 0, "other_words": 0,
                "labels": ""}

    monkeypatch.setattr(se, "build", build)
    argv = ["stream-eval", str(tmp_path / "h.wav"), "--build", "--data",
            str(data_dir / "speech_commands_v2_real"), "--speakers", "heldout"]
    assert main([*argv, "--model", str(tiny_bundle.path)]) == 0
    assert seen["split"] == (0.3, 0)
    assert main(argv) == 0
    assert seen["split"] == (0.15, 0)


def test_negative_says_it_ignores_the_label_file_beside_the_recording(recording):
    r = streamkws("stream-eval", str(recording), "--negative", "--json")
    assert r.returncode == 0, r.stderr
    assert "lists 30 keyword utterance(s), but --negative counts every detection" in r.stderr


def test_negative_runs_beside_a_csv_that_is_no_label_file_and_warns_of_stale_thresholds(
        recording, tmp_path):
    """--negative needs no label file: another program's CSV of the same name is none of
    its business. And the thresholds of a config calibrated for another model are said to
    be, as the daemon says it."""
    neg = tmp_path / "neg.wav"
    neg.symlink_to(recording)
    neg.with_suffix(".csv").write_text("time,speaker\n1.0,alice\n")
    cfg = tmp_path / "other.toml"
    cfg.write_text('[detect]\ncalibrated_for = "000000000000"\n')
    r = streamkws("stream-eval", str(neg), "--negative", "--config", str(cfg), "--json")
    assert r.returncode == 0, r.stderr
    assert "lists" not in r.stderr
    assert "the thresholds were calibrated for model 000000000000" in r.stderr
