"""Shared fixtures: the real speech and noise in ``../shared/data``.

The data lives beside the repository (CI clones it with ``../shared`` next to it);
``STREAMKWS_DATA`` points elsewhere. Missing data skips locally but fails under CI, where
the tests must exercise real audio.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from streamkws.audio.wav import load_audio

REPO = Path(__file__).resolve().parents[1]
KEYWORDS = ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"]


def data_root() -> Path:
    return Path(os.environ.get("STREAMKWS_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    root = data_root()
    if not (root / "speech_commands_v2_real").is_dir():
        msg = f"real audio not found at {root} (set STREAMKWS_DATA)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return root


@pytest.fixture(scope="session")
def speech_dir(data_dir: Path) -> Path:
    return data_dir / "speech_commands_v2_real"


def clip_paths(speech_dir: Path, label: str, n: int) -> list[Path]:
    return sorted((speech_dir / label).glob("*.wav"))[:n]


@pytest.fixture(scope="session")
def speech_stream(speech_dir: Path) -> np.ndarray:
    """About 6 s of real speech: six different keywords back to back."""
    clips = [load_audio(clip_paths(speech_dir, k, 1)[0]) for k in KEYWORDS[:6]]
    return np.concatenate(clips)


def write_wav(path: Path, samples: np.ndarray, rate: int = 16000, channels: int = 1,
              width: int = 2) -> Path:
    """Write int PCM with the stdlib, so the reader is tested against an independent writer."""
    import wave

    x = np.asarray(samples, dtype=np.float64)
    if x.ndim == 1 and channels > 1:
        x = np.repeat(x[:, None], channels, axis=1)
    scale = {1: 127, 2: 32767, 3: 8388607, 4: 2147483647}[width]
    ints = np.round(np.clip(x, -1, 1) * scale).astype(np.int64).reshape(-1)
    if width == 1:
        raw = (ints + 128).astype(np.uint8).tobytes()
    elif width == 3:
        raw = b"".join(int(v).to_bytes(3, "little", signed=True) for v in ints)
    else:
        raw = ints.astype({2: "<i2", 4: "<i4"}[width]).tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(raw)
    return path


# -- a tiny trained model, for tests of everything that takes a bundle ---------------------

WORDS = ["yes", "no", "_silence_", "_unknown_"]


@pytest.fixture(scope="session")
def small_data(tmp_path_factory, speech_dir):
    """Real clips of four labels from 24 speakers per label, symlinked into a folder tree."""
    root = tmp_path_factory.mktemp("small")
    for label in WORDS:
        (root / label).mkdir()
        for p in sorted((speech_dir / label).glob("*.wav"))[:24]:
            (root / label / p.name).symlink_to(p)
    return root


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, small_data, data_dir):
    out = tmp_path_factory.mktemp("model") / "tiny.skw"
    from streamkws.tools.train import TrainConfig, train

    cfg = TrainConfig(data=[small_data], out=out, arch="dscnn",
                      arch_kwargs={"channels": 16, "blocks": 1}, noise=data_dir / "noise",
                      epochs=3, batch_size=32, val_fraction=0.3, seed=1, progress=False,
                      threads=1, labels=("yes", "no", "_unknown_", "_silence_"))
    return train(cfg)
