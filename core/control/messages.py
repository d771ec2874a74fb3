"""The control protocol's messages (pure): the greeting, every request as a dataclass with one JSON codec,
and the typed replies that are not a snapshot (docs/PROTOCOL.md §9.2-9.5).

On the wire a request is ``{"id": int, "cmd": str, "args": {...}}``; ``decode_request(cmd, args)`` turns
the last two into a request or raises ControlError (UNKNOWN_COMMAND, BAD_REQUEST), ``Request.to_args``
is the way back.  Unknown argument fields are ignored, as everywhere in the control API.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, ClassVar

from shallot.core.control.config import EngineConfig
from shallot.core.control.errors import ControlError, ErrorKind
from shallot.core.errors import ShallotError
from shallot.crypto.descriptor import Descriptor

CONTROL_VERSION = 2
MAX_LINE = 64 * 1024
ADDED_IN_2 = frozenset({"configure"})  # what a version 1 server (no "supports" in its hello) lacks


class Role(enum.Enum):
    CLIENT = "client"  # the client engine
    RELAY = "relay"
    EXIT = "exit"


@dataclass(frozen=True)
class Hello:
    """The server's first line: who answers here, which protocol version, which commands."""

    role: Role
    supports: frozenset[str] = frozenset()
    version: int = CONTROL_VERSION

    def to_json(self) -> dict[str, Any]:
        return {"shallot": "control", "version": self.version, "role": self.role.value,
                "supports": sorted(self.supports)}

    @classmethod
    def from_json(cls, raw: Any) -> Hello:
        """Versions 1 and 2 share the framing; a version 1 hello lists no commands.  Raises ControlError."""
        if not isinstance(raw, dict) or raw.get("shallot") != "control":
            raise ControlError(ErrorKind.BAD_REQUEST, "is not a Shallot control socket")
        version = raw.get("version")
        if version not in (1, CONTROL_VERSION) or isinstance(version, bool):
            raise ControlError(ErrorKind.BAD_REQUEST,
                               f"speaks control version {str(version)[:20]}, we speak {CONTROL_VERSION}")
        try:
            role = Role(raw.get("role"))
        except ValueError:
            raise ControlError(ErrorKind.BAD_REQUEST, f"has an unknown role {str(raw.get('role'))[:20]!r}") from None
        listed = raw.get("supports")
        supports = frozenset(c for c in listed if isinstance(c, str)) if isinstance(listed, list) else frozenset()
        return cls(role, supports, version)

    def can(self, cmd: str) -> bool:
        """Whether the server answers ``cmd`` (a version 1 server: everything but what version 2 added)."""
        return cmd in self.supports if self.version >= 2 else cmd not in ADDED_IN_2


# ---------------------------------------------------------------------------------------------- requests


