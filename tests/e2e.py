"""Helpers for end-to-end tests: a ZeroMQ subscriber that records what was published."""

from __future__ import annotations

import json
import socket
import threading
import time

import zmq


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Subscriber(threading.Thread):
    """Collects every message from a PUB endpoint until a final status or a timeout."""

    def __init__(self, endpoint: str, timeout: float = 60.0,
                 topics: tuple[bytes, ...] = (b"",)) -> None:
        super().__init__(daemon=True)
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.SUB)
        for topic in topics:
            self.sock.setsockopt(zmq.SUBSCRIBE, topic)
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
