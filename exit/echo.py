"""The datagram echo service an exit offers on circuits that ask for SERVICE_ECHO (pure)."""

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
