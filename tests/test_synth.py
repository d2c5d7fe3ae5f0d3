"""The synthetic keyword set: clip format, file names, the manifest cache, reproducibility.

The runs here are tiny (a few clips); they need espeak-ng, which skips locally when it is
missing but fails under CI, where it is installed.
"""

from __future__ import annotations

import os
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest

from streamkws.tools import synth

WORDS = ["yes", "up"]
UNKNOWN = ["bed", "yet"]
PER_WORD = 4


def _require_espeak() -> None:
    if shutil.which("espeak-ng") is None:
        if os.environ.get("CI"):
            pytest.fail("espeak-ng is not installed (apt-get install espeak-ng)")
        pytest.skip("espeak-ng is not installed")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    _require_espeak()
    out = tmp_path_factory.mktemp("synth") / "set"
    summary = synth.synthesize(out, WORDS, UNKNOWN, PER_WORD, seed=1, jobs=2, progress=False)
    return out, summary


def _read(path: Path) -> tuple[wave._wave_params, np.ndarray]:
    with wave.open(str(path), "rb") as w:
        params = w.getparams()
        x = np.frombuffer(w.readframes(params.nframes), "<i2").astype(np.float64) / 32768.0
    return params, x


def _speaker(name: str) -> tuple[str | None, str]:
    """Split '<word>_<speaker>_nohash_<n>.wav' the way a speaker-disjoint split does."""
    stem, n = name.removesuffix(".wav").split("_nohash_")
    assert n.isdigit()
    parts = stem.split("_")
    return (parts[0] if len(parts) == 2 else None), parts[-1]


def test_counts_and_clip_format(tiny):
    out, summary = tiny
    assert not summary["skipped"]
    expected_unknown = round(PER_WORD * synth.UNKNOWN_FACTOR)
    assert summary["counts"] == {"yes": PER_WORD, "up": PER_WORD, "_unknown_": expected_unknown}
    files = sorted(out.glob("*/*.wav"))
    assert len(files) == 2 * PER_WORD + expected_unknown
    for f in files:
        params, x = _read(f)
        assert (params.nchannels, params.sampwidth, params.framerate) == (1, 2, 16000)
        assert params.nframes == 16000
        # Not silent: the utterance (the span between the first and last non-zero sample)
        # is above -40 dBFS RMS, and the peak lies in the -20..-3 dBFS range drawn for it.
        nz = np.flatnonzero(x)
        speech = x[nz[0] : nz[-1] + 1]
        assert 20 * np.log10(np.sqrt(np.mean(speech**2))) > -40, f.name
        assert -20.5 <= 20 * np.log10(np.abs(x).max()) <= -2.5, f.name
        assert len(speech) <= synth.MAX_SPEECH_S * 16000 + 1


def test_file_names_carry_a_speaker_without_underscores(tiny):
    out, summary = tiny
    speakers = set()
    for f in out.glob("*/*.wav"):
        word, speaker = _speaker(f.name)
        assert "_" not in speaker and speaker.split("-")[0] in ("espeak", "flite")
        if f.parent.name == "_unknown_":
            assert word in UNKNOWN
        else:
            assert word is None
        speakers.add(speaker)
    assert speakers == set(summary["voices"])


def test_second_run_is_a_no_op(tiny):
    out, summary = tiny
    before = {f: f.stat().st_mtime_ns for f in out.glob("*/*.wav")}
    again = synth.synthesize(out, WORDS, UNKNOWN, PER_WORD, seed=1, jobs=2, progress=False)
    assert again["skipped"]
    assert again["counts"] == summary["counts"]
    assert {f: f.stat().st_mtime_ns for f in out.glob("*/*.wav")} == before


def test_other_settings_regenerate(tiny, tmp_path):
    out, _ = tiny
    copy = tmp_path / "set"
    shutil.copytree(out, copy)
    summary = synth.synthesize(copy, ["yes"], [], 2, seed=1, jobs=1, progress=False)
    assert not summary["skipped"] and summary["counts"] == {"yes": 2}
    # The old labels' clips are gone, not mixed into the new set.
    assert sorted(p.parent.name for p in copy.glob("*/*.wav")) == ["yes", "yes"]


def test_refuses_a_folder_that_is_not_its_own(tmp_path):
    _require_espeak()
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        synth.synthesize(tmp_path, ["yes"], [], 1, seed=0, jobs=1, progress=False)
    assert (tmp_path / "notes.txt").exists()


def test_a_file_synth_did_not_make_stops_a_remake_before_anything_is_deleted(tiny, tmp_path):
    out, _ = tiny
    copy = tmp_path / "set"
    shutil.copytree(out, copy)
    before = sorted(copy.glob("*/*.wav"))
    mine = copy / "yes" / "my_own_recording.wav"
    mine.write_bytes(b"RIFF")
    with pytest.raises(FileExistsError, match="my_own_recording.wav: not made by synth"):
        synth.synthesize(copy, ["yes"], [], 2, seed=1, jobs=1, progress=False)
    assert mine.exists()
    assert sorted(p for p in copy.glob("*/*.wav") if p != mine) == before


