"""CPU cost of the streaming core: source -> ring -> front end -> windows -> VAD gate.

Builds a recording of real speech and noise from the data folder (default 6 minutes),
replays it as fast as possible through the real threads (a WAV reader thread writing the
ring buffer, this thread draining it through :class:`streamkws.frontend.FrontEnd`) and
reports process CPU seconds per audio second, the median of several runs, for each VAD.

    python -m streamkws.tools.bench_frontend [--data DIR] [--minutes 6] [--repeats 3]
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from streamkws.audio.ring import RingBuffer
from streamkws.audio.wav import WavSource, load_audio
from streamkws.config import Config, WindowConfig
from streamkws.errors import ArgumentParser
from streamkws.frontend import FrontEnd
from streamkws.vad import VadConfig

KEYWORDS = ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"]


def default_data_dir() -> Path:
    env = os.environ.get("STREAMKWS_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"


def build_recording(data: Path, minutes: float, seed: int = 0) -> np.ndarray:
    """Alternate real keyword / unknown clips with stretches of the real noise recordings."""
    rng = np.random.default_rng(seed)
    speech = data / "speech_commands_v2_real"
    clips = [p for k in KEYWORDS + ["_unknown_"] for p in sorted((speech / k).glob("*.wav"))]
    noise = np.concatenate([load_audio(p) for p in sorted((data / "noise").glob("*.wav"))])
    parts, total, target = [], 0, int(minutes * 60 * 16000)
    while total < target:
        clip = load_audio(clips[rng.integers(len(clips))])
        gap = int(rng.uniform(1.0, 3.0) * 16000)
        at = rng.integers(0, len(noise) - gap)
        parts += [clip, 0.3 * noise[at : at + gap]]
        total += len(clip) + gap
    return np.concatenate(parts)[:target].astype(np.float32)


def write_wav16(path: Path, x: np.ndarray) -> None:
    import wave

    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())


def run_once(wav: Path, vad: VadConfig, hop_ms: int = 100) -> dict:
    cfg = Config(vad=vad, windows=WindowConfig(hop_ms=hop_ms)).validate()
    frontend = FrontEnd(cfg.frontend, cfg.vad, cfg.windows.hop_frames(cfg.frontend))
    ring = RingBuffer(int(cfg.audio.ring_seconds * 16000))
    source = WavSource(wav, realtime=False, block_frames=320)  # 20 ms blocks, like a mic
    cpu0, wall0 = time.process_time(), time.perf_counter()
    source.start(lambda c: ring.write(c, block=True))
    while not (source.finished.is_set() and ring.available == 0):
        chunk = ring.read(timeout=0.05)
        if chunk is not None:
            frontend.process(chunk)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    if source.error:
        raise source.error
    audio_s = source.samples_delivered / 16000
    return {
        "audio_seconds": audio_s,
        "cpu_seconds": cpu,
        "cpu_per_audio_second": cpu / audio_s,
        "realtime_factor": audio_s / wall,
        "windows": frontend.windows,
        "windows_per_second": frontend.windows / audio_s,
        "gate_open_ratio": frontend.windows_open / max(1, frontend.windows),
    }


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m streamkws.tools.bench_frontend",
                        description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=default_data_dir())
    ap.add_argument("--minutes", type=float, default=6.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    audio = build_recording(args.data, args.minutes)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "bench.wav"
        write_wav16(wav, audio)
        variants = {
            "vad=off": VadConfig(kind="off"),
            "vad=energy": VadConfig(kind="energy"),
            "vad=webrtc": VadConfig(kind="webrtc"),
        }
        for name, vad in variants.items():
            runs = [run_once(wav, vad) for _ in range(args.repeats)]
            med = statistics.median(r["cpu_per_audio_second"] for r in runs)
            results[name] = {**runs[0], "cpu_per_audio_second": med,
                             "cpu_per_audio_second_runs": [r["cpu_per_audio_second"]
                                                           for r in runs]}
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    first = next(iter(results.values()))
    print(f"streaming core over {first['audio_seconds']:.0f} s of real audio "
          f"({first['windows_per_second']:.1f} windows/s), median of {args.repeats} runs")
    print(f"{'pipeline':<12} {'CPU s / audio s':>16} {'% of one core':>14} "
          f"{'x realtime':>11} {'gate open':>10}")
    for name, r in results.items():
        print(f"{name:<12} {r['cpu_per_audio_second']:>16.5f} "
              f"{100 * r['cpu_per_audio_second']:>13.3f}% {r['realtime_factor']:>10.0f}x "
              f"{100 * r['gate_open_ratio']:>9.1f}%")
    print("target: <= 0.005 CPU s per audio s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
