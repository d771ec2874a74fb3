"""The privileged helper's request loop (core/vpn/helper.py ``serve``) on a real socketpair: the real reader,
dispatch, replies and fd passing, with a stand-in for NetConfig injected for the test only (``start``), so
nothing here needs root or touches the network.  What it pins: hello first and once, refusals on the live
socket that change nothing, the TUN's fd passed with its reply, an explicit restore, and what the end of
the socket does (the session's ``abandon``, which keeps a kill switch that is in place: docs/PRIVILEGES.md).
"""

from __future__ import annotations

import array
import json
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shallot.core.errors import ShallotError
from shallot.core.vpn import helper
from shallot.core.vpn.helper_protocol import (
    MAX_LINE,
    encode_hello,
    encode_open_tun,
    encode_restore,
    encode_route,
    encode_set_address,
    encode_set_dns,
)
from shallot.core.wire.jsonlines import LineFramer


@dataclass
class StandIn:
    """Records what the session asked of its NetConfig; ``fail`` makes the next call raise."""

    kill_switch: bool
    calls: list[tuple] = field(default_factory=list)
    fd: int = -1
    fail: Exception | None = None
    pipe: tuple[int, int] | None = None

    def _do(self, *call: object) -> None:
        self.calls.append(call)
        if self.fail is not None:
            exc, self.fail = self.fail, None
            raise exc

    def open_tun(self, mtu: int, owner: int | None = None) -> int:
        self._do("open_tun", mtu, owner)
        self.pipe = os.pipe()  # a stand-in device: its fd goes to the engine
        self.fd = self.pipe[0]
        return self.fd

    def set_address(self, address: str) -> None:
        self._do("set_address", address)

    def route_through_tunnel(self, guards: list[tuple[str, int]]) -> None:
        self._do("route", guards)

    def set_dns(self, servers: list[str]) -> None:
        self._do("set_dns", servers)

    def restore(self) -> None:
        self._do("restore")

    def abandon(self) -> bool:
        self._do("abandon")
        return True


