"""The privileged helper's protocol (docs/PROTOCOL.md §9.6): what the engine may ask the root helper, as
typed requests and replies, and the JSON lines that carry them.  Pure: bytes in, values out.

JSON lines on a Unix stream socket, one request, one reply:

    {"op": "hello", "version": 1, "kill_switch": true}   -> {"ok": true, "version": 1, "uid": 1000}
    {"op": "open_tun", "mtu": 1360}                      -> {"ok": true}  + the TUN's fd (SCM_RIGHTS)
    {"op": "set_address", "address": "100.64.0.7"}        -> {"ok": true}
    {"op": "route", "guards": [["192.0.2.21", 9001]]}     -> {"ok": true}
    {"op": "set_dns", "servers": ["100.64.0.1"]}          -> {"ok": true}
    {"op": "restore"}                                     -> {"ok": true}
    any failure                                           -> {"ok": false, "error": "one line"}

The helper runs as root for an ordinary user, so ``parse_request`` checks every argument into an
``ipaddress`` object or a bounded int before anything runs: addresses must be what a Shallot tunnel needs,
nothing else, and nothing from the input but the checked fields gets through.  The engine's side sends
plain values with the ``encode_*`` functions and leaves the checking to the helper, which is the side
that must not trust the other.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from shallot.core.wire.ipconfig import POOL
from shallot.core.wire.jsonlines import loads

PROTOCOL_VERSION = 1
MAX_LINE = 4096
MAX_GUARDS = 12  # endpoints of the guard's link: the guard and up to 4 introducers, twice while switching
MAX_DNS = 3
MIN_MTU, MAX_MTU = 576, 1500
MAX_ERROR = 300  # characters of a refusal's reason
BROADCAST = IPv4Address("255.255.255.255")


class BadRequest(ValueError):
    """A request the helper refuses; the message says why (and goes back to the engine)."""


class BadReply(ValueError):
    """The helper's answer is not a JSON line."""


# ---------------------------------------------------------------------------------------------- requests
@dataclass(frozen=True)
class Hello:
    """First, once: start a session (the helper cleans up whatever an earlier one left, except a kill switch
    kept after an engine died: the session's ``route`` replaces that, its ``restore`` removes it)."""
    kill_switch: bool


@dataclass(frozen=True)
class OpenTun:
    """Create ``shallot0`` and pass its fd back."""
    mtu: int


@dataclass(frozen=True)
class SetAddress:
    """The tunnel address (/32 on ``shallot0``); always inside POOL."""
    address: IPv4Address


@dataclass(frozen=True)
class Route:
    """Everything into the tunnel except the guards' endpoints, which the kill switch lets out."""
    guards: tuple[tuple[IPv4Address, int], ...]


@dataclass(frozen=True)
class SetDns:
    """The system's DNS to the exit's resolvers (inside POOL: behind the tunnel)."""
    servers: tuple[IPv4Address, ...]


@dataclass(frozen=True)
class Restore:
    """Put routes, firewall, DNS and device back."""


Request = Hello | OpenTun | SetAddress | Route | SetDns | Restore


def _ipv4(value: Any, what: str) -> IPv4Address:
    if not isinstance(value, str) or len(value) > 15:
        raise BadRequest(f"{what} must be an IPv4 address")
    try:
        return IPv4Address(value)
    except ValueError:
        raise BadRequest(f"{what} must be an IPv4 address") from None


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise BadRequest(f"{what} must be an integer in {lo}..{hi}")
    return value


def _hello(req: dict[str, Any]) -> Hello:
    if req.get("version") != PROTOCOL_VERSION:
        raise BadRequest(f"this helper speaks version {PROTOCOL_VERSION}")
    if not isinstance(req.get("kill_switch"), bool):
        raise BadRequest("kill_switch must be true or false")
    return Hello(req["kill_switch"])


def _open_tun(req: dict[str, Any]) -> OpenTun:
    return OpenTun(_int(req.get("mtu"), "mtu", MIN_MTU, MAX_MTU))


def _set_address(req: dict[str, Any]) -> SetAddress:
    address = _ipv4(req.get("address"), "address")
    if address not in POOL:
        raise BadRequest(f"a tunnel address must be in {POOL}")
    return SetAddress(address)


