"""The privileged helper: the only part of the client that runs as root when the engine (and the desktop
app) run as an ordinary user.  docs/PRIVILEGES.md describes how it is installed and invoked.

It speaks JSON lines on a Unix stream socket handed to it as file descriptor 0 (the engine makes a
socketpair and starts ``pkexec /usr/libexec/shallot/shallot-helper`` with one end as stdin; a test or a
service manager can start ``shallot helper`` as root the same way).  One request, one reply:

    {"op": "hello", "version": 1, "kill_switch": true}   -> {"ok": true, "version": 1, "uid": 1000}
    {"op": "open_tun", "mtu": 1360}                      -> {"ok": true}  + the TUN's fd (SCM_RIGHTS)
    {"op": "set_address", "address": "100.64.0.7"}        -> {"ok": true}
    {"op": "route", "guards": [["192.0.2.21", 9001]]}     -> {"ok": true}
    {"op": "set_dns", "servers": ["100.64.0.1"]}          -> {"ok": true}
    {"op": "restore"}                                     -> {"ok": true}
    any failure                                           -> {"ok": false, "error": "one line"}

Every argument is checked before anything runs (addresses must be what a Shallot tunnel needs, nothing
else), so the caller can make the helper do exactly these things to Shallot's own device, routes, table
and resolver settings, and nothing more.  When the socket closes (the engine quit or crashed) the helper
restores everything and exits: no route, rule, device or DNS change outlives the engine.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

from shallot.core.errors import ShallotError
from shallot.core.peercred import peer_uid
from shallot.core.vpn.netconfig import NetConfig, cleanup
from shallot.core.wire.ipconfig import POOL

log = logging.getLogger("shallot.helper")
PROTOCOL_VERSION = 1
MAX_LINE = 4096
MAX_GUARDS = 12  # endpoints of the guard's link: the guard and up to 4 introducers, twice while switching
MAX_DNS = 3
MIN_MTU, MAX_MTU = 576, 1500
INSTALLED_HELPER = Path("/usr/libexec/shallot/shallot-helper")
HELPER_ENV = "SHALLOT_HELPER"  # another helper path (development checkouts, tests); pkexec's policy still applies
CAP_NET_ADMIN = 12
REQUEST_TIMEOUT_S = 30.0
TUNSETOWNER = 0x400454CC


class PrivilegeError(ShallotError):
    """The helper is missing, was refused, or died.  ``code``: helper-missing, helper-denied, helper-failed."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class BadRequest(ValueError):
    pass


# ---------------------------------------------------------------------------------------------- validation
def _ipv4(value: Any, what: str) -> ipaddress.IPv4Address:
    if not isinstance(value, str) or len(value) > 15:
        raise BadRequest(f"{what} must be an IPv4 address")
    try:
        return ipaddress.IPv4Address(value)
    except ValueError:
        raise BadRequest(f"{what} must be an IPv4 address") from None


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise BadRequest(f"{what} must be an integer in {lo}..{hi}")
    return value


def parse_request(line: bytes) -> dict[str, Any]:
    """Decode and check one request; BadRequest says what is wrong.  Returns the op and its checked
    arguments, nothing else from the input."""
    if len(line) > MAX_LINE:
        raise BadRequest("request too long")
    try:
        req = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("not JSON") from None
    if not isinstance(req, dict) or not isinstance(req.get("op"), str):
        raise BadRequest("a request is an object with an 'op'")
    op = req["op"]
    if op == "hello":
        if req.get("version") != PROTOCOL_VERSION:
            raise BadRequest(f"this helper speaks version {PROTOCOL_VERSION}")
        if not isinstance(req.get("kill_switch"), bool):
            raise BadRequest("kill_switch must be true or false")
        return {"op": op, "kill_switch": req["kill_switch"]}
    if op == "open_tun":
        return {"op": op, "mtu": _int(req.get("mtu"), "mtu", MIN_MTU, MAX_MTU)}
    if op == "set_address":
        address = _ipv4(req.get("address"), "address")
        if address not in POOL:
            raise BadRequest(f"a tunnel address must be in {POOL}")
        return {"op": op, "address": str(address)}
    if op == "route":
        guards = req.get("guards")
        if not isinstance(guards, list) or not 1 <= len(guards) <= MAX_GUARDS:
            raise BadRequest(f"guards must be a list of 1..{MAX_GUARDS} [address, port] pairs")
        checked = []
        for item in guards:
            if not isinstance(item, list) or len(item) != 2:
                raise BadRequest("a guard is an [address, port] pair")
            host = _ipv4(item[0], "a guard's address")
            if host.is_loopback or host.is_multicast or host.is_unspecified or host.is_reserved \
                    or host.is_link_local or host in POOL or host == ipaddress.IPv4Address("255.255.255.255"):
                raise BadRequest(f"{host} cannot be a guard's address")
            checked.append((str(host), _int(item[1], "a guard's port", 1, 65535)))
        return {"op": op, "guards": checked}
    if op == "set_dns":
        servers = req.get("servers")
        if not isinstance(servers, list) or not 1 <= len(servers) <= MAX_DNS:
            raise BadRequest(f"servers must be a list of 1..{MAX_DNS} addresses")
        checked_dns = [_ipv4(s, "a DNS server") for s in servers]
        if any(s not in POOL for s in checked_dns):  # the exit's resolver sits behind the tunnel
            raise BadRequest(f"DNS servers must be in {POOL}")
        return {"op": op, "servers": [str(s) for s in checked_dns]}
    if op == "restore":
        return {"op": op}
    raise BadRequest(f"unknown op {op[:32]!r}")


