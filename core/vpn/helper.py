"""The privileged helper: the only part of the client that runs as root when the engine (and the desktop
app) run as an ordinary user.  docs/PRIVILEGES.md describes how it is installed and invoked; the requests
and their checks are in core/vpn/helper_protocol.py; the engine's side is core/vpn/helper_client.py.

It speaks JSON lines on a Unix stream socket handed to it as file descriptor 0 (the engine makes a
socketpair and starts ``pkexec /usr/libexec/shallot/shallot-helper`` with one end as stdin; a test or a
service manager can start ``shallot helper`` as root the same way).  Every request is checked before
anything runs, so the caller can make the helper do exactly these things to Shallot's own device, routes,
table and resolver settings, and nothing more.  When the socket closes (the engine quit or crashed) the
helper restores everything and exits: no route, rule, device or DNS change outlives the engine.
"""

from __future__ import annotations

import array
import fcntl
import logging
import os
import socket

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

log = logging.getLogger("shallot.helper")
TUNSETOWNER = 0x400454CC


def _caller_uid(sock: socket.socket) -> int:
    """The user we serve: pkexec says who asked (PKEXEC_UID); else whoever is on the socket."""
    env_uid = os.environ.get("PKEXEC_UID", "")
    if env_uid.isdigit():
        return int(env_uid)
    peer = peer_uid(sock)
    return peer if peer is not None else -1


class _Session:
    """One engine's session: its NetConfig exists from ``hello`` on, and everything it did is put back
    when the session ends."""

    def __init__(self, uid: int) -> None:
        self.uid = uid
        self.net: NetConfig | None = None

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
        cleanup(quiet=True)  # start from nothing, even after a crashed session
        self.net = NetConfig(kill_switch=request.kill_switch)
        return Welcome(self.uid)

    def open_tun(self, net: NetConfig, mtu: int) -> int:
        if net.fd < 0:
            net.open_tun(mtu)
            if self.uid > 0:
                fcntl.ioctl(net.fd, TUNSETOWNER, self.uid)  # the user's device, as far as the kernel cares
        return net.fd

    def end(self) -> None:
        if self.net is not None:
            self.net.restore()  # the engine is gone: put everything back


def _send(sock: socket.socket, reply: Reply, fds: list[int]) -> None:
    data = encode_reply(reply)
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.sendall(data)


def serve(sock: socket.socket) -> int:
    """Run the helper on ``sock`` until it closes; returns the exit status."""
    if os.geteuid() != 0:
        raise ShallotError("the helper must run as root (through pkexec, or by root)")
    session = _Session(_caller_uid(sock))
    reader = sock.makefile("rb")
    log.info("helper serving uid %d", session.uid)
    try:
        while line := reader.readline(MAX_LINE + 1):
            _send(sock, *session.handle(line))
    except (ConnectionError, OSError) as exc:
        log.warning("helper socket: %s", exc)
    finally:
        session.end()
        log.info("helper done; everything restored")
    return 0
