"""Both data layouts of the contract, speaker-disjoint splits, and unreadable files."""

import shutil

import numpy as np
import pytest

from streamkws.data import (
    DEFAULT_LABELS,
    ClipCache,
    load_dataset,
    speaker_of,
    speaker_split,
)
from streamkws.errors import StreamKWSError
from tests.conftest import write_wav


def test_speaker_is_the_token_before_nohash(tmp_path):
    assert speaker_of(tmp_path / "yes" / "0c540988_nohash_1.wav") == "0c540988"
    assert speaker_of(tmp_path / "_unknown_" / "bed_0c540988_nohash_0.wav") == "0c540988"
    assert speaker_of(tmp_path / "_unknown_" / "bed_0C540988_nohash_0.wav") == "0c540988"


def test_labelled_folders_read_with_silence_and_unknown(speech_dir):
    ds = load_dataset(speech_dir)
    counts = ds.counts()
    assert set(counts) == set(DEFAULT_LABELS) and all(v > 250 for v in counts.values())
    unknown = [it for it in ds.items if it.label == "_unknown_"]
    assert {"bed", "backward"} <= {it.word for it in unknown}


def test_an_other_words_word_is_everything_before_its_speaker(tmp_path, speech_dir):
    clip = sorted((speech_dir / "yes").glob("*.wav"))[0]
    for name in ("yes/0c540988_nohash_0.wav", "_unknown_/bed_0c540988_nohash_0.wav",
                 "_unknown_/follow_up_0c540988_nohash_0.wav"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        shutil.copy(clip, tmp_path / name)
    ds = load_dataset(tmp_path, labels=["yes", "_unknown_"])
    assert sorted((it.word, it.label) for it in ds.items) == [
        ("bed", "_unknown_"), ("follow_up", "_unknown_"), ("yes", "yes")]
    # A custom keyword spelt with an underscore is found among the other words too.
    custom = load_dataset(tmp_path, labels=["follow_up", "_unknown_"])
    assert ("follow_up", "follow_up") in {(it.word, it.label) for it in custom.items}


def test_folders_outside_the_label_set_become_unknown(data_dir):
    ds = load_dataset(data_dir / "speech_commands_v1_train_sample")
    assert {it.word for it in ds.items if it.label == "_unknown_"} >= {"bed", "marvin"}
    assert ds.counts()["yes"] > 0 and ds.counts()["_silence_"] == 0


def test_split_never_puts_one_speaker_on_both_sides(speech_dir):
    train, val = speaker_split(load_dataset(speech_dir), 0.2, seed=3)
    assert not (train.speakers() & val.speakers())
    assert 0.1 < len(val) / (len(train) + len(val)) < 0.3
    again, _ = speaker_split(load_dataset(speech_dir), 0.2, seed=3)
    assert [i.path for i in again.items] == [i.path for i in train.items]


@pytest.fixture
def download_tree(tmp_path, speech_dir, data_dir):
    """A miniature Speech Commands download: word folders, split lists, background noise."""
    root = tmp_path / "speech_commands_v0.02"
    words = {"yes": "yes", "no": "no", "bed": "_unknown_", "marvin": "_unknown_"}
    lists = {"validation": [], "testing": []}
    for word, folder in words.items():
        (root / word).mkdir(parents=True)
        src = sorted((speech_dir / folder).glob(f"{word}_*.wav" if folder == "_unknown_"
                                                 else "*.wav"))[:6]
        for i, p in enumerate(src):
            name = p.name.split("_", 1)[1] if folder == "_unknown_" else p.name
            shutil.copy(p, root / word / name)
            if i == 4:
                lists["validation"].append(f"{word}/{name}")
            if i == 5:
                lists["testing"].append(f"{word}/{name}")
    for name, entries in lists.items():
        (root / f"{name}_list.txt").write_text("\n".join(entries) + "\n")
    shutil.copytree(data_dir / "noise", root / "_background_noise_")
    return root


def test_speech_commands_download_layout_maps_to_twelve_classes(download_tree):
    test = load_dataset(download_tree, split="testing")
    train = load_dataset(download_tree, split="train")
    assert {it.word for it in test.items if it.label == "_unknown_"} <= {"bed", "marvin"}
    assert len([it for it in test.items if it.label != "_silence_"]) == 4
    assert len([it for it in train.items if it.label != "_silence_"]) == 16
    assert not {it.path for it in test.items} & {it.path for it in train.items
                                                 if it.label != "_silence_"}
    # _silence_ comes from the background noise, cut into 1-s clips
    silence = [it for it in train.items if it.label == "_silence_"]
    assert silence and all(it.path.parent.name == "_background_noise_" for it in silence)
    x, _ = ClipCache().load_all(train)
    assert x.shape == (len(train), 16000) and np.abs(x).max() > 0


def test_other_rates_and_corrupt_files_are_converted_or_reported(tmp_path, speech_dir):
    import soxr

    from streamkws.audio.wav import load_audio

    root = tmp_path / "d"
    (root / "yes").mkdir(parents=True)
    clip = load_audio(sorted((speech_dir / "yes").glob("*.wav"))[0])
    write_wav(root / "yes" / "aaaa_nohash_0.wav", soxr.resample(clip, 16000, 44100),
              rate=44100, channels=2)
    (root / "yes" / "bbbb_nohash_0.wav").write_bytes(b"RIFF garbage")
    ds = load_dataset(root)
    x, ok = ClipCache().load_all(ds)
    assert x.shape == (1, 16000)
    assert len(ok.skipped) == 1 and "bbbb_nohash_0.wav" in ok.skipped[0]


def test_empty_or_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(StreamKWSError, match="nope: data folder not found"):
        load_dataset(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(StreamKWSError, match="notes.txt: is a file, not a data folder"):
        load_dataset(tmp_path / "notes.txt")
    with pytest.raises(StreamKWSError, match="no audio clips found"):
        load_dataset(tmp_path)


def test_a_label_folder_named_in_capitals_is_that_label(tmp_path, speech_dir):
    (tmp_path / "YES").mkdir()
    for p in sorted((speech_dir / "yes").glob("*.wav"))[:3]:
        (tmp_path / "YES" / p.name).symlink_to(p)
    assert load_dataset(tmp_path).counts()["yes"] == 3