def _guard(item: Any) -> tuple[IPv4Address, int]:
    if not isinstance(item, list) or len(item) != 2:
        raise BadRequest("a guard is an [address, port] pair")
    host = _ipv4(item[0], "a guard's address")
    if host.is_loopback or host.is_multicast or host.is_unspecified or host.is_reserved \
            or host.is_link_local or host in POOL or host == BROADCAST:
        raise BadRequest(f"{host} cannot be a guard's address")
    return host, _int(item[1], "a guard's port", 1, 65535)


def _route(req: dict[str, Any]) -> Route:
    guards = req.get("guards")
    if not isinstance(guards, list) or not 1 <= len(guards) <= MAX_GUARDS:
        raise BadRequest(f"guards must be a list of 1..{MAX_GUARDS} [address, port] pairs")
    return Route(tuple(_guard(item) for item in guards))


def _set_dns(req: dict[str, Any]) -> SetDns:
    servers = req.get("servers")
    if not isinstance(servers, list) or not 1 <= len(servers) <= MAX_DNS:
        raise BadRequest(f"servers must be a list of 1..{MAX_DNS} addresses")
    checked = tuple(_ipv4(s, "a DNS server") for s in servers)
    if any(s not in POOL for s in checked):  # the exit's resolver sits behind the tunnel
        raise BadRequest(f"DNS servers must be in {POOL}")
    return SetDns(checked)


_PARSERS: dict[str, Callable[[dict[str, Any]], Request]] = {
    "hello": _hello, "open_tun": _open_tun, "set_address": _set_address, "route": _route,
    "set_dns": _set_dns, "restore": lambda _req: Restore(),
}


def parse_request(line: bytes) -> Request:
    """Decode and check one request line; BadRequest says what is wrong.  Unknown fields are ignored."""
    if len(line) > MAX_LINE:
        raise BadRequest("request too long")
    try:
        req = loads(line)  # strict UTF-8, nested at most MAX_DEPTH deep: never a RecursionError in the root helper
    except ValueError as exc:
        raise BadRequest(f"not JSON ({exc})" if "deeper" in str(exc) else "not JSON") from None
    if not isinstance(req, dict) or not isinstance(req.get("op"), str):
        raise BadRequest("a request is an object with an 'op'")
    parse = _PARSERS.get(req["op"])
    if parse is None:
        raise BadRequest(f"unknown op {req['op'][:32]!r}")
    return parse(req)


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def encode_hello(kill_switch: bool) -> bytes:
    return _line({"op": "hello", "version": PROTOCOL_VERSION, "kill_switch": kill_switch})


def encode_open_tun(mtu: int) -> bytes:
    return _line({"op": "open_tun", "mtu": mtu})


def encode_set_address(address: str) -> bytes:
    return _line({"op": "set_address", "address": address})


def encode_route(guards: Sequence[tuple[str, int]]) -> bytes:
    return _line({"op": "route", "guards": [[host, port] for host, port in guards]})


def encode_set_dns(servers: Sequence[str]) -> bytes:
    return _line({"op": "set_dns", "servers": list(servers)})


def encode_restore() -> bytes:
    return _line({"op": "restore"})


# ---------------------------------------------------------------------------------------------- replies
@dataclass(frozen=True)
class Done:
    """The request was carried out (``open_tun`` also passes the device's fd)."""


@dataclass(frozen=True)
class Welcome:
    """The answer to ``hello``: the helper's version and the uid it serves (-1 when unknown)."""
    uid: int
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class Refused:
    """The request failed or was refused; nothing more was changed."""
    error: str


Reply = Done | Welcome | Refused


def encode_reply(reply: Reply) -> bytes:
    match reply:
        case Welcome(uid=uid, version=version):
            return _line({"ok": True, "version": version, "uid": uid})
        case Refused(error=error):
            return _line({"ok": False, "error": error[:MAX_ERROR]})
        case _:
            return _line({"ok": True})


def parse_reply(line: bytes) -> Reply:
    """The helper's answer, read leniently (it is our own helper): BadReply only when it is not JSON."""
    try:
        obj = loads(line)
    except ValueError:
        raise BadReply("not JSON") from None
    if not isinstance(obj, dict) or not obj.get("ok"):
        error = obj.get("error") if isinstance(obj, dict) else None
        return Refused(error if isinstance(error, str) else "")
    uid, version = obj.get("uid"), obj.get("version")
    if isinstance(uid, int) and not isinstance(uid, bool):
        return Welcome(uid, version if isinstance(version, int) else PROTOCOL_VERSION)
    return Done()
