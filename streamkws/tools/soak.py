"""Soak test: hours of real audio through ``streamkws run``, watching memory and counters.

``python -m streamkws.tools.soak --hours 2`` pipes a real speech recording, looped, into
``streamkws run --source -`` (stdin is replayed as fast as the daemon reads it), subscribes
to what it publishes, and samples the daemon's resident memory once a second. At the end
it checks what an always-on device needs: memory flat after warm-up (growth <= 5 MB by
default), every sample counted (``audio_seconds`` equals what was fed), ``seq`` without
gaps, no dropped windows or overruns, and as many detection messages received as the final
status counts.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from streamkws import SAMPLE_RATE
from streamkws.errors import ArgumentParser, StreamKWSError, exit_status
from streamkws.tools.bench import proc_status_kb, receive

log = logging.getLogger(__name__)


def rss_kb(pid: int) -> int:
    return proc_status_kb(pid, "VmRSS")


class Feeder(threading.Thread):
    """Writes the recording to the daemon's stdin again and again, then closes it."""

    def __init__(self, stream, pcm: bytes, total_bytes: int) -> None:
        super().__init__(daemon=True)
        self.stream, self.pcm, self.total = stream, pcm, total_bytes
        self.written = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        piece = 1 << 16
        try:
            while self.written < self.total:
                at = self.written % len(self.pcm)
                n = min(piece, len(self.pcm) - at, self.total - self.written)
                self.stream.write(self.pcm[at : at + n])
                self.written += n
        except BaseException as exc:  # reported by the caller
            self.error = exc
        finally:
            with contextlib.suppress(OSError):
                self.stream.close()


def soak(audio: Path, hours: float, warmup_minutes: float, config: str | None = None,
         progress: bool = True) -> dict:
    import zmq

    from streamkws.audio.wav import load_audio
    from streamkws.config import dumps, load_default
    from streamkws.progress import tqdm

    x = load_audio(audio)
    pcm = (np.clip(x, -1, 1) * 32767).round().astype("<i2").tobytes()
    total = int(hours * 3600 * SAMPLE_RATE) * 2
    sock_dir = tempfile.TemporaryDirectory(prefix="streamkws-soak-")
    endpoint = f"ipc://{sock_dir.name}/pub.sock"
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(endpoint)
    cmd = [sys.executable, "-m", "streamkws", "run", "--source", "-", "--publish", endpoint,
           "--quiet", "--wait-subscribers", "1"]
    cfg = load_default(config)
    if cfg.audio.stdin_live:
        # Fed as fast as the daemon reads, live stdin would overflow the ring: the soak
        # counts every sample, so it runs the same config with stdin replayed.
        log.info("audio.stdin_live is on in the config; the soak replays stdin in full")
        replayed = cfg.replace(audio=dataclasses.replace(cfg.audio, stdin_live=False))
        config = str(Path(sock_dir.name) / "soak.toml")
        Path(config).write_text(dumps(replayed, "the soak's copy of the config, stdin replayed"))
    if config:
        cmd += ["--config", config]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    feeder = Feeder(proc.stdin, pcm, total)
    feeder.start()
    err: list[bytes] = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
    reader.start()
    memory: list[tuple[float, float]] = []  # (audio seconds, RSS MB)
    messages: list[dict] = []
    audio_now = 0.0
    next_sample = time.monotonic()
    bar = tqdm(total=round(hours * 3600), unit="s audio", disable=not progress, leave=False)
    try:
        for item in receive(sub, proc):
            now = time.monotonic()
            if now >= next_sample:
                kb = rss_kb(proc.pid)
                if kb:
                    memory.append((audio_now, round(kb / 1024, 2)))
                next_sample = now + 1.0
            if item is None:
                continue
            msg = item[1]
            messages.append(msg)
            if msg["type"] == "status":
                bar.update(round(msg["audio_seconds"] - audio_now))
                audio_now = msg["audio_seconds"]
                if msg.get("final"):
                    break
    finally:
        bar.close()
        sub.close()
    proc.wait(timeout=30)
    reader.join(5)
    sock_dir.cleanup()
    if feeder.error is not None:
        raise StreamKWSError(f"feeding the daemon failed: {feeder.error}")
    return analyse(messages, memory, feeder.written, warmup_minutes, proc.returncode,
                   b"".join(err).decode(errors="replace"))


