"""Typed configuration, validated once at start-up.

Each section is a frozen dataclass; a TOML file overrides any subset of keys. Unknown keys,
wrong types and out-of-range values raise :class:`ConfigError` naming the full key (for
example ``vad.aggressiveness``), so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamkws.errors import ConfigError, ConfigFileError
from streamkws.features import FrontEndConfig
from streamkws.vad import VadConfig

SYSTEM_CONFIG = Path("/etc/streamkws/streamkws.toml")


@dataclass(frozen=True)
class AudioConfig:
    source: str = "mic"
    """``mic``, ``mic:<index or name substring>``, ``wav:<path>``, ``-`` (stdin) or ``demo``."""
    block_ms: int = 20
    """Capture block length; shorter blocks cut latency, longer ones cost less CPU."""
    ring_seconds: float = 10.0
    """Ring buffer capacity: how far processing may fall behind before audio is lost."""
    realtime: bool = True
    """Pace file sources like a microphone (``false`` replays as fast as the CPU allows)."""
    retry_max_s: float = 10.0
    """A microphone that fails or vanishes is reopened after 0.5 s, then after waits that
    double up to this long, until it is back."""
    stall_timeout_s: float = 5.0
    """A microphone that delivers no audio this long counts as gone and is reopened
    (0 = never; some drivers stop calling back instead of reporting an error). stdin,
    which cannot be reopened, is reported as stalled instead, and waited for."""

    stdin_live: bool = False
    """stdin (``-``) is a live capture (``arecord ... | streamkws run --source -``): when
    the model falls behind, whole windows are skipped and counted, as for a microphone,
    instead of the producer being made to wait (which loses its audio where the daemon
    cannot count it). A producer faster than real time (a piped file) then overflows the
    ring, counted as overruns. Off: stdin is replayed like a file, nothing skipped."""

    def validate(self, prefix: str = "audio") -> AudioConfig:
        if not 1 <= self.block_ms <= 1000:
            raise ConfigError(f"{prefix}.block_ms", f"must be within 1..1000 (got {self.block_ms})")
        if not 1.0 <= self.ring_seconds <= 600.0:
            raise ConfigError(
                f"{prefix}.ring_seconds", f"must be within 1..600 (got {self.ring_seconds})"
            )
        if not self.source:
            raise ConfigError(f"{prefix}.source", "must not be empty")
        if not 0.5 <= self.retry_max_s <= 3600.0:
            raise ConfigError(f"{prefix}.retry_max_s",
                              f"must be within 0.5..3600 (got {self.retry_max_s})")
        # Much below the default, a device's slow first block (an idle PulseAudio sink
        # renders 2 s at a time) would be mistaken for a lost device.
        if self.stall_timeout_s != 0 and not 1.0 <= self.stall_timeout_s <= 600.0:
            raise ConfigError(f"{prefix}.stall_timeout_s",
                              f"must be 0 (off) or within 1..600 (got {self.stall_timeout_s})")
        return self


@dataclass(frozen=True)
class WindowConfig:
    hop_ms: int = 100
    """A model window is formed every ``hop_ms`` (100 ms = 10 windows per second)."""

    def validate(self, prefix: str = "windows") -> WindowConfig:
        if not 10 <= self.hop_ms <= 1000:
            raise ConfigError(f"{prefix}.hop_ms", f"must be within 10..1000 (got {self.hop_ms})")
        return self

    def hop_frames(self, frontend: FrontEndConfig) -> int:
        frames = self.hop_ms / frontend.hop_ms
        if abs(frames - round(frames)) > 1e-9:
            raise ConfigError(
                "windows.hop_ms",
                f"must be a multiple of frontend.hop_ms ({frontend.hop_ms:g} ms)",
            )
        return round(frames)


@dataclass(frozen=True)
class ModelConfig:
    name: str = "default"
    """A bundle path, or a bundled model: ``default`` (int8), ``default-float``, or
    ``accurate`` (``default`` paired with a speech-embedding head; ~3x the CPU)."""
    threads: int = 1
    """torch threads for inference; 1 keeps the daemon to one core of a small board."""
    max_lag_ms: int = 500
    """A live stream's windows this far behind the newest audio are skipped (counted as
    dropped_windows) so the detector catches up instead of falling ever further behind."""

    def validate(self, prefix: str = "model") -> ModelConfig:
        if not self.name:
            raise ConfigError(f"{prefix}.name", "must not be empty")
        if not 1 <= self.threads <= 64:
            raise ConfigError(f"{prefix}.threads", f"must be within 1..64 (got {self.threads})")
        if not 100 <= self.max_lag_ms <= 60000:
            raise ConfigError(f"{prefix}.max_lag_ms",
                              f"must be within 100..60000 (got {self.max_lag_ms})")
        return self


DEFAULT_THRESHOLD = 0.75
"""``detect.threshold`` for a model whose bundle carries no calibrated threshold."""


@dataclass(frozen=True)
class DetectConfig:
    threshold: float | None = None
    """Smoothed posterior a keyword must reach (keywords without their own threshold).
    Unset: the threshold calibrated into the model's bundle (the shipped models carry
    one; see their cards), else ``DEFAULT_THRESHOLD`` (0.75, a reasonable start for a
    single network you trained, to calibrate with ``stream-eval``). A mixture of models,
    whose posteriors are means of several opinions, needs a lower one, so a fixed number
    here would suit one model and not another."""
    thresholds: dict[str, float] = field(default_factory=dict)
    """Per-keyword thresholds, e.g. ``{ yes = 0.8, go = 0.9 }``."""
    calibrated_for: str = ""
    """The sha256 (its first 12 or more hex digits) of the model these thresholds were
    calibrated for; ``stream-eval --write-config`` sets it. When the model loaded is
    another (a bundle retrained or replaced under the same name), the daemon warns: the
    thresholds no longer mean what they did. Empty: not checked."""
    average_windows: int = 3
    """Posteriors are averaged over the last this-many windows."""
    min_windows: int = 2
    """Consecutive windows the smoothed posterior must stay above threshold."""
    refractory_ms: int = 1000
    """After a detection, the same keyword is not reported again for this long."""
    ignore: tuple[str, ...] = ("_silence_", "_unknown_")
    """Labels that never publish."""

    def for_model(self, calibrated: float | None) -> DetectConfig:
        """These settings with the threshold filled in: this config's own if it sets one,
        else the model's ``calibrated`` one, else ``DEFAULT_THRESHOLD``."""
        if self.threshold is not None:
            return self
        chosen = DEFAULT_THRESHOLD if calibrated is None else float(calibrated)
        return dataclasses.replace(self, threshold=chosen)

    def calibration_mismatch(self, model: str, name: str, sha256: str) -> str | None:
        """Why these thresholds may not suit the model that ``model`` (as configured)
        loads, ``name`` with ``sha256``; None when they were calibrated for it, or nobody
        said for which."""
        if not self.calibrated_for or sha256.startswith(self.calibrated_for):
            return None
        return (f"the thresholds were calibrated for model {self.calibrated_for} "
                f"(detect.calibrated_for), but {model} is {name} ({sha256[:12]}): calibrate "
                "them for it (stream-eval --target-fa-per-hour)")

    def describe(self, calibrated: float | None) -> str:
        """The threshold in force with a model whose calibrated one is ``calibrated``, and
        where it comes from, for the log an operator reads."""
        source = ("the config's" if self.threshold is not None else
                  "calibrated in the model" if calibrated is not None else "built-in default")
        text = f"threshold {self.for_model(calibrated).threshold:g} ({source})"
        if self.thresholds:
            text += ", per keyword " + ", ".join(f"{k} {v:g}" for k, v in
                                                 sorted(self.thresholds.items()))
        return text

    def validate(self, prefix: str = "detect") -> DetectConfig:
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"{prefix}.threshold",
                              f"must be within (0, 1] (got {self.threshold})")
        for k, v in self.thresholds.items():
            if not 0.0 < v <= 1.0:
                raise ConfigError(f"{prefix}.thresholds.{k}", f"must be within (0, 1] (got {v})")
        if self.calibrated_for and not re.fullmatch(r"[0-9a-f]{12,64}", self.calibrated_for):
            raise ConfigError(f"{prefix}.calibrated_for",
                              "must be a model's sha256, 12 to 64 lower-case hex digits "
                              f"(got {self.calibrated_for!r})")
        if not 1 <= self.average_windows <= 50:
            raise ConfigError(f"{prefix}.average_windows",
                              f"must be within 1..50 (got {self.average_windows})")
        if not 1 <= self.min_windows <= 50:
            raise ConfigError(f"{prefix}.min_windows",
                              f"must be within 1..50 (got {self.min_windows})")
        if not 0 <= self.refractory_ms <= 60000:
            raise ConfigError(f"{prefix}.refractory_ms",
                              f"must be within 0..60000 (got {self.refractory_ms})")
        return self


