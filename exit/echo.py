"""The datagram services an exit offers on circuits that end there: echo and discard (pure)."""

from __future__ import annotations


class EchoService:
    """Answers every datagram with the same bytes.  Stateless; counts what it served."""

    name = "echo"

    def __init__(self) -> None:
        self.datagrams = 0
        self.bytes = 0

    def on_datagram(self, data: bytes) -> list[bytes]:
        self.datagrams += 1
        self.bytes += len(data)
        return [data]


class DiscardService:
    """Counts and drops every datagram (like RFC 863's discard service); used for one-way measurements."""

    name = "discard"

    def __init__(self) -> None:
        self.datagrams = 0
        self.bytes = 0

    def on_datagram(self, data: bytes) -> list[bytes]:
        self.datagrams += 1
        self.bytes += len(data)
        return []