def analyse(messages: list[dict], memory: list[tuple[float, float]], fed_bytes: int,
            warmup_minutes: float, returncode: int, stderr: str) -> dict:
    statuses = [m for m in messages if m["type"] == "status"]
    detections = [m for m in messages if m["type"] == "detection"]
    final = statuses[-1] if statuses and statuses[-1].get("final") else None
    fed_s = fed_bytes / 2 / SAMPLE_RATE
    warm = warmup_minutes * 60
    after = [mb for t, mb in memory if t >= warm]
    baseline = after[0] if after else None
    report = {
        "fed_seconds": round(fed_s, 3),
        "returncode": returncode,
        "final_status": final,
        "detections_received": len(detections),
        "statuses": len(statuses),
        "seq_gaps": sum(1 for a, b in zip(messages, messages[1:], strict=False)
                        if b["seq"] != a["seq"] + 1) + (messages[0]["seq"] if messages else 0),
        "rss_mb": {"start": memory[0][1] if memory else None, "after_warmup": baseline,
                   "max_after_warmup": max(after) if after else None,
                   "end": memory[-1][1] if memory else None, "samples": len(memory)},
        "stderr_tail": stderr.strip()[-500:],
    }
    growth = (max(after) - baseline) if after else None
    report["rss_growth_mb"] = None if growth is None else round(growth, 2)
    checks = {
        "clean_exit": returncode == 0 and final is not None,
        "audio_seconds_equal_fed": final is not None
        and abs(final["audio_seconds"] - fed_s) <= 0.01,
        "seq_without_gaps": report["seq_gaps"] == 0,
        "no_dropped_windows_or_overruns": final is not None and final["dropped_windows"] == 0
        and final["overruns"] == 0,
        "detections_received_equal_counted": final is not None
        and final["detections"] == len(detections),
    }
    report["checks"] = checks
    report["memory"] = memory
    return report


def format_report(r: dict, limit_mb: float) -> str:
    f = r["final_status"] or {}
    m = r["rss_mb"]
    lines = [
        f"fed {r['fed_seconds'] / 3600:.2f} h of audio; daemon reports audio_seconds "
        f"{f.get('audio_seconds')} ({r['fed_seconds']:.3f} fed), inferences "
        f"{f.get('inferences')}, detections {f.get('detections')} "
        f"({r['detections_received']} received), dropped_windows {f.get('dropped_windows')}, "
        f"overruns {f.get('overruns')}, {r['statuses']} status messages, seq gaps "
        f"{r['seq_gaps']}, wall {f.get('uptime')} s",
        f"RSS MB: start {m['start']}, after warm-up {m['after_warmup']}, max after warm-up "
        f"{m['max_after_warmup']}, end {m['end']} ({m['samples']} samples); growth "
        f"{r['rss_growth_mb']} MB (limit {limit_mb:g})",
    ]
    lines += [f"  {'ok  ' if ok else 'FAIL'} {name}" for name, ok in r["checks"].items()]
    return "\n".join(lines)


def plot_memory(r: dict, path: str | Path) -> None:
    from streamkws.tools import pyplot

    plt = pyplot()

    t = [a / 3600 for a, _ in r["memory"]]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(t, [mb for _, mb in r["memory"]])
    ax.set_xlabel("audio processed (hours)")
    ax.set_ylabel("daemon RSS (MB)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m streamkws.tools.soak", description=__doc__)
    p.add_argument("--hours", type=float, default=2.0, help="audio to feed (default 2)")
    p.add_argument("--audio", type=Path, help="recording to loop (default: build 10 min of "
                                               "real speech from --data)")
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--config", help="daemon config")
    p.add_argument("--warmup-minutes", type=float, default=10.0,
                   help="audio minutes before memory must stay flat (default 10)")
    p.add_argument("--max-growth-mb", type=float, default=5.0)
    p.add_argument("--plot", metavar="PNG", help="draw RSS against audio time")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return exit_status("soak", _soak_main, args)


def _soak_main(args: argparse.Namespace) -> int:
    if args.plot:
        from streamkws.tools import pyplot

        pyplot()  # before two hours of audio, not after
    with tempfile.TemporaryDirectory(prefix="streamkws-soak-") as tmp:
        audio = args.audio
        if audio is None:
            from streamkws.tools.bench import build_speech

            audio = build_speech(args.data, Path(tmp) / "speech.wav", 10.0)
        r = soak(audio, args.hours, args.warmup_minutes, args.config, progress=not args.json)
    growth_ok = r["rss_growth_mb"] is not None and r["rss_growth_mb"] <= args.max_growth_mb
    r["checks"]["rss_growth_within_limit"] = growth_ok
    if args.plot:
        plot_memory(r, args.plot)
    if args.json:
        print(json.dumps({k: v for k, v in r.items() if k != "memory"}))
    else:
        print(format_report(r, args.max_growth_mb))
    return 0 if all(r["checks"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
