"""What a node knows of its own NAT: its type, from the probe (classify.py), and its public address, from
the probe and then from a relay behind a NAT's rebinding checks.  Changes are events, not flags to poll."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

from shallot.core.link import Address
from shallot.core.nat.classify import NatProbe, NatType
from shallot.core.nat.events import NatClassified, NatEvent, PublicAddressChanged
from shallot.core.nat.virtual import Send
from shallot.core.wire import stun

log = logging.getLogger(__name__)


class OwnNat:
    def __init__(self, *, send: Send, counters: Counter[str], emit: Callable[[NatEvent], None]) -> None:
        self._send = send
        self.counters = counters
        self._emit = emit
        self.nat_type: NatType | None = None
        self.public: Address | None = None
        self.probe: NatProbe | None = None

    def known(self) -> NatType:
        """Our type as far as known (all UNKNOWN before classification: plans then try to punch)."""
        return self.nat_type or NatType()

    def start_probe(self, probe: NatProbe, now: float) -> None:
        self.probe = probe
        probe.start(now)
        self._take_probe_output()

    def on_probe_answer(self, msg: stun.StunMessage, addr: Address, now: float) -> bool:
        """A Binding answer; False if it is not one the probe waits for."""
        if self.probe is None or not self.probe.owns(msg.txid):
            return False
        self.probe.receive(msg, addr, now)
        self._take_probe_output()
        return True

    def mapped_address_seen(self, mapped: Address) -> None:
        """A rebinding check's answer: where our datagrams come from now."""
        if self.public is not None and mapped != self.public:
            self.counters["nat_public_address_changed"] += 1
            log.info("our public address changed (NAT rebinding or a new network)")
            self._emit(PublicAddressChanged(mapped, self.public))
        self.public = mapped

    def handle_timer(self, now: float) -> None:
        if self.probe is not None and not self.probe.done:
            self.probe.handle_timer(now)
            self._take_probe_output()

    def timer(self) -> float | None:
        return self.probe.timer() if self.probe is not None and not self.probe.done else None

    def _take_probe_output(self) -> None:
        probe = self.probe
        assert probe is not None
        for data, addr in probe.outbox:
            self._send(data, addr)
        probe.outbox.clear()
        if probe.done and probe.result is not None and self.nat_type is None:
            self.nat_type = probe.result
            self.public = probe.result.public
            log.info("NAT: %s", probe.result.summary)
            self._emit(NatClassified(probe.result))