def tcp_host(endpoint: str) -> str:
    """The host of a ``tcp://`` endpoint, as written (``[::1]`` keeps its brackets). Of a
    connect-style ``source;dest``, the destination's; the host is before the last ':'."""
    return endpoint[len("tcp://"):].rpartition(":")[0].split(";")[-1]


def tcp_port_problem(endpoint: str) -> str | None:
    """Why a ``tcp://`` endpoint's port is not one (ZeroMQ would wrap 99999 round to
    another port without a word), or None."""
    if not endpoint.startswith("tcp://"):
        return None
    port = endpoint.rpartition(":")[2]
    if port == "*" or (port.isdecimal() and int(port) <= 65535):
        return None
    return f"the port must be 0-65535 or * (got {endpoint!r})"


@dataclass(frozen=True)
class PublishConfig:
    endpoint: str = "tcp://127.0.0.1:5556"
    """Where the PUB socket binds: tcp://HOST:PORT or ipc:///path. Loopback by default;
    binding all interfaces (tcp://*:5556) must be asked for."""
    high_water_mark: int = 1000
    """Messages queued per subscriber before ZeroMQ drops for that subscriber only."""
    status_interval_s: float = 5.0
    """A status message is published at least this often."""
    curve_secret_key: str = ""
    """CURVE: path of the server's secret key file (zmq.auth certificate); empty = off."""
    curve_authorized_keys: str = ""
    """CURVE: folder of client public keys allowed to subscribe; empty = any client that
    knows the server's public key."""

    def validate(self, prefix: str = "publish") -> PublishConfig:
        # Not inproc://: no subscriber outside this process could ever reach it.
        if not self.endpoint.startswith(("tcp://", "ipc://")):
            raise ConfigError(
                f"{prefix}.endpoint",
                f"must start with tcp:// or ipc:// (got {self.endpoint!r})",
            )
        problem = tcp_port_problem(self.endpoint)
        if problem:
            raise ConfigError(f"{prefix}.endpoint", problem)
        # Below ~100, ZeroMQ drops in bursts even for subscribers that keep up (it learns
        # what a subscriber has read only every half-HWM messages).
        if not 100 <= self.high_water_mark <= 1_000_000:
            raise ConfigError(f"{prefix}.high_water_mark",
                              f"must be within 100..1000000 (got {self.high_water_mark})")
        if not 0.1 <= self.status_interval_s <= 5.0:
            raise ConfigError(f"{prefix}.status_interval_s",
                              f"must be within 0.1..5 (got {self.status_interval_s})")
        if self.curve_authorized_keys and not self.curve_secret_key:
            raise ConfigError(f"{prefix}.curve_authorized_keys",
                              "needs publish.curve_secret_key as well")
        return self


