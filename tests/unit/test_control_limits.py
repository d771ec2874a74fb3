"""The control server's limits (core/control/server.py, PROTOCOL §9.1-9.3) on a real Unix socket: lines longer
than MAX_LINE (thrown away whole) and JSON nested deeper than 32 get bad-request and the connection goes on,
malformed requests and unknown commands are answered with an error and counted, a handler's failure never
takes the server down, a stuck subscriber loses events rather than memory, and a peer of another user is refused."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import pytest_asyncio

from shallot.core.control import server as server_module
from shallot.core.control.errors import ControlError, ErrorKind
from shallot.core.control.messages import MAX_LINE, Role, SetDirectory, Status
from shallot.core.control.server import ControlServer
from shallot.core.errors import ShallotError


async def _handler_status(req: Status) -> dict[str, int]:
    return {"ok": 1}


def _fails(req: SetDirectory) -> None:
    if req.path == "control":
        raise ControlError(ErrorKind.NOT_CONNECTED, "not now")
    if req.path == "shallot":
        raise ShallotError("no such directory")
    raise RuntimeError("a bug")


@pytest_asyncio.fixture
async def control(tmp_path: Path):
    server = ControlServer(tmp_path / "c.sock", Role.RELAY, {Status: _handler_status, SetDirectory: _fails})
    await server.start()
    yield server
    await server.close()


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, server: ControlServer) -> Conn:
        reader, writer = await asyncio.open_unix_connection(str(server.path), limit=4 * MAX_LINE)
        conn = cls(reader, writer)
        hello = await conn.read()
        assert hello is not None and hello["shallot"] == "control"
        return conn

    async def read(self) -> dict | None:
        line = await asyncio.wait_for(self.reader.readline(), 5)
        return json.loads(line) if line else None

    async def ask(self, raw: bytes) -> dict | None:
        self.writer.write(raw)
        await self.writer.drain()
        return await self.read()

    def close(self) -> None:
        self.writer.close()


@pytest.mark.asyncio
async def test_a_line_longer_than_max_line_is_refused_whole_and_the_connection_stays(control: ControlServer) -> None:
    conn = await Conn.open(control)
    # the tail of the long line is a valid request of its own: it must be thrown away with the rest
    tail = b'\n{"id": 9, "cmd": "status"}'
    answer = await conn.ask(b'{"id": 1, "cmd": "status", "pad": "' + b"x" * MAX_LINE + tail[1:] + b'"}\n')
    assert answer is not None and answer["error"]["kind"] == "bad-request" and "too long" in answer["error"]["message"]
    assert control.bad_requests == 1
    # the same connection goes on, and the next answer is to the next request (no answer to id 9)
    assert (await conn.ask(b'{"id": 2, "cmd": "status"}\n')) == {"id": 2, "ok": True, "result": {"ok": 1}}
    conn.close()


@pytest.mark.asyncio
async def test_a_long_line_in_many_small_writes_is_refused_once(control: ControlServer) -> None:
    conn = await Conn.open(control)
    for _ in range(3 * MAX_LINE // 1000):
        conn.writer.write(b"[" * 1000)
    conn.writer.write(b"\n")
    answer = await conn.read()
    assert answer is not None and "too long" in answer["error"]["message"]
    assert (await conn.ask(b'{"id": 2, "cmd": "status"}\n'))["id"] == 2
    assert control.bad_requests == 1
    conn.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("depth", [33, 3_000, 30_000])
async def test_deep_json_gets_a_bad_request_and_the_connection_stays(control: ControlServer, depth: int) -> None:
    conn = await Conn.open(control)
    deep = b'{"id": 1, "cmd": "status", "args": {"x": ' + b"[" * (depth - 2) + b"]" * (depth - 2) + b"}}\n"
    assert len(deep) <= MAX_LINE
    answer = await conn.ask(deep)
    assert answer is not None and answer["error"]["kind"] == "bad-request", answer
    assert "deeper than 32" in answer["error"]["message"]
    assert (await conn.ask(b'{"id": 2, "cmd": "status"}\n')) == {"id": 2, "ok": True, "result": {"ok": 1}}
    conn.close()


@pytest.mark.asyncio
async def test_json_at_the_depth_limit_is_a_request(control: ControlServer) -> None:
    conn = await Conn.open(control)
    answer = await conn.ask(b'{"id": 1, "cmd": "status", "args": {"x": ' + b"[" * 30 + b"]" * 30 + b"}}\n")
    assert answer == {"id": 1, "ok": True, "result": {"ok": 1}}
    conn.close()


@pytest.mark.asyncio
async def test_malformed_requests_are_answered_and_counted_and_the_connection_stays(control: ControlServer) -> None:
    conn = await Conn.open(control)
    for raw in (b"not json\n", b"[1, 2]\n", b'{"id": 1}\n', b'{"id": 1, "cmd": 5}\n',
                b'{"id": 1, "cmd": "status", "args": []}\n'):
        answer = await conn.ask(raw)
        assert answer is not None and answer["ok"] is False and answer["error"]["kind"] == "bad-request", raw
    assert control.bad_requests == 5
    answer = await conn.ask(b'{"id": 7, "cmd": "shutdown"}\n')  # a real command this server has no handler for
    assert answer == {"id": 7, "ok": False, "error": {"kind": "unknown-command",
                                                       "message": "unknown command 'shutdown'"}}
    answer = await conn.ask(b'{"id": 8, "cmd": "status"}\n')
    assert answer == {"id": 8, "ok": True, "result": {"ok": 1}}
    conn.close()


@pytest.mark.asyncio
async def test_a_failing_handler_is_an_error_answer_not_a_dead_server(control: ControlServer) -> None:
    conn = await Conn.open(control)
    kinds = []
    for path in ("control", "shallot", "bug"):
        answer = await conn.ask(json.dumps({"id": 1, "cmd": "set_directory", "args": {"path": path}}).encode() + b"\n")
        assert answer is not None and answer["ok"] is False
        kinds.append(answer["error"]["kind"])
    assert kinds == ["not-connected", "error", "internal"]
    answer = await conn.ask(b'{"id": 2, "cmd": "set_directory", "args": {}}\n')  # the decoder refuses it
    assert answer is not None and answer["error"]["kind"] == "bad-request"
    assert (await conn.ask(b'{"id": 3, "cmd": "status"}\n'))["ok"] is True
    conn.close()


@pytest.mark.asyncio
async def test_a_stuck_subscriber_loses_events_not_memory(control: ControlServer) -> None:
    conn = await Conn.open(control)
    assert (await conn.ask(b'{"id": 1, "cmd": "subscribe"}\n'))["ok"] is True
    (queue,) = control._subscribers
    conn.writer.transport.pause_reading()  # a client that stops reading: the pump blocks on its socket
    for i in range(5_000):
        control.publish("tick", {"i": i, "pad": "x" * 200})
    assert queue.qsize() <= 1000
    conn.close()


@pytest.mark.asyncio
async def test_a_peer_of_another_user_is_refused(control: ControlServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module, "peer_uid", lambda sock: 4242 if sock is not None else None)
    reader, writer = await asyncio.open_unix_connection(str(control.path))
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed without a hello
    assert control.rejected_peers == 1
    writer.close()
    monkeypatch.setattr(server_module, "peer_uid", lambda sock: None)  # a kernel that does not say: refused too
    reader, writer = await asyncio.open_unix_connection(str(control.path))
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert control.rejected_peers == 2
    writer.close()
