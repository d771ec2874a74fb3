"""What a circuit can end in at an exit (docs/PROTOCOL.md §8.6): the relay forwarder knows services only
through this interface; exit/ implements it (echo, discard, IP) and the composition root hands them in."""

from __future__ import annotations

from typing import Protocol


class EndpointService(Protocol):
    def attach(self, circuit: object) -> bool:
        """A circuit asked for this service; False refuses it (the service is full)."""

    def detach(self, circuit: object) -> None:
        """The circuit is gone."""

    def on_message(self, circuit: object, msg_type: int, data: bytes, now: float) -> list[bytes] | None:
        """An inner message from the client: the inner messages to send back, or None for a message type
        this service does not take (the relay counts it)."""

    def status(self) -> dict[str, int]:
        """Counters for the relay's ``status`` (§9.4)."""
