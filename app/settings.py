"""The app's settings: one JSON file per user ($XDG_CONFIG_HOME/shallot/settings.json), validated field by
field.  A file that is not JSON (or not an object) is corrupt: it is renamed aside, never deleted, and the
app starts from defaults and says so.  A single bad value falls back to its default with a message.

Parsing (``parse_settings``, ``parse_peers``) is pure so hypothesis can throw anything at it; only
``SettingsStore`` touches the disk.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shallot.core.control.errors import ErrorKind

log = logging.getLogger("shallot.app.settings")

SETTINGS_VERSION = 1
MAX_PEERS = 32
MAX_SETTINGS_BYTES = 256 * 1024
SOURCES = ("directory", "bootstrap")
THEMES = ("system", "light", "dark")


class SettingsError(ValueError):
    """A value the user typed (or a file holds) that the app cannot use; the message is one plain line and
    ``kind`` says which advice fits (no directory file at all, or something else to fix)."""

    def __init__(self, message: str, kind: ErrorKind = ErrorKind.SETTINGS) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Settings:
    source: str = "directory"  # where relays come from: a directory file or DHT bootstrap peers
    directory: str = ""  # path of the directory file
    bootstrap: tuple[str, ...] = ()  # "host:port" of DHT peers
    route_all: bool = False  # VPN mode: the engine routes the system through the circuit (needs the helper)
    kill_switch: bool = True  # in VPN mode: nothing leaves outside the tunnel
    dns_through_tunnel: bool = True  # in VPN mode: name lookups go through the exit
    start_minimized: bool = False  # start in the tray
    connect_on_start: bool = False
    exit: str = ""  # relay id of the chosen exit; "" = automatic
    theme: str = "system"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


@dataclass
class LoadResult:
    settings: Settings
    problems: list[str] = field(default_factory=list)  # plain-words notes for the user (empty: all fine)
    moved_aside: Path | None = None  # where a corrupt file went


def parse_hostport(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port``; the host is an IP address or a DNS name."""
    text = text.strip()
    if not text:
        raise SettingsError("an empty peer address")
    if text.startswith("["):
        host, sep, port_s = text[1:].partition("]:")
        if not sep:
            raise SettingsError(f"{text!r}: write IPv6 peers as [address]:port")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise SettingsError(f"{text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_s = text.rpartition(":")
        if not sep or not host:
            raise SettingsError(f"{text!r}: write peers as host:port, e.g. 192.0.2.7:7001")
        if ":" in host:
            raise SettingsError(f"{text!r}: write IPv6 peers as [address]:port")
        if not _is_ipv4(host) and not _is_dns_name(host):
            raise SettingsError(f"{text!r}: {host!r} is neither an IP address nor a host name")
    if not port_s.isascii() or not port_s.isdigit() or not 1 <= int(port_s) <= 65535:
        raise SettingsError(f"{text!r}: the port must be a number from 1 to 65535")
    return host, int(port_s)


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def _is_dns_name(host: str) -> bool:
    if len(host) > 253 or not host.isascii():
        return False
    labels = host.rstrip(".").split(".")
    if all(label.isdigit() for label in labels):
        return False  # looks like a broken IPv4 address, not a name
    return all(0 < len(label) <= 63 and label[0] != "-" and label[-1] != "-"
               and all(c.isalnum() or c == "-" for c in label) for label in labels)


def parse_peers(text: str) -> tuple[str, ...]:
    """Peers separated by commas, spaces or new lines; each checked; duplicates dropped."""
    parts = [p for chunk in text.replace(",", " ").split() if (p := chunk.strip())]
    if len(parts) > MAX_PEERS:
        raise SettingsError(f"at most {MAX_PEERS} bootstrap peers")
    out: list[str] = []
    for part in parts:
        parse_hostport(part)
        if part not in out:
            out.append(part)
    return tuple(out)


def check_usable(s: Settings) -> None:
    """Whether the app can start an engine with these settings; raises SettingsError saying what to fix."""
    if s.source == "directory":
        if not s.directory:
            raise SettingsError("no directory file is set: choose one in Settings (Ctrl+,)", ErrorKind.NO_DIRECTORY)
    elif not s.bootstrap:
        raise SettingsError("no bootstrap peers are set: add at least one host:port in Settings (Ctrl+,)")


def parse_settings(raw: Any) -> tuple[Settings, list[str]]:
    """Settings from a decoded JSON value.  Raises SettingsError if ``raw`` is not an object (the file is
    corrupt); a bad field falls back to its default and adds a problem line."""
    if not isinstance(raw, dict):
        raise SettingsError("the settings file does not hold a JSON object")
    defaults = Settings()
    values: dict[str, Any] = {}
    problems: list[str] = []

    def bad(key: str, why: str) -> None:
        problems.append(f"setting {key!r} {why}; using the default")

    for f in dataclasses.fields(Settings):
        if f.name not in raw:
            continue
        value = raw[f.name]
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            if not isinstance(value, bool):
                bad(f.name, "must be true or false")
                continue
        elif f.name == "bootstrap":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                bad(f.name, "must be a list of host:port strings")
                continue
            try:
                value = parse_peers(",".join(value))
            except SettingsError as exc:
                bad(f.name, f"is unusable ({exc})")
                continue
        elif not isinstance(value, str):
            bad(f.name, "must be a string")
            continue
        elif f.name == "source" and value not in SOURCES:
            bad(f.name, f"must be one of {', '.join(SOURCES)}")
            continue
        elif f.name == "theme" and value not in THEMES:
            bad(f.name, f"must be one of {', '.join(THEMES)}")
            continue
        elif f.name == "exit" and value and not (len(value) <= 64 and all(c in "0123456789abcdef" for c in value)):
            bad(f.name, "must be a relay id (hex digits) or empty for automatic")
            continue
        elif len(value) > 4096 or "\x00" in value:
            bad(f.name, "is too long or holds a NUL character")
            continue
        values[f.name] = value
    return Settings(**values), problems


def settings_to_json(s: Settings) -> str:
    data: dict[str, Any] = {"version": SETTINGS_VERSION, **dataclasses.asdict(s)}
    data["bootstrap"] = list(s.bootstrap)
    return json.dumps(data, indent=2) + "\n"


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or ""
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".config"
    return root / "shallot"


def state_dir() -> Path:
    """$XDG_STATE_HOME/shallot: where the engine the app starts writes its log."""
    base = os.environ.get("XDG_STATE_HOME") or ""
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".local" / "state"
    return root / "shallot"


class SettingsStore:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path or config_dir() / "settings.json"

    def load(self) -> LoadResult:
        try:
            with self.path.open("rb") as f:
                data = f.read(MAX_SETTINGS_BYTES + 1)
        except FileNotFoundError:
            return LoadResult(Settings())
        except OSError as exc:
            return LoadResult(Settings(), [f"cannot read {self.path} ({exc.strerror}); using the defaults"])
        try:
            if len(data) > MAX_SETTINGS_BYTES:
                raise SettingsError("the settings file is too large")
            try:
                raw = json.loads(data.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                raise SettingsError("the settings file is not valid JSON") from None
            settings, problems = parse_settings(raw)
        except SettingsError as exc:
            aside = self._move_aside()
            where = f"kept as {aside.name}" if aside else "it could not be moved aside"
            msg = f"{exc}: started from the default settings (the old file is {where})"
            log.warning("%s", msg)
            return LoadResult(Settings(), [msg], aside)
        for p in problems:
            log.warning("%s", p)
        return LoadResult(settings, problems)

    def save(self, settings: Settings) -> None:
        """Atomically (write a temporary file, then rename), 0600: the file names the user's relays."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(settings_to_json(settings))
        os.replace(tmp, self.path)

    def _move_aside(self) -> Path | None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for n in range(100):
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}" + (f"-{n}" if n else ""))
            if not aside.exists():
                try:
                    os.replace(self.path, aside)
                except OSError:
                    return None
                return aside
        return None
