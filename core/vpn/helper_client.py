"""The engine's side of the privileged helper (core/vpn/helper.py): reach it (pkexec, or a socket somebody
root started it on) and ask it for NetConfig's operations.  Runs as the user; needs no privileges and no
netlink.  The requests and replies are in core/vpn/helper_protocol.py.
"""

from __future__ import annotations

import array
import logging
import os
import shutil
import socket
import subprocess
from pathlib import Path

from shallot.core.errors import ShallotError
from shallot.core.vpn.helper_protocol import (
    BadReply,
    Refused,
    Reply,
    Welcome,
    encode_hello,
    encode_open_tun,
    encode_restore,
    encode_route,
    encode_set_address,
    encode_set_dns,
    parse_reply,
)

log = logging.getLogger("shallot.helper")
INSTALLED_HELPER = Path("/usr/libexec/shallot/shallot-helper")
HELPER_ENV = "SHALLOT_HELPER"  # another helper path (development checkouts, tests); pkexec's policy still applies
CAP_NET_ADMIN = 12
REQUEST_TIMEOUT_S = 30.0
POLKIT_TIMEOUT_S = 300.0  # the user may take a while to answer polkit's password dialog
PKEXEC_REFUSED = (126, 127)  # pkexec's exit status: dialog dismissed / not authorized


class PrivilegeError(ShallotError):
    """The helper is missing, was refused, or died.  ``code``: helper-missing, helper-denied, helper-failed."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


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


def _received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return list(fds)


class HelperNetConfig:
    """NetConfig's interface, carried out by the privileged helper.  ``alive`` turns false for good once the
    helper failed (it quit, stopped answering or sent garbage): a new session is needed then."""

    def __init__(self, sock: socket.socket, *, kill_switch: bool, proc: subprocess.Popen[bytes] | None = None) -> None:
        self.sock = sock
        self.proc = proc
        self.kill_switch = kill_switch
        self.alive = True
        self.fd = -1
        self.guards: list[tuple[str, int]] = []
        self.address: str | None = None
        self.dns_servers: list[str] = []
        self._buf = b""
        sock.settimeout(REQUEST_TIMEOUT_S)

    def _receive(self, *, want_fd: bool) -> tuple[bytes, int]:
        """One reply line, and the fd that came with it if ``want_fd`` (any other fd is closed: never leak one)."""
        fd = -1
        while b"\n" not in self._buf:
            data, ancdata, _flags, _addr = self.sock.recvmsg(65536, socket.CMSG_SPACE(4 * 4))
            for received in _received_fds(ancdata):
                if want_fd and fd < 0:
                    fd = received
                else:
                    os.close(received)
            if not data:
                if fd >= 0:
                    os.close(fd)
                raise PrivilegeError("helper-failed", "the privileged helper quit")
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        return line, fd

    def _call(self, request: bytes, *, want_fd: bool = False) -> tuple[Reply, int]:
        if not self.alive:
            raise PrivilegeError("helper-failed", "the privileged helper quit")
        try:
            return self._exchange(request, want_fd=want_fd)
        except PrivilegeError:
            self.alive = False
            raise

    def _exchange(self, request: bytes, *, want_fd: bool) -> tuple[Reply, int]:
        try:
            self.sock.sendall(request)
            line, fd = self._receive(want_fd=want_fd)
        except OSError as exc:  # TimeoutError included
            raise PrivilegeError("helper-failed", f"the privileged helper does not answer: {exc}") from None
        try:
            reply = parse_reply(line)
        except BadReply:
            reply = None
        if isinstance(reply, Refused | None) and fd >= 0:
            os.close(fd)
        if reply is None:
            raise PrivilegeError("helper-failed", "the privileged helper sent garbage")
        if isinstance(reply, Refused):
            raise ShallotError(f"privileged helper: {reply.error or 'refused'}")
        return reply, fd

    def hello(self) -> int:
        reply, _ = self._call(encode_hello(self.kill_switch))
        return reply.uid if isinstance(reply, Welcome) else -1

    def open_tun(self, mtu: int) -> int:
        self.close_device()
        _, fd = self._call(encode_open_tun(mtu), want_fd=True)
        if fd < 0:
            self.alive = False
            raise PrivilegeError("helper-failed", "the privileged helper did not pass the TUN device")
        os.set_blocking(fd, False)
        self.fd = fd
        return fd

    def close_device(self) -> None:
        """Let go of our fd of the device (it went away, or the session ends); a new one has no address."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.address = None

    def set_address(self, address: str) -> None:
        if self.address != address:
            self._call(encode_set_address(address))
            self.address = address

    def route_through_tunnel(self, guards: list[tuple[str, int]]) -> None:
        self._call(encode_route(guards))
        self.guards = list(guards)

    def set_dns(self, servers: list[str]) -> None:
        if servers != self.dns_servers:
            self._call(encode_set_dns(servers))
            self.dns_servers = list(servers)

    def restore(self) -> None:
        """An explicit disconnect: the helper puts everything back, a kept kill switch included.  Raises
        PrivilegeError when the helper is gone (then nothing was restored: its kill switch stays)."""
        self.close_device()  # the device goes when the helper closes its fd too
        self.guards, self.dns_servers = [], []
        try:
            self._call(encode_restore())
        except PrivilegeError:
            raise
        except ShallotError as exc:  # refused: it did what it could
            log.warning("%s", exc)

    def close(self) -> None:
        """End the session.  After a ``restore`` the helper has nothing to put back; without one it keeps a
        kill switch that is in place (an engine that crashes ends its session this way)."""
        self.close_device()
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
    ours.settimeout(POLKIT_TIMEOUT_S)
    try:
        net.hello()
    except PrivilegeError:
        if proc.poll() in PKEXEC_REFUSED:
            raise PrivilegeError("helper-denied", "permission to configure the network was refused") from None
        raise
    ours.settimeout(REQUEST_TIMEOUT_S)
    return net