# ---------------------------------------------------------------------------------------------- the helper
def serve(sock: socket.socket) -> int:
    """Run the helper on ``sock`` until it closes; returns the exit status."""
    if os.geteuid() != 0:
        raise ShallotError("the helper must run as root (through pkexec, or by root)")
    env_uid = os.environ.get("PKEXEC_UID", "")
    peer = peer_uid(sock)
    uid = int(env_uid) if env_uid.isdigit() else peer if peer is not None else -1
    net: NetConfig | None = None
    reader = sock.makefile("rb")
    log.info("helper serving uid %d", uid)

    def reply(obj: dict[str, Any], fds: list[int] | None = None) -> None:
        data = json.dumps(obj).encode() + b"\n"
        if fds:
            sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        else:
            sock.sendall(data)

    try:
        while True:
            line = reader.readline(MAX_LINE + 1)
            if not line:
                break
            try:
                req = parse_request(line)
                op = req["op"]
                if op != "hello" and net is None:
                    raise BadRequest("say hello first")
                if op == "hello":
                    if net is not None:
                        raise BadRequest("hello once")
                    cleanup(quiet=True)  # start from nothing, even after a crashed session
                    net = NetConfig(kill_switch=req["kill_switch"])
                    reply({"ok": True, "version": PROTOCOL_VERSION, "uid": uid})
                    continue
                assert net is not None
                if op == "open_tun":
                    if net.fd < 0:
                        net.open_tun(req["mtu"])
                        if uid > 0:
                            fcntl.ioctl(net.fd, TUNSETOWNER, uid)  # the user's device, as far as the kernel cares
                    reply({"ok": True}, [net.fd])
                    continue
                if op == "set_address":
                    net.set_address(req["address"])
                elif op == "route":
                    net.route_through_tunnel(req["guards"])
                elif op == "set_dns":
                    net.set_dns(req["servers"])
                elif op == "restore":
                    net.restore()
                reply({"ok": True})
            except (BadRequest, ShallotError, OSError) as exc:
                log.warning("refused: %s", exc)
                reply({"ok": False, "error": str(exc)[:300]})
    except (ConnectionError, OSError) as exc:
        log.warning("helper socket: %s", exc)
    finally:
        if net is not None:
            net.restore()  # the engine is gone: put everything back
        log.info("helper done; everything restored")
    return 0


# ---------------------------------------------------------------------------------------------- the engine's side
def can_admin_network() -> bool:
    """Whether this process may configure the network itself (root with CAP_NET_ADMIN)."""
    if os.geteuid() != 0:
        return False
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except (OSError, ValueError):
        pass
    return True


