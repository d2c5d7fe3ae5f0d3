"""Measure the VAD gate on real audio: how many keywords it lets through, how much noise.

    python -m streamkws.tools.vad_report [--data DIR] [--kind webrtc|energy|both]
                                         [--aggressiveness N] [--ablation] [--json]

Streams audio through :class:`streamkws.vad.VadGate` in 100 ms chunks, as the pipeline
does, and asks the gate about every model window (``WINDOW_SAMPLES`` long, one every
``HOP`` samples) once the audio for it has arrived. Three measurements:

* keyword recall: each command-word clip of ``speech_commands_v2_real`` alone, with 0.5 s
  of digital silence on each side so that at least one full window covers the word; a clip
  counts when the gate opens at least one window. Target: >= 98 %.
* ``_silence_``: the background-noise clips streamed back to back as one stream; the share
  of windows opened. Target: <= 25 %.
* ``noise/``: each background recording as its own stream, and all of them pooled; the share
  of windows opened. Target: <= 25 %.

Every setting except the detector (and WebRTC's aggressiveness) is ``VadConfig``'s default,
so the table shows what the shipped defaults do; ``--ablation`` adds rows with the
speech-band check, or both extra checks of the WebRTC detector, turned off.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from streamkws.audio.chunk import Chunk
from streamkws.audio.wav import load_audio
from streamkws.errors import ArgumentParser
from streamkws.vad import VadConfig, VadGate

KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
WINDOW_SAMPLES = 15920  # 98 log-Mel frames of 25 ms every 10 ms
HOP = 1600  # a window ends every 100 ms
CHUNK = 1600
PAD = 8000  # 0.5 s of digital silence each side of a keyword clip
KEYWORD_TARGET = 0.98
NOISE_TARGET = 0.25


def default_data_dir() -> Path:
    env = os.environ.get("STREAMKWS_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "data"


def stream_windows(gate: VadGate, audio: np.ndarray, chunk: int = CHUNK) -> np.ndarray:
    """Push ``audio`` (stream position 0 onwards) and return the gate's answer for every
    complete window, in order."""
    opened: list[bool] = []
    k = 0
    for pos in range(0, len(audio), chunk):
        block = audio[pos : pos + chunk]
        gate.push(Chunk(block, pos))
        end = pos + len(block)
        while k * HOP + WINDOW_SAMPLES <= end:
            opened.append(gate.is_open(k * HOP, k * HOP + WINDOW_SAMPLES))
            k += 1
    return np.array(opened, bool)


@dataclasses.dataclass
class Data:
    keywords: list[np.ndarray]
    silence: np.ndarray
    noise: dict[str, np.ndarray]


def load_data(root: Path, progress: bool = True) -> Data:
    from streamkws.progress import tqdm

    sc = root / "speech_commands_v2_real"
    kw_files = sorted(p for w in KEYWORDS for p in (sc / w).glob("*.wav"))
    sil_files = sorted((sc / "_silence_").glob("*.wav"))
    noise_files = sorted((root / "noise").glob("*.wav"))
    if not kw_files or not sil_files or not noise_files:
        raise SystemExit(
            f"{root}: expected speech_commands_v2_real/<word>/, _silence_/ and noise/ WAV files"
        )
    keywords = [load_audio(p) for p in tqdm(kw_files, "load keywords", disable=not progress)]
    sil = [load_audio(p) for p in tqdm(sil_files, "load _silence_", disable=not progress)]
    noise = {p.stem: load_audio(p) for p in noise_files}
    return Data(keywords, np.concatenate(sil), noise)


def label(cfg: VadConfig) -> str:
    name = f"webrtc {cfg.aggressiveness}" if cfg.kind == "webrtc" else cfg.kind
    default = VadConfig()
    if cfg.kind == "webrtc" and not cfg.webrtc_energy_check:
        return name + ", WebRTC alone"
    if cfg.speech_band_ratio != default.speech_band_ratio:
        name += f", band ratio {cfg.speech_band_ratio:g}"
    if cfg == default:
        name += " (default)"
    return name


def measure(cfg: VadConfig, data: Data, progress: bool = True) -> dict:
    from streamkws.progress import tqdm

    gate = VadGate.from_config(cfg)
    cpu = 0.0
    samples = 0
    pad = np.zeros(PAD, np.float32)
    hits = 0
    name = label(cfg)
    for clip in tqdm(data.keywords, f"{name}: keywords", disable=not progress, leave=False):
        gate.reset()
        audio = np.concatenate((pad, clip, pad))
        t0 = time.process_time()
        hits += bool(stream_windows(gate, audio).any())
        cpu += time.process_time() - t0
        samples += len(audio)

    def share(audio: np.ndarray) -> tuple[int, int]:
        nonlocal cpu, samples
        gate.reset()
        t0 = time.process_time()
        w = stream_windows(gate, audio)
        cpu += time.process_time() - t0
        samples += len(audio)
        return int(w.sum()), len(w)

    sil_open, sil_total = share(data.silence)
    noise = {}
    for stem, audio in tqdm(data.noise.items(), f"{name}: noise", disable=not progress,
                            leave=False):  # fmt: skip
        noise[stem] = share(audio)
    n_open = sum(o for o, _ in noise.values())
    n_total = sum(t for _, t in noise.values())
    return {
        "detector": name,
        "config": dataclasses.asdict(cfg),
        "keyword_clips": len(data.keywords),
        "keyword_recall": hits / len(data.keywords),
        "silence_windows": sil_total,
        "silence_open": sil_open / sil_total,
        "noise_open": {k: o / t for k, (o, t) in noise.items()},
        "noise_windows": n_total,
        "noise_all_open": n_open / n_total,
        "cpu_ms_per_100ms": 1000.0 * cpu / (samples / 1600),
    }


def configs(kind: str, aggressiveness: int | None, ablation: bool = False) -> list[VadConfig]:
    out = []
    default = VadConfig()
    if kind in ("webrtc", "both"):
        levels = [aggressiveness] if aggressiveness is not None else [0, 1, 2, 3]
        out += [VadConfig(kind="webrtc", aggressiveness=a) for a in levels]
        if ablation:
            a = default.aggressiveness if aggressiveness is None else aggressiveness
            out += [
                VadConfig(kind="webrtc", aggressiveness=a, speech_band_ratio=0.0),
                VadConfig(kind="webrtc", aggressiveness=a, webrtc_energy_check=False),
            ]
    if kind in ("energy", "both"):
        out.append(VadConfig(kind="energy"))
        if ablation:
            out.append(VadConfig(kind="energy", speech_band_ratio=0.0))
    return out


def format_table(results: list[dict]) -> str:
    default = VadConfig()
    noise_names = list(results[0]["noise_open"])
    head = ["detector", "keywords", "_silence_", "noise all"] + noise_names + ["cpu ms/100ms"]
    rows = []
    for r in results:
        rows.append(
            [r["detector"]]
            + [f"{100 * r['keyword_recall']:.2f}%", f"{100 * r['silence_open']:.1f}%",
               f"{100 * r['noise_all_open']:.1f}%"]
            + [f"{100 * r['noise_open'][n]:.1f}%" for n in noise_names]
            + [f"{r['cpu_ms_per_100ms']:.3f}"]
        )  # fmt: skip
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    r0 = results[0]
    d = dataclasses.asdict(default)
    shared = ", ".join(
        f"{k}={v}" for k, v in d.items() if k not in ("kind", "aggressiveness", "history_ms")
    )
    out = [
        f"keywords: share of {r0['keyword_clips']} command-word clips (0.5 s digital silence "
        f"each side) with >= 1 window open (target >= {KEYWORD_TARGET:.0%})",
        f"_silence_ / noise: share of windows open ({r0['silence_windows']} / "
        f"{r0['noise_windows']} windows; target <= {NOISE_TARGET:.0%})",
        f"windows of {WINDOW_SAMPLES} samples every {HOP}, audio pushed in {CHUNK}-sample "
        "chunks; cpu = gate CPU time per 100 ms of audio",
        f"settings unless the row says otherwise: {shared}",
        "",
        line(head),
        line(["-" * w for w in widths]),
        *(line(row) for row in rows),
    ]
    for r in results:
        if r["config"] == dataclasses.asdict(default):
            ok_kw = r["keyword_recall"] >= KEYWORD_TARGET
            ok_noise = max(r["silence_open"], r["noise_all_open"]) <= NOISE_TARGET
            out += [
                "",
                f"default ({r['detector'].removesuffix(' (default)')}): keywords "
                f"{'meet' if ok_kw else 'MISS'} the target, "
                f"_silence_/noise {'meet' if ok_noise else 'MISS'} the target",
            ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m streamkws.tools.vad_report", description=__doc__
                                 .split("\n")[0])  # fmt: skip
    ap.add_argument("--data", type=Path, default=None,
                    help="data folder (default: $STREAMKWS_DATA or ../shared/data)")  # fmt: skip
    ap.add_argument("--kind", choices=("webrtc", "energy", "both"), default="both")
    ap.add_argument("--aggressiveness", type=int, choices=(0, 1, 2, 3), default=None,
                    help="only this WebRTC mode (default: all four)")  # fmt: skip
    ap.add_argument("--ablation", action="store_true",
                    help="also measure the detectors without their extra checks")  # fmt: skip
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    root = args.data or default_data_dir()
    if not root.is_dir():
        print(f"error: data folder {root} not found (use --data or STREAMKWS_DATA)",
              file=sys.stderr)  # fmt: skip
        return 2
    data = load_data(root)
    results = [measure(cfg, data) for cfg in configs(args.kind, args.aggressiveness, args.ablation)]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(format_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
