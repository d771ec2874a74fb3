"""NAT behaviour in RFC 4787 / RFC 5780 terms, found from STUN answers of two relays on the link socket.

``NatProbe`` is a sans-I/O machine: ``start(now)``, ``receive(msg, source, now)``, ``handle_timer(now)``;
it emits STUN requests in ``outbox`` and ends with ``result`` (a ``NatType``).  The probe sequence
(docs/NAT.md, docs/PROTOCOL.md §13.2), each test up to ``ATTEMPTS`` tries ``RETRY_S`` apart:

1. Binding to relay 1                              -> mapped address M1 (none at all: UDP blocked)
2. to relay 1 with CHANGE-REQUEST(ip, port) and OTHER-RELAY = relay 2: relay 1 asks relay 2 to answer
   M1; we have never sent to relay 2, so an answer means endpoint-independent filtering
3. to relay 1 with CHANGE-REQUEST(port): relay 1 answers from its alternate port; an answer means
   the filter ignores the port (address-dependent), none means address-and-port-dependent
4. Binding to relay 2                              -> M2; M1 == M2: endpoint-independent mapping
5. only if M1 != M2: Binding to relay 2's alternate port -> M3; M3 == M2: address-dependent mapping,
   else address-and-port-dependent

``plan_link`` turns two nodes' types into a decision: dial directly, punch, or go through a relay.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from shallot.core.wire import stun
from shallot.crypto.codec import DecodeError

Address = tuple[str, int]
ALT_PORT_OFFSET = 2  # a relay's alternate STUN port is its link port + 2 (port + 1 is its DHT socket; §13.1)
ATTEMPTS = 3
RETRY_S = 0.3


class Behaviour(enum.IntEnum):
    """One axis of RFC 4787 (mapping or filtering); the values are the wire codes (§3.4 extension)."""

    UNKNOWN = 0
    ENDPOINT_INDEPENDENT = 1
    ADDRESS_DEPENDENT = 2
    ADDRESS_AND_PORT_DEPENDENT = 3

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


@dataclass(frozen=True)
class NatType:
    mapping: Behaviour = Behaviour.UNKNOWN
    filtering: Behaviour = Behaviour.UNKNOWN
    behind_nat: bool = True
    udp_blocked: bool = False
    public: Address | None = None  # reflexive address seen by relay 1

    @property
    def summary(self) -> str:
        if self.udp_blocked:
            return "udp-blocked"
        if not self.behind_nat:
            return "open (no NAT)"
        return f"mapping {self.mapping.label}, filtering {self.filtering.label}"

    def as_json(self) -> dict[str, object]:
        return {"summary": self.summary, "mapping": self.mapping.label, "filtering": self.filtering.label,
                "behind_nat": self.behind_nat, "udp_blocked": self.udp_blocked,
                "public": list(self.public) if self.public else None}


OPEN = NatType(Behaviour.ENDPOINT_INDEPENDENT, Behaviour.ENDPOINT_INDEPENDENT, behind_nat=False)


class Plan(enum.Enum):
    DIRECT = "direct"  # the peer is reachable as published
    PUNCH = "hole-punched"  # introducer, then both sides send at once
    RELAY = "relayed"  # straight to the relay-server: punching cannot work


def _dependent(b: Behaviour) -> bool:
    return b in (Behaviour.ADDRESS_DEPENDENT, Behaviour.ADDRESS_AND_PORT_DEPENDENT)


def plan_link(mine: NatType, peer: NatType | None) -> Plan:
    """How a node of type ``mine`` reaches a peer that published ``peer`` (None: publicly reachable).

    Punching fails when one side's mapping changes per destination (so the address the introducer saw
    is not the one the other side will see) and the other side either does the same or filters by
    port: then nobody can predict a port the other's NAT will let in.  Unknown behaviour is tried."""
    if peer is None or not peer.behind_nat:
        return Plan.DIRECT
    a_edm, b_edm = _dependent(mine.mapping), _dependent(peer.mapping)
    if a_edm and b_edm:
        return Plan.RELAY
    if a_edm and peer.filtering is Behaviour.ADDRESS_AND_PORT_DEPENDENT:
        return Plan.RELAY
    if b_edm and mine.filtering is Behaviour.ADDRESS_AND_PORT_DEPENDENT:
        return Plan.RELAY
    return Plan.PUNCH