class HelperNetConfig:
    """NetConfig's interface, carried out by the privileged helper."""

    def __init__(self, sock: socket.socket, *, kill_switch: bool, proc: subprocess.Popen[bytes] | None = None) -> None:
        self.sock = sock
        self.proc = proc
        self.kill_switch = kill_switch
        self.fd = -1
        self.guards: list[tuple[str, int]] = []
        self.address: str | None = None
        self.dns_servers: list[str] = []
        self._buf = b""
        sock.settimeout(REQUEST_TIMEOUT_S)

    def _call(self, req: dict[str, Any], *, want_fd: bool = False) -> tuple[dict[str, Any], int]:
        try:
            self.sock.sendall(json.dumps(req).encode() + b"\n")
            fd = -1
            while b"\n" not in self._buf:
                data, ancdata, _flags, _addr = self.sock.recvmsg(65536, socket.CMSG_SPACE(4 * 4))
                for level, kind, payload in ancdata:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fds = array.array("i")
                        fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                        for received in fds:
                            if want_fd and fd < 0:
                                fd = received
                            else:
                                os.close(received)  # nothing else is expected: never leak an fd
                if not data:
                    raise PrivilegeError("helper-failed", "the privileged helper quit")
                self._buf += data
        except OSError as exc:  # TimeoutError included
            raise PrivilegeError("helper-failed", f"the privileged helper does not answer: {exc}") from None
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            reply = json.loads(line)
        except ValueError:
            raise PrivilegeError("helper-failed", "the privileged helper sent garbage") from None
        if not isinstance(reply, dict) or not reply.get("ok"):
            if fd >= 0:
                os.close(fd)
            error = reply.get("error") if isinstance(reply, dict) else None
            raise ShallotError(f"privileged helper: {error or 'refused'}")
        return reply, fd

    def hello(self) -> int:
        reply, _ = self._call({"op": "hello", "version": PROTOCOL_VERSION, "kill_switch": self.kill_switch})
        return int(reply.get("uid", -1))

    def open_tun(self, mtu: int) -> int:
        _, fd = self._call({"op": "open_tun", "mtu": mtu}, want_fd=True)
        if fd < 0:
            raise PrivilegeError("helper-failed", "the privileged helper did not pass the TUN device")
        os.set_blocking(fd, False)
        self.fd = fd
        return fd

    def set_address(self, address: str) -> None:
        if self.address != address:
            self._call({"op": "set_address", "address": address})
            self.address = address

    def route_through_tunnel(self, guards: list[tuple[str, int]]) -> None:
        self._call({"op": "route", "guards": [[h, p] for h, p in guards]})
        self.guards = list(guards)

    def set_dns(self, servers: list[str]) -> None:
        if servers != self.dns_servers:
            self._call({"op": "set_dns", "servers": servers})
            self.dns_servers = list(servers)

    def restore(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # the device goes when the helper closes its fd too
            self.fd = -1
        with contextlib.suppress(ShallotError):
            self._call({"op": "restore"})
        self.guards, self.address, self.dns_servers = [], None, []

    def close(self) -> None:
        """End the session: the helper restores everything and exits."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.sock.close()
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                log.warning("the privileged helper did not exit")


def start_helper(*, kill_switch: bool, helper_fd: int | None = None) -> HelperNetConfig:
    """Reach the privileged helper: on ``helper_fd`` (a socket somebody root started it on), else by
    starting the installed helper through pkexec.  Blocks while polkit asks the user: call it off the
    event loop."""
    if helper_fd is not None:
        try:
            sock = socket.socket(fileno=helper_fd)
        except OSError as exc:
            raise PrivilegeError("helper-missing", f"--helper-fd {helper_fd}: {exc.strerror}") from None
        net = HelperNetConfig(sock, kill_switch=kill_switch)
        net.hello()
        return net
    pkexec = shutil.which("pkexec")
    helper = Path(os.environ.get(HELPER_ENV) or INSTALLED_HELPER)
    if not helper.exists() or pkexec is None:
        missing = helper if not helper.exists() else "pkexec (policykit-1)"
        raise PrivilegeError("helper-missing", f"the privileged helper is not installed ({missing} is missing): "
                                               "install Shallot's package, run as root, or use probe mode")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = subprocess.Popen([pkexec, str(helper)], stdin=theirs, stdout=subprocess.DEVNULL)
    theirs.close()
    net = HelperNetConfig(ours, kill_switch=kill_switch, proc=proc)
    ours.settimeout(300)  # the user may take a while to answer polkit's password dialog
    try:
        net.hello()
    except PrivilegeError:
        code = proc.poll()
        if code in (126, 127):  # pkexec: dialog dismissed / not authorized
            raise PrivilegeError("helper-denied", "permission to configure the network was refused") from None
        raise
    ours.settimeout(REQUEST_TIMEOUT_S)
    return net
