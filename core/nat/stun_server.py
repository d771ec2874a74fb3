"""The STUN server of a public relay (docs/PROTOCOL.md §13.1): Binding answers on the link socket and on
the alternate port, and CHANGE-REQUEST(change IP) forwarded to another relay.

This is the one unauthenticated request a relay answers besides a handshake initiation, so every answer
is bounded by its cause: a response is never longer than the request (no amplification: our own requests
carry a PADDING attribute, ``stun.binding_request``; an unpadded request that would get a longer answer is
dropped), a forwarded request is never longer than the one that caused it, each source (IPv4 address,
IPv6 /64) has a token bucket, and one global bucket limits what goes to an address other than the
request's source.
"""

from __future__ import annotations

from collections import Counter

from shallot.core.link import Address
from shallot.core.nat.limits import (
    FORWARD_BURST,
    FORWARD_RATE,
    STUN_BURST,
    STUN_RATE,
)
from shallot.core.nat.virtual import Send
from shallot.core.ratelimit import TokenBuckets
from shallot.core.wire import stun
from shallot.core.wire.addresses import extend_target_allowed, source_key
from shallot.crypto.codec import DecodeError


class StunServer:
    def __init__(self, *, send: Send, counters: Counter[str], own_host: str = "0.0.0.0",
                 has_alt_port: bool = False) -> None:
        self._send = send
        self.counters = counters
        self.own_host = own_host
        self.has_alt_port = has_alt_port  # set by the owner once the alternate port is open
        self.alt_outbox: list[tuple[bytes, Address]] = []  # answers that leave from the alternate port
        self._buckets = TokenBuckets(STUN_RATE, STUN_BURST)
        self._forward_bucket = TokenBuckets(FORWARD_RATE, FORWARD_BURST, max_keys=1)

    def answer_binding(self, msg: stun.StunMessage, data: bytes, addr: Address, now: float, *, alt: bool) -> None:
        """A Binding request ``data`` (decoded: ``msg``) from ``addr``; ``alt``: it came to the alternate port."""
        if not self._buckets.allow(source_key(addr[0]), now):
            self.counters["nat_drop_stun_rate"] += 1
            return
        try:
            flags = stun.change_flags(msg)
            dest = stun.address_attr(msg, stun.ATTR_RESPONSE_DESTINATION)
            other = stun.address_attr(msg, stun.ATTR_OTHER_RELAY)
        except DecodeError:
            self.counters["nat_drop_bad_stun"] += 1
            return
        if flags & stun.CHANGE_IP:
            self._forward_change_ip(msg, data, addr, other, now)
            return
        target = addr
        if dest is not None:
            if not self._forward_bucket.allow("", now):
                self.counters["nat_drop_stun_rate"] += 1
                return
            target = dest
        resp = stun.binding_response(msg.txid, target, fingerprint=msg.has_fingerprint)
        if len(resp) > len(data):  # an unpadded request: answering it would amplify
            self.counters["nat_drop_stun_amplification"] += 1
            return
        self.counters["nat_stun_answered"] += 1
        if flags & stun.CHANGE_PORT or alt:
            if not self.has_alt_port:
                self.counters["nat_drop_stun_no_alt_port"] += 1
                return
            self.alt_outbox.append((resp, target))
        else:
            self._send(resp, target)

    def _forward_change_ip(self, msg: stun.StunMessage, data: bytes, addr: Address, other: Address | None,
                           now: float) -> None:
        """The filtering test: another relay answers the requester's mapped address, which it never sent to."""
        if other is None or not extend_target_allowed(self.own_host, other[0]) \
                or not self._forward_bucket.allow("", now):
            self.counters["nat_drop_stun_change_ip"] += 1
            return
        # unpadded: the other relay's answer to the destination is exactly as long as this forward
        fwd = stun.binding_request(msg.txid, response_destination=addr, pad_to=0)
        if len(fwd) > len(data):
            self.counters["nat_drop_stun_amplification"] += 1
            return
        self.counters["nat_stun_forwarded"] += 1
        self._send(fwd, other)

    def alt_datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        """The answers to send from the alternate port, handed over."""
        out = self.alt_outbox
        if out:
            self.alt_outbox = []
        return out