def test_same_seed_same_files(tiny, tmp_path):
    out, _ = tiny
    synth.synthesize(tmp_path, WORDS, UNKNOWN, PER_WORD, seed=1, jobs=1, progress=False)
    names = sorted(str(p.relative_to(out)) for p in out.glob("*/*.wav"))
    assert names == sorted(str(p.relative_to(tmp_path)) for p in tmp_path.glob("*/*.wav"))


# --- no synthesiser needed below --------------------------------------------------------


VOICES = [synth.Voice("espeak", d, v, v.startswith("f")) for d in ("en-us", "en-gb-x-rp")
          for v in ("m1", "m3", "f2", "klatt")] + [synth.Voice("flite", "slt", "", True),
                                                    synth.Voice("flite", "awb")]


def test_seed_reproduces_the_voice_list():
    def voices(seed: int) -> list[str]:
        return [j.voice.id for j in synth.plan_jobs(WORDS, UNKNOWN, 20, seed, VOICES)]

    assert voices(3) == voices(3)
    assert voices(3) != voices(4)
    plan = synth.plan_jobs(WORDS, UNKNOWN, 20, 3, VOICES)
    assert plan == synth.plan_jobs(WORDS, UNKNOWN, 20, 3, VOICES)
    assert len({j.voice.id for j in plan}) >= 6  # draws spread over the voices
    assert len({(j.label, j.filename) for j in plan}) == len(plan)


def test_voice_ids_are_file_name_tokens():
    v = synth.Voice("espeak", "en-gb-scotland", "m3")
    assert v.id == "espeak-en-gb-scotland-m3"
    assert synth.Voice("espeak", "en-us", "Mr serious").id == "espeak-en-us-mr-serious"
    job = synth.plan_jobs([], ["bed"], 2, 0, [v])[0]
    assert job.filename == "bed_espeak-en-gb-scotland-m3_nohash_0.wav"


def test_unknown_counts_add_up():
    counts = synth.unknown_counts(list(synth.DEFAULT_UNKNOWN), 400, seed=0)
    assert sum(counts.values()) == 600
    assert max(counts.values()) - min(counts.values()) <= 1
    assert "know" not in synth.DEFAULT_UNKNOWN  # a homophone of "no"


def test_trim_and_place():
    rate = 16000
    t = np.arange(rate // 4) / rate
    tone = 0.5 * np.sin(2 * np.pi * 220 * t).astype(np.float32)
    x = np.concatenate([np.zeros(3000, np.float32), tone, np.zeros(5000, np.float32)])
    y = synth.trim_silence(x)
    assert len(tone) <= len(y) <= len(tone) + 2 * 320 + 160
    clip = synth.place(y, -6.0, 1.0)
    assert len(clip) == rate
    assert np.isclose(20 * np.log10(np.abs(clip).max()), -6.0, atol=0.01)
    assert np.all(clip[: rate - len(y)] == 0)  # offset_frac 1.0: at the very end
    assert len(synth.trim_silence(np.zeros(8000, np.float32))) == 0


def test_a_keyword_is_never_an_unknown_word(tmp_path):
    _require_espeak()
    summary = synth.synthesize(tmp_path, ["yes"], ["yes", "bed"], 2, seed=0, jobs=1,
                               progress=False)
    assert summary["counts"] == {"yes": 2, "_unknown_": 3}
    assert {p.name.split("_")[0] for p in (tmp_path / "_unknown_").glob("*.wav")} == {"bed"}


def test_every_name_synth_gives_is_one_it_may_later_remake():
    plan = synth.plan_jobs(WORDS, UNKNOWN + ["don't", "x-ray"], 20, 3, VOICES)
    assert all(synth._OURS.match(j.filename) for j in plan)
    assert not synth._OURS.match("up_0a7c2a8d_nohash_0.wav")  # a Speech Commands clip


def test_an_out_that_is_a_file_is_one_error_line(tmp_path, capsys):
    rec = tmp_path / "rec.wav"
    rec.write_bytes(b"RIFF")
    if not synth.discover_voices():
        pytest.skip("no synthesiser: the voices are looked for first")
    assert synth.main(["--out", str(rec), "--words", "yes", "--per-word", "1"]) == 2
    err = capsys.readouterr().err
    assert err == f"python -m streamkws.tools.synth: error: --out {rec}: is a file, not a folder\n"
    assert rec.read_bytes() == b"RIFF"


def test_an_out_under_a_file_is_one_error_line_too(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    if not synth.discover_voices():
        pytest.skip("no synthesiser: the voices are looked for first")
    assert synth.main(["--out", str(afile / "sub"), "--words", "yes", "--per-word", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m streamkws.tools.synth: error: ") and err.count("\n") == 1
    assert str(afile) in err
