"""Helpers for end-to-end tests: real-speech test streams and a ZeroMQ subscriber."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
import zmq

from streamkws.data import KEYWORDS, load_dataset, load_noise, speaker_split
from streamkws.tools.streams import Placed, build_stream, speech_contrast_db, write_wav


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def heldout_stream(data_dir: Path, out: Path, n_per_keyword: int = 3, n_unknown: int = 40,
                   seed: int = 0) -> tuple[Path, list[Placed]]:
    """Keywords at known times from speakers the default model never trained on (its
    validation split), shuffled with other words, over the real noise recordings."""
    _, val = speaker_split(load_dataset(data_dir / "speech_commands_v2_real"), 0.15, 0)
    rng = np.random.default_rng(seed)
    from streamkws.audio.wav import load_audio

    def audible(items):
        return [it for it in items if speech_contrast_db(load_audio(it.path)) >= 20.0]

    clips = []
    for kw in KEYWORDS:
        items = audible([it for it in val.items if it.label == kw])
        for k in rng.permutation(len(items))[:n_per_keyword]:
            clips.append((kw, items[k].path))
    unknown = [it for it in val.items if it.label == "_unknown_"]
    for k in rng.permutation(len(unknown))[:n_unknown]:
        clips.append((unknown[k].word, unknown[k].path))
    clips = [clips[i] for i in rng.permutation(len(clips))]
    noise = load_noise(data_dir / "noise")
    audio, placed = build_stream(clips, noise, gap_s=(1.5, 3.5), snr_db=20.0, seed=seed)
    write_wav(out, audio)
    return out, placed


class Subscriber(threading.Thread):
    """Collects every message from a PUB endpoint until a final status or a timeout."""

    def __init__(self, endpoint: str, timeout: float = 60.0) -> None:
        super().__init__(daemon=True)
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.setsockopt(zmq.RECONNECT_IVL, 10)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.timeout = timeout
        self.messages: list[tuple[str, dict, float]] = []

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        try:
            while time.monotonic() < deadline:
                if not poller.poll(100):
                    continue
                topic, body = self.sock.recv_multipart()
                msg = json.loads(body)
                self.messages.append((topic.decode(), msg, time.time()))
                if msg.get("type") == "status" and msg.get("final"):
                    return
        finally:
            self.sock.close()

    def detections(self) -> list[dict]:
        return [m for t, m, _ in self.messages if t == "detection"]


def score(detections: list[dict], truth: list[Placed], keywords=KEYWORDS) -> dict:
    """Match detections to keyword utterances: a hit is the right keyword whose
    [t_start, t_end] overlaps the utterance; anything else is a false detection."""
    kw_truth = [p for p in truth if p.word in keywords]
    hits: dict[int, list[dict]] = {}
    false = []
    for d in detections:
        match = [i for i, p in enumerate(kw_truth)
                 if p.word == d["keyword"] and d["t_start"] < p.end and d["t_end"] > p.start]
        if match:
            hits.setdefault(match[0], []).append(d)
        else:
            false.append(d)
    duplicates = sum(len(v) - 1 for v in hits.values())
    total = truth[-1].end + 1.0
    keyword_seconds = sum(p.end - p.start for p in kw_truth)
    return {"utterances": len(kw_truth), "hits": len(hits), "recall": len(hits) / len(kw_truth),
            "false": false, "duplicates": duplicates,
            "non_keyword_minutes": (total - keyword_seconds) / 60.0,
            "missed": [p for i, p in enumerate(kw_truth) if i not in hits]}