class _NoArgs:
    CMD: ClassVar[str]

    def to_args(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> Any:
        return cls()


@dataclass(frozen=True)
class Status(_NoArgs):
    CMD: ClassVar[str] = "status"


@dataclass(frozen=True)
class Peers(_NoArgs):
    CMD: ClassVar[str] = "peers"


@dataclass(frozen=True)
class Circuits(_NoArgs):
    """Relays and exits only (§9.4)."""

    CMD: ClassVar[str] = "circuits"


@dataclass(frozen=True)
class Disconnect(_NoArgs):
    CMD: ClassVar[str] = "disconnect"


@dataclass(frozen=True)
class NewCircuit(_NoArgs):
    CMD: ClassVar[str] = "new_circuit"


@dataclass(frozen=True)
class Shutdown(_NoArgs):
    CMD: ClassVar[str] = "shutdown"


@dataclass(frozen=True)
class Subscribe(_NoArgs):
    """Built into every server (§9.3): from now on, events on this connection."""

    CMD: ClassVar[str] = "subscribe"


@dataclass(frozen=True)
class Connect:
    CMD: ClassVar[str] = "connect"
    exit: str | None = None  # relay id, id prefix or nickname; None: any exit
    path: str | None = None  # "guard,middle,exit"

    def to_args(self) -> dict[str, Any]:
        return {k: v for k, v in (("exit", self.exit), ("path", self.path)) if v}

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> Connect:
        return cls(exit=_optional_text(args, "exit"), path=_optional_text(args, "path"))


@dataclass(frozen=True)
class SetDirectory:
    CMD: ClassVar[str] = "set_directory"
    path: str

    def to_args(self) -> dict[str, Any]:
        return {"path": self.path}

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> SetDirectory:
        path = args.get("path")
        if not isinstance(path, str) or not path:
            raise ControlError(ErrorKind.BAD_REQUEST, "set_directory needs a 'path'")
        return cls(path)


@dataclass(frozen=True)
class Configure:
    """The engine's settings, replaced as a whole; the arguments are the EngineConfig object itself."""

    CMD: ClassVar[str] = "configure"
    config: EngineConfig

    def to_args(self) -> dict[str, Any]:
        return self.config.to_json()

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> Configure:
        return cls(EngineConfig.from_json(args))


Request = (Status | Peers | Circuits | Connect | Disconnect | NewCircuit | SetDirectory | Configure | Shutdown
           | Subscribe)
REQUESTS: dict[str, type[Request]] = {cls.CMD: cls for cls in (
    Status, Peers, Circuits, Connect, Disconnect, NewCircuit, SetDirectory, Configure, Shutdown, Subscribe)}


def encode_request(rid: int, request: Request) -> dict[str, Any]:
    return {"id": rid, "cmd": request.CMD, "args": request.to_args()}


def decode_request(cmd: str, args: dict[str, Any]) -> Request:
    cls = REQUESTS.get(cmd)
    if cls is None:
        raise ControlError(ErrorKind.UNKNOWN_COMMAND, f"unknown command {cmd[:80]!r}")
    return cls.from_args(args)


def _optional_text(args: dict[str, Any], key: str) -> str | None:
    value = args.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 4096:
        raise ControlError(ErrorKind.BAD_REQUEST, f"'{key}' must be a string")
    return value


# ---------------------------------------------------------------------------------------------- replies


class ReplyError(ShallotError):
    """A reply that does not have the shape its command promises."""


@dataclass(frozen=True)
class DhtPeer:
    id: str  # DHT node id, hex
    address: str  # "host:port"

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "address": self.address}


@dataclass(frozen=True)
class RelayEntry:
    id: str
    nickname: str
    address: str  # "host:port"
    exit: bool
    published: int | None = None  # from the DHT view; a directory file's entries leave them out
    expires: int | None = None

    @classmethod
    def of(cls, desc: Descriptor, *, dated: bool = True) -> RelayEntry:
        return cls(desc.id_hex, desc.nickname, f"{desc.address[0]}:{desc.address[1]}", desc.is_exit,
                   desc.published if dated else None, desc.expires if dated else None)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "nickname": self.nickname, "address": self.address, "exit": self.exit}
        if self.published is not None and self.expires is not None:
            out.update(published=self.published, expires=self.expires)
        return out


@dataclass(frozen=True)
class PeersReply:
    """``peers`` (§9.4, §9.5): the DHT nodes we know and the relays of our view or directory file."""

    dht: bool
    dht_peers: tuple[DhtPeer, ...] = ()
    relays: tuple[RelayEntry, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"dht_peers": [p.to_json() for p in self.dht_peers], "relays": [r.to_json() for r in self.relays],
                "dht": self.dht}

    @classmethod
    def from_json(cls, raw: Any) -> PeersReply:
        """Raises ReplyError and nothing else."""
        try:
            peers = tuple(DhtPeer(_str(p["id"]), _str(p["address"])) for p in raw.get("dht_peers") or [])
            relays = tuple(RelayEntry(_str(r["id"]), _str(r["nickname"]), _str(r["address"]), r["exit"] is True,
                                      _int(r.get("published")), _int(r.get("expires")))
                           for r in raw.get("relays") or [])
            return cls(raw.get("dht") is True, peers, relays)
        except (AttributeError, KeyError, TypeError, ValueError):
            raise ReplyError("the peers reply is malformed") from None


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("not a string")
    return value[:500]


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
