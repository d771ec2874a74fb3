"""The privileged helper: the only part of the client that runs as root when the engine (and the desktop
app) run as an ordinary user.  docs/PRIVILEGES.md describes how it is installed and invoked; the requests
and their checks are in core/vpn/helper_protocol.py; the engine's side is core/vpn/helper_client.py.

It speaks JSON lines on a Unix stream socket handed to it as file descriptor 0 (the engine makes a
socketpair and starts ``pkexec /usr/libexec/shallot/shallot-helper`` with one end as stdin; a test or a
service manager can start ``shallot helper`` as root the same way).  Every request is checked before
anything runs, so the caller can make the helper do exactly these things to Shallot's own device, routes,
table and resolver settings, and nothing more.

When the socket closes the helper exits.  After an explicit ``restore`` nothing is left.  An engine that
vanished without one (a crash, ``kill -9``) leaves the kill switch on: with a block in place the table,
its marker and the DNS change stay (the device goes with its fds), so the user's traffic never leaves in
the clear because the engine failed; without one (kill switch off) everything is restored.  A new
session's ``hello`` keeps such a block for its own ``route`` to replace (docs/PRIVILEGES.md).
"""

from __future__ import annotations

import array
import logging
import os
import socket
from collections.abc import Callable
from typing import Protocol

from shallot.core.errors import ShallotError
from shallot.core.peercred import peer_uid
from shallot.core.vpn.helper_protocol import (
    MAX_LINE,
    BadRequest,
    Done,
    Hello,
    OpenTun,
    Refused,
    Reply,
    Request,
    Restore,
    Route,
    SetAddress,
    SetDns,
    Welcome,
    encode_reply,
    parse_request,
)
from shallot.core.vpn.netconfig import NetConfig, cleanup
from shallot.core.wire.jsonlines import LineFramer, TooLong

log = logging.getLogger("shallot.helper")
READ_CHUNK = 4096


class SessionNet(Protocol):
    """What a session does its work with: NetConfig (core/vpn/netconfig.py), or a test's stand-in."""

    fd: int

    def open_tun(self, mtu: int, owner: int | None = None) -> int: ...
    def set_address(self, address: str) -> None: ...
    def route_through_tunnel(self, guards: list[tuple[str, int]]) -> None: ...
    def set_dns(self, servers: list[str]) -> None: ...
    def restore(self) -> None: ...
    def abandon(self) -> bool: ...


def _new_session() -> Callable[[bool], SessionNet]:
    """The real thing: leftovers of an earlier session cleaned up, except a kept kill switch."""
    def start(kill_switch: bool) -> SessionNet:
        cleanup(quiet=True, keep_block=True)
        return NetConfig(kill_switch=kill_switch)
    return start


def _caller_uid(sock: socket.socket) -> int:
    """The user we serve: pkexec says who asked (PKEXEC_UID); else whoever is on the socket."""
    env_uid = os.environ.get("PKEXEC_UID", "")
    if env_uid.isdigit():
        return int(env_uid)
    peer = peer_uid(sock)
    return peer if peer is not None else -1


class _Session:
    """One engine's session: its NetConfig exists from ``hello`` on; when the session ends it is put back,
    unless the engine vanished with the kill switch on (``end``).  ``start``: makes the session's NetConfig
    at ``hello`` (after cleaning up what an earlier session left)."""

    def __init__(self, uid: int, start: Callable[[bool], SessionNet] | None = None) -> None:
        self.uid = uid
        self.net: SessionNet | None = None
        self._start = start or _new_session()

    def handle(self, line: bytes) -> tuple[Reply, list[int]]:
        """One request line -> its reply and the fds to pass with it.  A refusal changes nothing more."""
        try:
            return self.dispatch(parse_request(line))
        except (BadRequest, ShallotError, OSError) as exc:
            log.warning("refused: %s", exc)
            return Refused(str(exc)), []

    def dispatch(self, request: Request) -> tuple[Reply, list[int]]:
        if isinstance(request, Hello):
            return self.hello(request), []
        net = self.net
        if net is None:
            raise BadRequest("say hello first")
        match request:
            case OpenTun(mtu=mtu):
                return Done(), [self.open_tun(net, mtu)]
            case SetAddress(address=address):
                net.set_address(str(address))
            case Route(guards=guards):
                net.route_through_tunnel([(str(host), port) for host, port in guards])
            case SetDns(servers=servers):
                net.set_dns([str(server) for server in servers])
            case Restore():
                net.restore()
        return Done(), []

    def hello(self, request: Hello) -> Welcome:
        if self.net is not None:
            raise BadRequest("hello once")
        # start from nothing, even after a crashed session; but a kill switch kept after an engine died stays
        # until this session's route replaces it or its restore removes it: no window opens in between
        self.net = self._start(request.kill_switch)
        return Welcome(self.uid)

    def open_tun(self, net: SessionNet, mtu: int) -> int:
        """A new device each time: the engine asks again only when it lost the one it had (removed by hand)."""
        return net.open_tun(mtu, owner=self.uid if self.uid > 0 else None)

    def end(self) -> None:
        """The socket closed.  After a ``restore`` there is nothing left to put back; without one the engine
        vanished, and a kill switch in place stays on (``abandon``)."""
        if self.net is not None:
            self.net.abandon()


def _send(sock: socket.socket, reply: Reply, fds: list[int]) -> None:
    data = encode_reply(reply)
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.sendall(data)


def serve(sock: socket.socket, *, start: Callable[[bool], SessionNet] | None = None) -> int:
    """Run the helper on ``sock`` until it closes; returns the exit status.  ``start``: a stand-in for
    NetConfig (tests only; the real helper must run as root)."""
    if start is None and os.geteuid() != 0:
        raise ShallotError("the helper must run as root (through pkexec, or by root)")
    session = _Session(_caller_uid(sock), start)
    framer = LineFramer(MAX_LINE)  # an over-long line is refused once and thrown away up to its newline
    log.info("helper serving uid %d", session.uid)
    try:
        while data := sock.recv(READ_CHUNK):
            for line in framer.feed(data):
                if isinstance(line, TooLong):
                    log.warning("refused: request too long")
                    _send(sock, Refused("request too long"), [])
                else:
                    _send(sock, *session.handle(line))
    except (ConnectionError, OSError) as exc:
        log.warning("helper socket: %s", exc)
    finally:
        session.end()
        log.info("helper done")
    return 0