@dataclass(frozen=True)
class Config:
    audio: AudioConfig = field(default_factory=AudioConfig)
    frontend: FrontEndConfig = field(default_factory=FrontEndConfig)
    windows: WindowConfig = field(default_factory=WindowConfig)
    vad: VadConfig = field(default_factory=VadConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)

    def validate(self) -> Config:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        self.windows.hop_frames(self.frontend)
        return self

    def replace(self, **sections: Any) -> Config:
        return dataclasses.replace(self, **sections).validate()


def parse(data: dict[str, Any]) -> Config:
    """Build a validated :class:`Config` from nested dicts (as TOML gives)."""
    return _build(Config, data, "").validate()


def load(path: str | Path) -> Config:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigFileError(str(p), f"cannot read config file ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ConfigFileError(
            str(p), f"not a text file (invalid UTF-8 at byte {exc.start})"
        ) from None
    try:
        data = tomllib.loads(text)
    except ValueError as exc:
        # TOMLDecodeError, and the ValueError int() raises for integers over 4300 digits
        raise ConfigFileError(str(p), f"not valid TOML ({exc})") from None
    except RecursionError:  # tomllib recurses once per level of nested arrays and tables
        raise ConfigFileError(str(p), "not valid TOML (nested too deeply)") from None
    return relative_to(parse(data), p.parent)


BUNDLED_MODELS = {"default": "default.skw", "default-float": "default-float.skw",
                  "accurate": "accurate.skw"}
"""The models shipped in the package, by the name ``model.name`` and ``--model`` take,
and their files in ``streamkws/models/bundled/``. Here rather than in :mod:`.bundle` so
that reading a config, which must tell these names from paths, needs no torch."""


def relative_to(cfg: Config, folder: Path) -> Config:
    """``cfg`` with its relative file paths taken from ``folder`` (the config file's).

    A service runs in ``/``, a user in a shell somewhere else: a path that meant the
    working directory would name different files for each. Paths are ``model.name``
    unless it names a bundled model, ``audio.source``'s ``wav:<path>``, and the two CURVE
    key paths; ``~`` is the home folder of whoever runs the daemon.
    """
    folder = folder.resolve()

    def fix(key: str, path: str) -> str:
        if not path:
            return path
        try:
            expanded = Path(path).expanduser()
        except RuntimeError:  # ~user of a user this system does not have
            raise ConfigError(key, f"cannot expand {path!r}: no such user") from None
        return str(expanded if expanded.is_absolute() else folder / expanded)

    model, audio, publish = cfg.model, cfg.audio, cfg.publish
    if model.name not in BUNDLED_MODELS:
        model = dataclasses.replace(model, name=fix("model.name", model.name))
    if audio.source.startswith("wav:"):
        audio = dataclasses.replace(audio,
                                    source="wav:" + fix("audio.source", audio.source[4:]))
    publish = dataclasses.replace(
        publish,
        curve_secret_key=fix("publish.curve_secret_key", publish.curve_secret_key),
        curve_authorized_keys=fix("publish.curve_authorized_keys",
                                  publish.curve_authorized_keys))
    return cfg.replace(model=model, audio=audio, publish=publish)