@dataclass
class _Test:
    name: str
    dest: Address
    request: Callable[[bytes], bytes]
    txid: bytes = b""
    attempts: int = 0
    deadline: float = 0.0


@dataclass
class NatProbe:
    """Classify our NAT from two relays, each with a main and an alternate STUN port."""

    relay1: Address
    relay1_alt: Address
    relay2: Address
    relay2_alt: Address
    rng: Callable[[int], bytes]
    local: Address | None = None  # our bound address if it is a specific one (detects "no NAT")
    outbox: list[tuple[bytes, Address]] = field(default_factory=list)
    result: NatType | None = None
    _test: _Test | None = None
    _seen: dict[str, Address | None] = field(default_factory=dict)

    def start(self, now: float) -> None:
        self._begin("m1", self.relay1, lambda t: stun.binding_request(t), now)

    @property
    def done(self) -> bool:
        return self.result is not None

    def timer(self) -> float | None:
        return None if self._test is None else self._test.deadline

    def owns(self, txid: bytes) -> bool:
        return self._test is not None and self._test.txid == txid

    def receive(self, msg: stun.StunMessage, source: Address, now: float) -> None:
        test = self._test
        if test is None or msg.txid != test.txid:
            return
        try:
            mapped = stun.mapped_address(msg)
        except DecodeError:
            return
        self._seen[test.name] = mapped
        self._next(now)

    def handle_timer(self, now: float) -> None:
        test = self._test
        if test is None or now < test.deadline:
            return
        if test.attempts < ATTEMPTS:
            self._send(test, now)
            return
        self._seen[test.name] = None
        self._next(now)

    # ------------------------------------------------------------------ internals
    def _begin(self, name: str, dest: Address, request: Callable[[bytes], bytes], now: float) -> None:
        self._test = _Test(name, dest, request)
        self._send(self._test, now)

    def _send(self, test: _Test, now: float) -> None:
        test.txid = self.rng(stun.TXID_LEN)  # a fresh id per try: a late answer to an old try is ignored
        test.attempts += 1
        test.deadline = now + RETRY_S
        self.outbox.append((test.request(test.txid), test.dest))

    def _next(self, now: float) -> None:
        seen = self._seen
        if "m1" in seen and seen["m1"] is None:
            return self._finish(NatType(udp_blocked=True))
        if "eif" not in seen:
            return self._begin("eif", self.relay1, lambda t: stun.binding_request(
                t, change_ip=True, change_port=True, other_relay=self.relay2), now)
        if "adf" not in seen:
            return self._begin("adf", self.relay1, lambda t: stun.binding_request(t, change_port=True), now)
        if "m2" not in seen:
            return self._begin("m2", self.relay2, lambda t: stun.binding_request(t), now)
        m1, m2 = seen["m1"], seen["m2"]
        if m2 is not None and m1 != m2 and "m3" not in seen:
            return self._begin("m3", self.relay2_alt, lambda t: stun.binding_request(t), now)
        self._finish(classify(m1, m2, seen.get("m3"), eif=seen["eif"] is not None, adf=seen["adf"] is not None,
                              local=self.local))

    def _finish(self, result: NatType) -> None:
        self._test = None
        self.result = result


def classify(m1: Address | None, m2: Address | None, m3: Address | None, *, eif: bool, adf: bool,
             local: Address | None = None) -> NatType:
    """RFC 5780 §4.3/§4.4 logic on the observations of ``NatProbe``."""
    if m1 is None:
        return NatType(udp_blocked=True)
    filtering = (Behaviour.ENDPOINT_INDEPENDENT if eif else Behaviour.ADDRESS_DEPENDENT if adf
                 else Behaviour.ADDRESS_AND_PORT_DEPENDENT)
    if local is not None and m1 == local:
        return NatType(Behaviour.ENDPOINT_INDEPENDENT, filtering, behind_nat=False, public=m1)
    if m2 is None:
        mapping = Behaviour.UNKNOWN
    elif m1 == m2:
        mapping = Behaviour.ENDPOINT_INDEPENDENT
    elif m3 is not None and m3 == m2:
        mapping = Behaviour.ADDRESS_DEPENDENT
    elif m3 is not None:
        mapping = Behaviour.ADDRESS_AND_PORT_DEPENDENT
    else:
        mapping = Behaviour.UNKNOWN
    return NatType(mapping, filtering, public=m1)
