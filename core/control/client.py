"""Async client of the control API (docs/PROTOCOL.md §9), used by ``shallot status`` and the desktop app."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from shallot.core.control.errors import ControlError, ErrorKind
from shallot.core.control.messages import MAX_LINE, Hello, Request, Subscribe, encode_request
from shallot.core.errors import ShallotError
from shallot.core.wire.jsonlines import loads


class ControlClient:
    """Async client of the control API, used by ``shallot status`` and the desktop app.  ``hello`` is what the
    server said it is: its role, its protocol version and the commands it answers (an older engine is
    recognised there, by ``hello.can``)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hello: Hello) -> None:
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
            raw = loads(await asyncio.wait_for(reader.readline(), timeout))
        except FileNotFoundError:
            raise ShallotError(f"nothing is running there: {path} does not exist") from None
        except (TimeoutError, OSError, ValueError) as exc:
            raise ShallotError(f"cannot talk to {path}: {exc}") from None
        try:
            hello = Hello.from_json(raw)
        except ControlError as exc:
            writer.close()
            raise ShallotError(f"{path} {exc}") from None
        return cls(reader, writer, hello)

    async def ask(self, request: Request, timeout: float = 30.0) -> Any:
        """Send a typed request; the reply's JSON (its command's reply type parses it), or ControlError."""
        return await self._send(encode_request(self._take_id(), request), timeout)

    async def call(self, cmd: str, timeout: float = 30.0, **args: Any) -> Any:
        """Any command by name, arguments unchecked: for tools and for tests of the server's own checks."""
        return await self._send({"id": self._take_id(), "cmd": cmd, "args": args}, timeout)

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        await self.ask(Subscribe())
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

    def _take_id(self) -> int:
        rid = self._next_id
        self._next_id += 1
        return rid

    async def _send(self, message: dict[str, Any], timeout: float) -> Any:
        rid = message["id"]
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        self._writer.write(json.dumps(message).encode() + b"\n")
        await self._writer.drain()
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(rid, None)

    async def _read_loop(self) -> None:
        try:
            while True:
                line = await self._reader.readline()
                if not line:
                    break
                msg = loads(line)  # our own user's server, still never a crash on a deep line
                if not isinstance(msg, dict):
                    continue
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
                    kind = ErrorKind.from_wire(err.get("kind")) or ErrorKind.ERROR  # a newer server's kind
                    fut.set_exception(ControlError(kind, str(err.get("message"))))
        except (ConnectionError, ValueError, AttributeError, asyncio.CancelledError):
            pass
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(ShallotError("the control connection closed"))
            self._events.put_nowait(None)