def find_config_file(explicit: str | Path | None = None) -> Path | None:
    """The config file to use: ``--config``, then ``$STREAMKWS_CONFIG``, then the system one."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("STREAMKWS_CONFIG")
    if env:
        return Path(env)
    # exists(), not is_file(): a folder or a file we may not read there is an error to
    # report, not a reason to run on built-in defaults unawares.
    return SYSTEM_CONFIG if SYSTEM_CONFIG.exists() else None


def load_default(explicit: str | Path | None = None) -> Config:
    path = find_config_file(explicit)
    if path is None:
        return Config().validate()
    try:
        return load(path)
    except ConfigError as exc:
        # A file nobody named on this command line: say which, and where it came from.
        if explicit:
            raise
        origin = ("named by $STREAMKWS_CONFIG" if os.environ.get("STREAMKWS_CONFIG") else
                  "the system config, which the search order finds; --config FILE picks "
                  "another")
        if isinstance(exc, ConfigFileError):
            raise ConfigFileError(str(path), f"{exc.reason} ({origin})") from None
        raise ConfigError(exc.key, f"{exc.reason} (in {path}, {origin})") from None


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(prefix.rstrip("."), f"must be a table, got {_kind(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{_key_name(key)}"
        if key not in names:
            # parse() also takes dicts built in code, whose keys need not be strings.
            close = difflib.get_close_matches(key, names, n=1) if isinstance(key, str) else []
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(full, f"unknown key{hint}")
        kwargs[key] = _coerce(hints[key], value, full)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, f"{key}.")
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        errors = []
        for opt in options:
            try:
                return _coerce(opt, value, key)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is dict:
        ktp, vtp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(key, f"must be a table, got {_kind(value)}")
        return {
            _coerce(ktp, k, f"{key}.{_key_name(k)}"): _coerce(vtp, v, f"{key}.{_key_name(k)}")
            for k, v in value.items()
        }
    if origin in (list, tuple):
        (etp, *_) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(key, f"must be a list, got {_kind(value)}")
        return origin(_coerce(etp, v, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {_kind(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, got {_kind(value)}")
        _check_int64(value, key)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"must be a number, got {_kind(value)}")
        if not isinstance(value, float):
            _check_int64(value, key)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {_kind(value)}")
        return value
    raise TypeError(f"config type {tp!r} of {key} is not supported")  # a bug, not user error


def _check_int64(value: int, key: str) -> None:
    # TOML integers are 64-bit; bigger ones (which dicts built in code can hold) would
    # overflow float() and, past 4300 digits, even str() in the range messages.
    if not -(1 << 63) <= value < 1 << 63:
        raise ConfigError(key, "must be a 64-bit integer, got a larger one")


def _kind(value: Any) -> str:
    name = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a table"}.get(type(value), type(value).__name__)
    return f"{name} ({_short(value)})" if isinstance(value, bool | int | float | str) else name


def _short(value: Any) -> str:
    """``repr`` for an error message: bounded, and safe for integers too long for str()."""
    if isinstance(value, int) and not -(1 << 63) <= value < 1 << 63:
        return f"a {value.bit_length()}-bit integer"
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def _key_name(key: Any) -> str:
    return key if isinstance(key, str) else _short(key)


def dumps(cfg: Config, header: str = "") -> str:
    """The whole configuration as TOML that :func:`load` reads back to an equal Config
    (given absolute paths: load takes relative ones from the file's folder).

    Tools that tune settings (``stream-eval --target-fa-per-hour``) write complete files,
    so a daemon pointed at one runs exactly what was measured, whatever its built-in
    defaults become later.
    """
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        lines += ["", f"[{f.name}]"]
        for sf in dataclasses.fields(section):
            value = getattr(section, sf.name)
            if value is None:  # TOML has no null: an unset key is left out, and reads back unset
                lines.append(f"# {sf.name}: unset")
                continue
            lines.append(f"{sf.name} = {_toml_value(value)}")
    return "\n".join(lines).lstrip("\n") + "\n"


def _toml_key(key: str) -> str:
    return key if key and all(c.isalnum() or c in "_-" for c in key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return json.dumps(value)  # JSON numbers and strings are valid TOML
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        inner = ", ".join(f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")
