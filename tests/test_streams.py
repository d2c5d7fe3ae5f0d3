"""Where a word lies in its clip: the test streams place and label words by these bounds."""

from __future__ import annotations

import numpy as np
import pytest

from streamkws.audio.wav import load_audio
from streamkws.tools.streams import SR, build_stream, speech_bounds

FRAME = 160


def _clip(hiss_after_ms: float | None, hiss_dbfs: float = -45.0) -> tuple[np.ndarray, int, int]:
    """1 s: a quiet room, a voiced 300 ms 'vowel' at 0.3 s, then perhaps 150 ms of hiss
    above 3 kHz, as an /f/ or /s/, ``hiss_after_ms`` after the vowel ends."""
    rng = np.random.default_rng(0)
    x = rng.normal(0, 10 ** (-60 / 20), SR)
    a, b = int(0.3 * SR), int(0.6 * SR)
    t = np.arange(b - a) / SR
    vowel = sum(np.sin(2 * np.pi * 150 * k * t) / k for k in range(1, 20))
    x[a:b] += vowel * (10 ** (-10 / 20) / np.sqrt(np.mean(vowel**2)))
    end = b
    if hiss_after_ms is not None:
        s = b + int(hiss_after_ms * SR / 1000)
        spec = np.fft.rfft(rng.normal(0, 1, int(0.15 * SR)))
        spec[: int(3000 * 0.15)] = 0
        hiss = np.fft.irfft(spec, int(0.15 * SR))
        x[s : s + len(hiss)] += hiss * (10 ** (hiss_dbfs / 20) / np.sqrt(np.mean(hiss**2)))
        end = s + len(hiss)
    return x.astype(np.float32), a, end


def test_a_word_ends_where_its_loud_part_ends_when_nothing_follows():
    x, a, end = _clip(None)
    first, last = speech_bounds(x)
    assert abs(first - a) <= FRAME and abs(last - end) <= FRAME


def test_a_quiet_final_fricative_stays_with_its_word():
    x, a, end = _clip(hiss_after_ms=0)
    # 35 dB under the vowel: below what the loudness rule alone keeps
    assert speech_bounds(x, fricative_ms=0)[1] <= a + int(0.3 * SR) + FRAME
    first, last = speech_bounds(x)
    assert abs(first - a) <= FRAME and abs(last - end) <= FRAME


def test_hiss_apart_from_the_word_is_not_part_of_it():
    x, a, _ = _clip(hiss_after_ms=200)
    assert speech_bounds(x)[1] <= a + int(0.3 * SR) + FRAME


def test_a_fricative_reaches_no_further_than_fricative_ms():
    x, a, _ = _clip(hiss_after_ms=0)
    assert speech_bounds(x, fricative_ms=50)[1] <= a + int(0.35 * SR) + FRAME


def test_a_real_off_keeps_its_f_and_the_same_speakers_no_is_unchanged(data_dir):
    """One speaker of the held-out split: the loudness rule alone cut 40 ms of this "off"'s
    /f/, and the end-to-end stream carried an "o" labelled off."""
    words = data_dir / "speech_commands_v2_real"
    off = load_audio(words / "off" / "44715c1c_nohash_0.wav")
    assert speech_bounds(off)[1] - speech_bounds(off, fricative_ms=0)[1] >= 0.03 * SR
    no = load_audio(words / "no" / "44715c1c_nohash_0.wav")
    assert speech_bounds(no) == speech_bounds(no, fricative_ms=0)


def test_a_placed_word_keeps_150_ms_of_its_recording_so_a_faint_f_is_not_cut(data_dir):
    """This held-out "off"'s /f/ (0.72-0.82 s) stands under 10 dB over its band's floor, so
    the bounds end at the vowel; placed with 50 ms around them the stream said "o"."""
    path = data_dir / "speech_commands_v2_real" / "off" / "0d53e045_nohash_1.wav"
    x = load_audio(path)
    a, b = speech_bounds(x)
    assert b <= int(0.70 * SR)  # the rule alone misses the /f/
    out, [placed] = build_stream([("off", path)], [], lead_s=1.0, word_dbfs=None)
    at = SR - (a - int(0.15 * SR))  # where the clip's first kept sample lands
    np.testing.assert_array_equal(out[at + int(0.72 * SR): at + int(0.82 * SR)],
                                  x[int(0.72 * SR): int(0.82 * SR)])
    # The label is the word and 50 ms around it, not the room tone kept beside it.
    assert placed.start == (at + a - int(0.05 * SR)) / SR
    assert placed.end == (at + b + int(0.05 * SR)) / SR


def test_word_level_and_noise_bed_are_set_by_the_words_not_the_room_tone_beside_them(data_dir):
    """-26 dBFS and 20 dB SNR describe the labelled words; the quiet context kept around
    them must not pull the level up or the bed down."""
    from streamkws.data import load_noise

    words = data_dir / "speech_commands_v2_real"
    clips = [("off", words / "off" / "0d53e045_nohash_1.wav"),
             ("no", words / "no" / "44715c1c_nohash_0.wav")]
    noise = load_noise(data_dir / "noise")
    kw = dict(word_dbfs=-26.0, word_jitter_db=0.0, snr_db=20.0, seed=3)
    dry, placed = build_stream(clips, [], **kw)
    wet, _ = build_stream(clips, noise, **kw)
    speech = np.concatenate([dry[int(p.start * SR): int(p.end * SR)] for p in placed])
    bed = (wet - dry).astype(np.float64)

    def dbfs(x):
        return 10 * np.log10(np.mean(np.asarray(x, np.float64) ** 2))

    assert dbfs(speech) == pytest.approx(-26.0, abs=0.1)
    assert dbfs(bed) == pytest.approx(-46.0, abs=0.1)
