"""Local control API (docs/PROTOCOL.md §9): line-delimited JSON over a 0600 Unix socket.

Both the CLI and the desktop app speak it to a running engine, relay or exit.  The server checks the
peer's credentials (SO_PEERCRED): only the same user (or root) may connect.

    server hello : {"shallot": "control", "version": 1, "role": "client"|"relay"|"exit"}
    request      : {"id": int, "cmd": str, "args": {...}}
    response     : {"id": int, "ok": true, "result": ...} | {"id": int, "ok": false, "error": {"kind", "message"}}
    event        : {"event": str, "data": {...}}          (after a "subscribe" request)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from shallot.core.errors import ShallotError

CONTROL_VERSION = 1
MAX_LINE = 64 * 1024
log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class ControlError(ShallotError):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _peer_uid(writer: asyncio.StreamWriter) -> int | None:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


class ControlServer:
    def __init__(self, path: Path, role: str, handlers: dict[str, Handler]) -> None:
        self.path = path
        self.role = role
        self.handlers = handlers
        self._server: asyncio.AbstractServer | None = None
        self._subscribers: set[asyncio.Queue[dict[str, Any]]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.rejected_peers = 0
        self.bad_requests = 0

    async def start(self) -> None:
        if self.path.exists() or self.path.is_symlink():
            if not stat.S_ISSOCK(self.path.lstat().st_mode):
                raise ShallotError(f"{self.path} exists and is not a socket; refusing to replace it")
            if await _is_live(self.path):
                raise ShallotError(f"another process already serves {self.path}")
            self.path.unlink()  # a stale socket left by a process that died
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=MAX_LINE)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def publish(self, event: str, data: dict[str, Any]) -> None:
        for queue in list(self._subscribers):
            if queue.qsize() < 1000:  # a stuck subscriber loses events, never memory
                queue.put_nowait({"event": event, "data": data})

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        uid = _peer_uid(writer)
        if uid is None or uid not in (0, os.geteuid()):
            self.rejected_peers += 1
            writer.close()
            return
        queue: asyncio.Queue[dict[str, Any]] | None = None
        pump: asyncio.Task[Any] | None = None
        lock = asyncio.Lock()

        async def send(obj: dict[str, Any]) -> None:
            async with lock:
                writer.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")
                await writer.drain()

        try:
            await send({"shallot": "control", "version": CONTROL_VERSION, "role": self.role})
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    self.bad_requests += 1
                    await send({"id": None, "ok": False, "error": {"kind": "bad-request", "message": "line too long"}})
                    break
                if not line:
                    break
                try:
                    req = json.loads(line)
                    if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                        raise ValueError("request must be an object with a string 'cmd'")
                    args = req.get("args", {})
                    if not isinstance(args, dict):
                        raise ValueError("'args' must be an object")
                except ValueError as exc:
                    self.bad_requests += 1
                    await send({"id": None, "ok": False, "error": {"kind": "bad-request", "message": str(exc)}})
                    continue
                rid = req.get("id")
                cmd = req["cmd"]
                if cmd == "subscribe":
                    if queue is None:
                        queue = asyncio.Queue()
                        self._subscribers.add(queue)
                        pump = asyncio.create_task(self._pump(queue, send))
                        self._tasks.add(pump)
                        pump.add_done_callback(self._tasks.discard)
                    await send({"id": rid, "ok": True, "result": None})
                    continue
                handler = self.handlers.get(cmd)
                if handler is None:
                    await send({"id": rid, "ok": False,
                                "error": {"kind": "unknown-command", "message": f"unknown command {cmd!r}"}})
                    continue
                try:
                    result = await handler(args)
                    await send({"id": rid, "ok": True, "result": result})
                except ControlError as exc:
                    await send({"id": rid, "ok": False, "error": {"kind": exc.kind, "message": str(exc)}})
                except ShallotError as exc:
                    await send({"id": rid, "ok": False, "error": {"kind": "error", "message": str(exc)}})
                except Exception as exc:  # a handler bug must not kill the server
                    log.exception("control command %s failed", cmd)
                    await send({"id": rid, "ok": False, "error": {"kind": "internal", "message": repr(exc)}})
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            if queue is not None:
                self._subscribers.discard(queue)
            if pump is not None:
                pump.cancel()
            writer.close()

    async def _pump(self, queue: asyncio.Queue[dict[str, Any]], send: Callable[[dict[str, Any]], Awaitable[None]]) \
            -> None:
        while True:
            await send(await queue.get())


async def _is_live(path: Path) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 1.0)
    except (TimeoutError, OSError):
        return False
    writer.close()
    return True


class ControlClient:
    """Async client of the control API, used by ``shallot status`` and the desktop app."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hello: dict[str, Any]) -> None:
        self._reader, self._writer = reader, writer
        self.hello = hello
        self._next_id = 1
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._reader_task = asyncio.create_task(self._read_loop())

    @classmethod
    async def connect(cls, path: Path, timeout: float = 5.0) -> ControlClient:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path), limit=MAX_LINE), timeout)
            hello = json.loads(await asyncio.wait_for(reader.readline(), timeout))
        except FileNotFoundError:
            raise ShallotError(f"nothing is running there: {path} does not exist") from None
        except (TimeoutError, OSError, ValueError) as exc:
            raise ShallotError(f"cannot talk to {path}: {exc}") from None
        if not isinstance(hello, dict) or hello.get("shallot") != "control":
            raise ShallotError(f"{path} is not a Shallot control socket")
        if hello.get("version") != CONTROL_VERSION:
            raise ShallotError(f"{path} speaks control version {hello.get('version')}, we speak {CONTROL_VERSION}")
        return cls(reader, writer, hello)

    async def call(self, cmd: str, timeout: float = 30.0, **args: Any) -> Any:
        rid = self._next_id
        self._next_id += 1
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        self._writer.write(json.dumps({"id": rid, "cmd": cmd, "args": args}).encode() + b"\n")
        await self._writer.drain()
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(rid, None)

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        await self.call("subscribe")
        while True:
            item = await self._events.get()
            if item is None:
                return
            yield item

    async def close(self) -> None:
        self._reader_task.cancel()
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()

    async def _read_loop(self) -> None:
        try:
            while True:
                line = await self._reader.readline()
                if not line:
                    break
                msg = json.loads(line)
                if "event" in msg:
                    self._events.put_nowait(msg)
                    continue
                fut = self._pending.get(msg.get("id"))
                if fut is None or fut.done():
                    continue
                if msg.get("ok"):
                    fut.set_result(msg.get("result"))
                else:
                    err = msg.get("error") or {}
                    fut.set_exception(ControlError(str(err.get("kind")), str(err.get("message"))))
        except (ConnectionError, ValueError, asyncio.CancelledError):
            pass
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(ShallotError("the control connection closed"))
            self._events.put_nowait(None)
