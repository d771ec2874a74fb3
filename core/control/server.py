"""The control server: the local control API (docs/PROTOCOL.md §9): line-delimited JSON over a 0600 Unix socket.

A running engine, relay or exit serves it; the CLI and the desktop app speak it (client.py).  The server checks the
peer's credentials (SO_PEERCRED): only the same user (or root) may connect.

    server hello : {"shallot": "control", "version": 2, "role": "client"|"relay"|"exit", "supports": [cmd, ...]}
    request      : {"id": int, "cmd": str, "args": {...}}
    response     : {"id": int, "ok": true, "result": ...} | {"id": int, "ok": false, "error": {"kind", "message"}}
    event        : {"event": str, "data": {...}}          (after a "subscribe" request)

Requests are decoded by messages.py into their dataclass and handed to the handler registered for that
class; a handler returns a typed reply (anything with ``to_json``) or plain JSON.  What the server
answers is what its handlers cover, and its hello says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from shallot.core.control.errors import ControlError, ErrorKind
from shallot.core.control.messages import MAX_LINE, REQUESTS, Hello, Request, Role, Subscribe
from shallot.core.errors import ShallotError
from shallot.core.peercred import peer_uid
from shallot.core.wire.jsonlines import LineFramer, TooLong, loads

log = logging.getLogger("shallot.core.control")
READ_CHUNK = 16 * 1024  # a line longer than MAX_LINE is thrown away as it arrives, never held whole

# a handler takes the decoded request (its own class) and returns the reply, or an awaitable of it
Handler = Callable[[Any], Awaitable[object] | object]


class ControlServer:
    def __init__(self, path: Path, role: Role, handlers: Mapping[type[Request], Handler]) -> None:
        self.path = path
        self.handlers = dict(handlers)
        self.hello = Hello(role, frozenset({cls.CMD for cls in self.handlers} | {Subscribe.CMD}))
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

    def publish(self, event: str, data: object) -> None:
        """``data``: plain JSON or a typed message (anything with ``to_json``)."""
        data = _json(data)
        for queue in list(self._subscribers):
            if queue.qsize() < 1000:  # a stuck subscriber loses events, never memory
                queue.put_nowait({"event": event, "data": data})

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        uid = peer_uid(writer.get_extra_info("socket"))
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

        def subscribe() -> None:
            nonlocal queue, pump
            if queue is None:
                queue = asyncio.Queue()
                self._subscribers.add(queue)
                pump = asyncio.create_task(self._pump(queue, send))
                self._tasks.add(pump)
                pump.add_done_callback(self._tasks.discard)

        framer = LineFramer(MAX_LINE)
        try:
            await send(self.hello.to_json())
            while data := await reader.read(READ_CHUNK):
                for line in framer.feed(data):
                    await self._request(line, send, subscribe)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            if queue is not None:
                self._subscribers.discard(queue)
            if pump is not None:
                pump.cancel()
            writer.close()

    async def _request(self, line: bytes | TooLong, send: Callable[[dict[str, Any]], Awaitable[None]],
                       subscribe: Callable[[], None]) -> None:
        """One line: a bad one is answered bad-request and the connection goes on (docs/PROTOCOL.md §9.2)."""
        try:
            if isinstance(line, TooLong):
                raise ValueError("line too long")  # and thrown away whole, up to its newline
            req = loads(line)
            if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                raise ValueError("request must be an object with a string 'cmd'")
            args = req.get("args", {})
            if not isinstance(args, dict):
                raise ValueError("'args' must be an object")
        except ValueError as exc:
            self.bad_requests += 1
            await send(_failure(None, ErrorKind.BAD_REQUEST, str(exc)))
            return
        rid = req.get("id")
        cmd = req["cmd"]
        if cmd == Subscribe.CMD:
            subscribe()
            await send({"id": rid, "ok": True, "result": None})
            return
        await send(await self._answer(rid, cmd, args))

    async def _answer(self, rid: object, cmd: str, args: dict[str, Any]) -> dict[str, Any]:
        cls = REQUESTS.get(cmd)
        handler = self.handlers.get(cls) if cls is not None else None
        if cls is None or handler is None:
            return _failure(rid, ErrorKind.UNKNOWN_COMMAND, f"unknown command {cmd[:80]!r}")
        try:
            result = handler(cls.from_args(args))
            if inspect.isawaitable(result):
                result = await result
        except ControlError as exc:
            return _failure(rid, exc.kind, str(exc))
        except ShallotError as exc:
            return _failure(rid, ErrorKind.ERROR, str(exc))
        except Exception as exc:  # a handler bug must not kill the server
            log.exception("control command %s failed", cmd)
            return _failure(rid, ErrorKind.INTERNAL, repr(exc))
        return {"id": rid, "ok": True, "result": _json(result)}

    async def _pump(self, queue: asyncio.Queue[dict[str, Any]], send: Callable[[dict[str, Any]], Awaitable[None]]) \
            -> None:
        while True:
            await send(await queue.get())


def _json(value: object) -> Any:
    to_json = getattr(value, "to_json", None)
    return to_json() if callable(to_json) else value


def _failure(rid: object, kind: ErrorKind, message: str) -> dict[str, Any]:
    return {"id": rid, "ok": False, "error": {"kind": kind.value, "message": message}}


async def _is_live(path: Path) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 1.0)
    except (TimeoutError, OSError):
        return False
    writer.close()
    return True
