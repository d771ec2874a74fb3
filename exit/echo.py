"""The datagram services an exit offers on circuits that end there: echo and discard (pure).

Both implement relay/endpoints.EndpointService and keep no per-circuit state, only counts."""

from __future__ import annotations

from shallot.core.wire.cells import MSG_DATA, encode_message


class DatagramService:
    """Counts what it served; subclasses decide what goes back.  Only DATA messages are theirs."""

    name = "service"

    def __init__(self) -> None:
        self.datagrams = 0
        self.bytes = 0

    def attach(self, circuit: object) -> bool:
        return True

    def detach(self, circuit: object) -> None:
        pass

    def on_message(self, circuit: object, msg_type: int, data: bytes, now: float) -> list[bytes] | None:
        if msg_type != MSG_DATA:
            return None
        self.datagrams += 1
        self.bytes += len(data)
        return [encode_message(MSG_DATA, reply) for reply in self.reply(data)]

    def reply(self, data: bytes) -> list[bytes]:
        raise NotImplementedError

    def status(self) -> dict[str, int]:
        raise NotImplementedError


class EchoService(DatagramService):
    """Answers every datagram with the same bytes."""

    name = "echo"

    def reply(self, data: bytes) -> list[bytes]:
        return [data]

    def status(self) -> dict[str, int]:
        return {"echoed": self.datagrams}


class DiscardService(DatagramService):
    """Counts and drops every datagram (like RFC 863's discard service); used for one-way measurements."""

    name = "discard"

    def reply(self, data: bytes) -> list[bytes]:
        return []

    def status(self) -> dict[str, int]:
        return {"discarded": self.datagrams, "discarded_bytes": self.bytes}
