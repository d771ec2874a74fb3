"""The datagram services an exit offers on circuits that end there: echo and discard (pure)."""

from __future__ import annotations


class DatagramService:
    """Counts what it served; subclasses decide what goes back."""

    name = "service"

    def __init__(self) -> None:
        self.datagrams = 0
        self.bytes = 0

    def on_datagram(self, data: bytes) -> list[bytes]:
        self.datagrams += 1
        self.bytes += len(data)
        return self.reply(data)

    def reply(self, data: bytes) -> list[bytes]:
        raise NotImplementedError


class EchoService(DatagramService):
    """Answers every datagram with the same bytes."""

    name = "echo"

    def reply(self, data: bytes) -> list[bytes]:
        return [data]


class DiscardService(DatagramService):
    """Counts and drops every datagram (like RFC 863's discard service); used for one-way measurements."""

    name = "discard"

    def reply(self, data: bytes) -> list[bytes]:
        return []