@dataclass
class Served:
    engine: socket.socket
    sessions: list[StandIn]
    thread: threading.Thread
    result: list[int | BaseException]
    buf: bytes = b""

    def ask(self, line: bytes) -> tuple[dict, list[int]]:
        self.engine.sendall(line)
        return self.reply()

    def reply(self) -> tuple[dict, list[int]]:
        fds: list[int] = []
        while b"\n" not in self.buf:
            data, anc, _flags, _addr = self.engine.recvmsg(65536, socket.CMSG_SPACE(4 * 4))
            for level, kind, payload in anc:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                    fds += array.array("i", payload[: len(payload) - len(payload) % 4]).tolist()
            assert data, "the helper closed the socket"
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line), fds

    def close(self) -> int:
        self.engine.close()
        self.thread.join(10)
        assert not self.thread.is_alive(), "serve() did not end when the socket closed"
        outcome = self.result[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    monkeypatch.delenv("PKEXEC_UID", raising=False)  # the uid served is then the socket's peer: this process
    engine, helper_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    engine.settimeout(10)  # a reply that never comes fails the test instead of hanging it
    sessions: list[StandIn] = []
    result: list[int | BaseException] = []

    def start(kill_switch: bool) -> StandIn:
        sessions.append(StandIn(kill_switch))
        return sessions[-1]

    def run() -> None:
        try:
            result.append(helper.serve(helper_end, start=start))
        except BaseException as exc:
            result.append(exc)
        finally:
            helper_end.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    s = Served(engine, sessions, thread, result)
    yield s
    engine.close()
    thread.join(10)
    for session in sessions:
        if session.pipe is not None:
            for fd in session.pipe:
                try:
                    os.close(fd)
                except OSError:
                    pass


def test_nothing_before_hello_then_hello_once(served: Served) -> None:
    for line in (encode_open_tun(1360), encode_route([("192.0.2.1", 9001)]), encode_restore()):
        assert served.ask(line) == ({"ok": False, "error": "say hello first"}, [])
    assert served.sessions == []  # refused before anything was made: no NetConfig, no cleanup of leftovers
    assert served.ask(encode_hello(True)) == ({"ok": True, "version": 1, "uid": os.getuid()}, [])
    assert [s.kill_switch for s in served.sessions] == [True]
    assert served.ask(encode_hello(False)) == ({"ok": False, "error": "hello once"}, [])
    assert len(served.sessions) == 1 and served.sessions[0].calls == []
    assert served.close() == 0
    assert served.sessions[0].calls == [("abandon",)]  # the engine vanished: the session decides what stays


def test_requests_go_through_checked_and_the_device_is_passed(served: Served) -> None:
    served.ask(encode_hello(True))
    net = served.sessions[0]
    reply, fds = served.ask(encode_open_tun(1360))
    assert reply == {"ok": True} and len(fds) == 1
    try:
        assert net.pipe is not None  # the fd that came over the socket is the stand-in device's
        os.write(net.pipe[1], b"packet")
        assert os.read(fds[0], 100) == b"packet"
    finally:
        os.close(fds[0])
    assert served.ask(encode_set_address("100.64.0.7"))[0] == {"ok": True}
    assert served.ask(encode_route([("192.0.2.21", 9001), ("198.51.100.5", 9002)]))[0] == {"ok": True}
    assert served.ask(encode_set_dns(["100.64.0.1"]))[0] == {"ok": True}
    owner = os.getuid() if os.getuid() > 0 else None  # a device for an ordinary user is handed to that user
    assert net.calls == [("open_tun", 1360, owner), ("set_address", "100.64.0.7"),
                         ("route", [("192.0.2.21", 9001), ("198.51.100.5", 9002)]), ("set_dns", ["100.64.0.1"])]
    assert all(type(a) is str for _, a in net.calls[1:2])  # checked values, passed as plain text


def test_refusals_on_the_live_socket_change_nothing_and_the_session_goes_on(served: Served) -> None:
    served.ask(encode_hello(True))
    net = served.sessions[0]
    for line, error in ((encode_set_address("8.8.8.8"), "100.64.0.0/10"),
                        (encode_route([("127.0.0.1", 9001)]), "cannot be a guard"),
                        (encode_set_dns(["1.1.1.1"]), "100.64.0.0/10"),
                        (b'{"op": "shell", "cmd": "rm -rf /"}\n', "unknown op"),
                        (b"not json at all\n", "not JSON"),
                        (b"[1, 2, 3]\n", "an object with an 'op'")):
        reply, fds = served.ask(line)
        assert reply["ok"] is False and error in reply["error"] and fds == []
    assert net.calls == []
    # a failure of the work itself is a refusal too, in one line, and the next request is served
    net.fail = ShallotError("nftables refused the kill switch: no such table")
    assert served.ask(encode_route([("192.0.2.21", 9001)]))[0] == {
        "ok": False, "error": "nftables refused the kill switch: no such table"}
    net.fail = OSError(1, "Operation not permitted")
    assert served.ask(encode_set_address("100.64.0.9"))[0]["ok"] is False
    assert served.ask(encode_set_address("100.64.0.9"))[0] == {"ok": True}
    # a line longer than the limit is refused whole: its tail, a valid request, is thrown away with it
    reply, _ = served.ask(b'{"op": "restore", "pad": "' + b"x" * MAX_LINE + b'"}{"op": "restore"}\n')
    assert reply == {"ok": False, "error": "request too long"}
    assert served.ask(encode_set_address("100.64.0.10")) == ({"ok": True}, [])  # the next answer is the next request's
    assert ("restore",) not in net.calls


@pytest.mark.parametrize("line", [
    b'{"op": "restore", "x": ' + b"[" * 3_000 + b"\n",  # unclosed: the parser would recurse 3 000 deep
    b'{"op": "restore", "x": ' + b"[" * 40 + b"]" * 40 + b"}\n",
    b'{"op": "restore", "x": ' + b'{"a": ' * 600 + b"\n",
])
def test_deep_json_is_refused_and_the_helper_goes_on(served: Served, line: bytes) -> None:
    served.ask(encode_hello(True))
    reply, fds = served.ask(line)
    assert reply == {"ok": False, "error": "not JSON (nested deeper than 32)"} and fds == []
    assert served.ask(encode_set_address("100.64.0.9")) == ({"ok": True}, [])
    assert ("restore",) not in served.sessions[0].calls


def test_a_long_line_in_many_writes_is_one_refusal(served: Served) -> None:
    served.ask(encode_hello(True))
    for _ in range(3):
        served.engine.sendall(b"x" * MAX_LINE)
    served.engine.sendall(b'{"op": "restore"}\n')  # the end of the long line
    assert served.reply() == ({"ok": False, "error": "request too long"}, [])
    assert served.ask(encode_set_address("100.64.0.9")) == ({"ok": True}, [])
    assert ("restore",) not in served.sessions[0].calls


@settings(max_examples=40, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=3 * MAX_LINE // 2), min_size=1, max_size=4))
def test_binary_garbage_gets_one_refusal_per_line_and_the_helper_lives(chunks: list[bytes]) -> None:
    """Whatever arrives, each line gets one reply (a refusal: nothing before hello is carried out) and a hello
    after it is still answered."""
    with pytest.MonkeyPatch.context() as mp:
        fixture = served.__wrapped__(mp)  # type: ignore[attr-defined]
        s = next(fixture)
        try:
            stream = b"".join(chunks) + b"\n"
            expected = len(LineFramer(MAX_LINE).feed(stream))
            s.engine.sendall(stream)
            for _ in range(expected):
                reply, fds = s.reply()
                assert reply["ok"] is False and fds == []
            assert s.ask(encode_hello(False))[0]["ok"] is True
            assert s.sessions and s.sessions[0].calls == []
        finally:
            next(fixture, None)


def test_an_explicit_restore_then_the_end_of_the_socket(served: Served) -> None:
    served.ask(encode_hello(True))
    assert served.ask(encode_restore()) == ({"ok": True}, [])
    assert served.close() == 0
    # the restore was carried out when asked; at the end abandon finds nothing in place (NetConfig.abandon
    # restores when no kill switch is marked, tests/unit/test_kill_switch_state.py)
    assert served.sessions[0].calls == [("restore",), ("abandon",)]


def test_a_vanished_engine_ends_the_session_without_a_restore(served: Served) -> None:
    served.ask(encode_hello(True))
    served.ask(encode_route([("192.0.2.21", 9001)]))
    served.engine.sendall(encode_set_dns(["100.64.0.1"]))  # and dies before it reads the answer
    served.engine.shutdown(socket.SHUT_WR)
    assert served.close() == 0
    calls = served.sessions[0].calls
    assert ("restore",) not in calls and calls[-1] == ("abandon",)


def test_a_helper_that_is_not_root_refuses_to_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = socket.socketpair()
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    try:
        with pytest.raises(ShallotError, match="must run as root"):
            helper.serve(a)
    finally:
        a.close()
        b.close()
