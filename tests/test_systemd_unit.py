"""The systemd unit and sysusers file in ``systemd/``: required settings, and systemd's verdict.

The settings are checked with a small unit-file parser. Where ``systemd-analyze`` is
installed the unit is also run through ``systemd-analyze verify`` and
``systemd-analyze security --offline=true`` (neither needs systemd running as PID 1), and
the sysusers file through ``systemd-sysusers --dry-run``. Missing tools skip those
tests locally and fail them under CI (``$CI`` set), where the ``systemd`` package is
installed.

Both systemd-analyze runs use a copy of the unit whose ``ExecStart=`` names ``/bin/true``:
verify rejects a command that does not exist, and ``/opt/streamkws/venv/bin/streamkws``
exists only on an installed device. Nothing else in the copy changes.

The verify output counts only where it concerns our unit (every such message names
``streamkws.service``). Messages about other units it loads on the way (``sound.target``,
``multi-user.target`` and their dependencies, as installed on the machine running the
tests) are the environment's business: they are shown, not failed on.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from streamkws.cli import build_parser
from streamkws.errors import EXIT_USER_ERROR

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "streamkws.service"
SYSUSERS = REPO / "systemd" / "streamkws.sysusers.conf"
DEFAULT_EXEC = "/opt/streamkws/venv/bin/streamkws"
MAX_EXPOSURE = 4.0

Unit = dict[str, dict[str, list[str]]]


def parse_unit(text: str) -> Unit:
    """``{section: {key: [value, ...]}}``, every assignment in order, as systemd reads them.

    Handles comments (``#``/``;`` lines), backslash continuations and repeated keys; an
    empty assignment (``Key=``) is kept as ``""``, which systemd reads as "reset".
    """
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    logical: list[str] = []
    lines: list[str] = []
    for raw in text.splitlines():
        stripped = raw.strip()
        if not logical and (not stripped or stripped[0] in "#;"):
            continue
        if stripped.endswith("\\"):
            logical.append(stripped[:-1].strip())
            continue
        logical.append(stripped)
        lines.append(" ".join(part for part in logical if part))
        logical = []
    for line in lines:
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep and section is not None, f"not a unit file line: {line!r}"
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


def effective(unit: Unit, section: str, key: str) -> str:
    """The value a single-valued setting ends up with (the last assignment wins)."""
    values = unit.get(section, {}).get(key)
    assert values, f"[{section}] {key}= is not set"
    return values[-1]


def effective_list(unit: Unit, section: str, key: str) -> list[str]:
    """A list setting: whitespace-separated items accumulate; ``Key=`` resets."""
    items: list[str] = []
    for value in unit.get(section, {}).get(key, []):
        if value == "":
            items = []
        else:
            items.extend(shlex.split(value))
    return items


@pytest.fixture(scope="module")
def unit_text() -> str:
    return UNIT.read_text()


@pytest.fixture(scope="module")
def unit(unit_text: str) -> Unit:
    return parse_unit(unit_text)


# -- the settings ---------------------------------------------------------------------------

REQUIRED_SERVICE = {
    "Type": "notify",
    "NotifyAccess": "main",
    "ExecReload": "/bin/kill -HUP $MAINPID",
    "WatchdogSec": "10",
    "Restart": "on-failure",
    "RestartSec": "2",
    "RestartPreventExitStatus": str(EXIT_USER_ERROR),  # a start-up error is not retried
    "TimeoutStopSec": "5",
    "User": "streamkws",
    "Group": "streamkws",
    "SupplementaryGroups": "audio",
    "ConfigurationDirectory": "streamkws",
    "RuntimeDirectory": "streamkws",
    "UMask": "0077",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "no",
    "DevicePolicy": "closed",
    "DeviceAllow": "char-alsa rw",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "SystemCallArchitectures": "native",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
}


@pytest.mark.parametrize("key", sorted(REQUIRED_SERVICE))
def test_required_service_setting(unit: Unit, key: str) -> None:
    assert effective(unit, "Service", key) == REQUIRED_SERVICE[key]


def test_address_families(unit: Unit) -> None:
    families = effective_list(unit, "Service", "RestrictAddressFamilies")
    assert set(families) == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}


def test_system_call_filter(unit: Unit) -> None:
    filters = unit["Service"]["SystemCallFilter"]
    assert filters[0] == "@system-service"  # the allow list comes first
    assert effective(unit, "Service", "SystemCallErrorNumber") == "EPERM"


def test_environment(unit: Unit) -> None:
    env = effective_list(unit, "Service", "Environment")
    assert "PYTHONUNBUFFERED=1" in env
    assert "OMP_NUM_THREADS=1" in env


def test_memory_deny_write_execute_stays_off(unit: Unit, unit_text: str) -> None:
    # cffi callbacks (sounddevice's microphone callback) and torch's x86 oneDNN JIT need
    # W+X memory: turning this on silently kills capture. The unit must say why.
    assert effective(unit, "Service", "MemoryDenyWriteExecute") == "no"
    assert "ffi.callback()" in unit_text


def test_install(unit: Unit) -> None:
    assert effective(unit, "Install", "WantedBy") == "multi-user.target"


def test_restarts_without_giving_up(unit: Unit) -> None:
    # An unattended device keeps retrying; the default start limit would stop it for good.
    assert effective(unit, "Unit", "StartLimitIntervalSec") == "0"


def test_exec_start_runs_the_daemon(unit: Unit, unit_text: str) -> None:
    argv = shlex.split(effective(unit, "Service", "ExecStart"))
    assert argv[0] == DEFAULT_EXEC
    # The documented default is the venv's entry point, and the comment says how to check.
    assert "command -v streamkws" in unit_text
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert Path(argv[0]).name in scripts
    args = build_parser().parse_args(argv[1:])
    assert args.command == "run"
    assert args.config == "/etc/streamkws/streamkws.toml"
    assert args.quiet is True


def test_parser_semantics() -> None:
    unit = parse_unit(
        "[Service]\n# comment\n; comment\nExecStart=/a \\\n  --flag\n"
        "Environment=A=1\nEnvironment=B=2 C=3\nCapabilityBoundingSet=\n"
        "RestrictAddressFamilies=AF_UNIX\nRestrictAddressFamilies=\n"
        "RestrictAddressFamilies=AF_INET\n"
    )
    assert effective(unit, "Service", "ExecStart") == "/a --flag"
    assert effective_list(unit, "Service", "Environment") == ["A=1", "B=2", "C=3"]
    assert effective(unit, "Service", "CapabilityBoundingSet") == ""
    assert effective_list(unit, "Service", "RestrictAddressFamilies") == ["AF_INET"]


def test_sysusers_file() -> None:
    lines = [
        shlex.split(line)
        for line in SYSUSERS.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert any(f[:2] == ["u", "streamkws"] for f in lines)
    assert ["m", "streamkws", "audio"] in lines


# -- systemd's own tools --------------------------------------------------------------------


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        msg = f"{name} not found (install the systemd package)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, SYSTEMD_COLORS="0", SYSTEMD_PAGER="", SYSTEMD_LOG_COLOR="0",
               LC_ALL="C.UTF-8")
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture
def unit_copy(tmp_path: Path, unit_text: str) -> Path:
    """The unit with ExecStart= pointing at an executable that exists here."""
    true = "/bin/true" if os.access("/bin/true", os.X_OK) else shutil.which("true")
    assert true
    text, n = re.subn(r"^ExecStart=\S+", f"ExecStart={true}", unit_text, flags=re.M)
    assert n == 1
    path = tmp_path / "streamkws.service"  # the name matters: messages name the unit
    path.write_text(text)
    return path


def _verify(analyze: str, path: Path) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    res = _run([analyze, "--no-pager", "verify", "--man=no", str(path)])
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    ours = [ln for ln in lines if path.name in ln or str(path) in ln]
    others = [ln for ln in lines if ln not in ours]
    if others:
        print("systemd-analyze verify, about other units (environmental):", *others, sep="\n  ")
    return res, ours


def test_systemd_analyze_verify(unit_copy: Path) -> None:
    analyze = _tool("systemd-analyze")
    res, ours = _verify(analyze, unit_copy)
    assert ours == [], "systemd-analyze verify:\n" + "\n".join(ours)
    assert res.returncode == 0, res.stdout + res.stderr


def test_systemd_analyze_verify_is_not_vacuous(unit_copy: Path) -> None:
    """A misspelt key must show up, or the test above proves nothing."""
    analyze = _tool("systemd-analyze")
    unit_copy.write_text(unit_copy.read_text().replace("ProtectHome=", "ProtectHomes="))
    _, ours = _verify(analyze, unit_copy)
    assert any("ProtectHomes" in ln for ln in ours), ours


def test_systemd_analyze_security(unit_copy: Path, record_property) -> None:
    analyze = _tool("systemd-analyze")
    res = _run([analyze, "--no-pager", "security", "--offline=true", str(unit_copy)])
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    m = re.search(r"Overall exposure level for streamkws\.service: (\d+(?:\.\d+)?) (\w+)", out)
    assert m, out
    score = float(m.group(1))
    record_property("exposure", score)
    print(f"systemd-analyze security: {m.group(0)}")
    assert score < MAX_EXPOSURE, out


def test_systemd_sysusers_accepts_the_file(tmp_path: Path) -> None:
    sysusers = _tool("systemd-sysusers")
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (etc / "group").write_text("root:x:0:\naudio:x:29:\n")
    res = _run([sysusers, "--dry-run", f"--root={tmp_path}", str(SYSUSERS)])
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "Creating user 'streamkws'" in out, out
