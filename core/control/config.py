"""The engine's settings (pure): what ``shallot engine``/``shallot connect`` read from their flags and what
the app sends with ``configure`` (docs/PROTOCOL.md §9.5), one dataclass for both.

What stays a process argument and is not here: the control socket, ``--helper-fd`` (a descriptor means
nothing in another process) and ``--own-relay`` (this machine's relay, never used in its circuits).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from shallot.core.control.errors import ControlError, ErrorKind

MAX_PEERS = 32
MAX_PEER_TEXT = 300
MAX_PATH = 4096


@dataclass(frozen=True)
class EngineConfig:
    directory: str | None = None  # a directory file of signed descriptors (``shallot directory``)
    bootstrap: tuple[str, ...] = ()  # or: "IP:port" of relays to discover the network from through the DHT
    cache: str | None = None  # with bootstrap: the network view cache (None: ~/.cache/shallot/network-view)
    vpn: bool = False  # route the system's IPv4 through the circuit (TUN, routes, kill switch, DNS)
    kill_switch: bool = True  # with vpn: nothing leaves outside the tunnel while connected or reconnecting
    dns: bool = True  # with vpn: the system's name lookups go to the exit's resolver
    private_network: bool = False  # accept loopback/private relay addresses (a test or private network)

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        return {"directory": self.directory, "bootstrap": list(self.bootstrap), "cache": self.cache,
                "vpn": self.vpn, "kill_switch": self.kill_switch, "dns": self.dns,
                "private_network": self.private_network}

    @classmethod
    def from_json(cls, raw: Any) -> EngineConfig:
        """Checks shapes only (which files exist and which peers parse is the engine's business); an absent
        field takes its default, an unknown one is ignored; raises ControlError(BAD_REQUEST)."""
        if not isinstance(raw, dict):
            raise _bad("the configuration must be an object")
        peers = raw.get("bootstrap", [])
        if not isinstance(peers, list) or len(peers) > MAX_PEERS or not all(
                isinstance(p, str) and 0 < len(p) <= MAX_PEER_TEXT and "," not in p for p in peers):
            raise _bad(f"'bootstrap' must be a list of at most {MAX_PEERS} \"host:port\" strings")
        flags = {}
        for key in ("vpn", "kill_switch", "dns", "private_network"):
            value = raw.get(key, getattr(cls, key))
            if not isinstance(value, bool):
                raise _bad(f"'{key}' must be true or false")
            flags[key] = value
        return cls(directory=_path(raw, "directory"), bootstrap=tuple(peers), cache=_path(raw, "cache"), **flags)


def _path(raw: dict[str, Any], key: str) -> str | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_PATH or "\x00" in value:
        raise _bad(f"'{key}' must be a file path or null")
    return value


def _bad(message: str) -> ControlError:
    return ControlError(ErrorKind.BAD_REQUEST, f"configure: {message}")
