"""Shared strategies, generators and fixtures for the parser fuzz tests (tests/property/).

Hypothesis costs about 0.5-1 ms per example on the 2-core CI machine whatever the strategy, and every
extra draw adds ~0.1 ms (a 1400-byte ``st.binary`` ~0.6 ms).  To run 10,000 examples per parser in
about a minute, each example draws only a few small values -- a *mode* (which shape of input; 0 is
the plainest, so failures shrink towards it) and a *seed* -- and :class:`Gen` expands the seed into
the bulky bytes with a seeded PRNG.  A failing example is still reported and replayed by Hypothesis
(the seed is part of it).
"""

from __future__ import annotations

import base64
import copy
import ipaddress
import random
from dataclasses import dataclass
from functools import cache

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from shallot.core.circuit import ClientNode, client_link_layer
from shallot.core.link import LinkConfig, LinkLayer
from shallot.core.nat import NatPart, NodeStack
from shallot.core.wire import nat_frames as nm
from shallot.core.wire import stun
from shallot.crypto import circuit_handshake as ch
from shallot.crypto import link_handshake as lh
from shallot.crypto.descriptor import DESCRIPTOR_MAGIC, MAX_LIFETIME_S, Descriptor, ExitPolicySummary
from shallot.crypto.keys import OnionKey, RelayKeys
from shallot.crypto.primitives import x25519_public
from shallot.relay.forwarder import RelayNode, relay_link_layer
from tests.simnet import WALL0, SimNet, det_rng, make_client, make_relays

FUZZ = settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WALL = WALL0 + 100.0  # the wall clock every fuzz target believes in

# One bytes draw per example (the cheapest Hypothesis draw): 12 mode selector bytes, then an 8-byte seed.
cases = st.binary(min_size=20, max_size=20)
N_SELECTORS = 12


class Case:
    """A drawn example: ``mode(i, weights)`` picks the input shape for parser i from selector byte i, and
    ``gen(i)`` gives parser i its own seeded generator.  The all-zero case (where Hypothesis shrinks to)
    selects mode 0 -- the plainest input, plain random bytes -- for every parser."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.seed = int.from_bytes(raw[N_SELECTORS:], "big")

    def mode(self, i: int, weights: int | tuple[int, ...]) -> int:
        """``weights``: the number of equally likely modes, or how many shares each mode gets (expensive
        modes -- those doing X25519 or Ed25519 work -- get fewer)."""
        table = [m for m, w in enumerate((1,) * weights if isinstance(weights, int) else weights)
                 for _ in range(w)]
        return table[self.raw[i] * len(table) // 256]

    def gen(self, i: int) -> Gen:
        return Gen(self.seed * 64 + i)


# Characters str.splitlines() treats as line boundaries (besides \r\n).
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


_ASCII_TABLE = bytes((b"\n\r\t" + bytes(range(0x20, 0x7F)) * 3)[:256])
_NO_BREAKS = {ord(c): "x" for c in LINE_BREAKS}


class Gen:
    """Seeded generator of bulky fuzz inputs, biased towards boundary values."""

    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)

    def int(self, lo: int, hi: int) -> int:
        r = self.r.random()
        if r < 0.1:
            return lo
        if r < 0.2:
            return hi
        return self.r.randint(lo, hi)

    def chance(self, p: float) -> bool:
        return self.r.random() < p

    def choice(self, seq: list | tuple | str) -> object:
        return seq[self.r.randrange(len(seq))]

    def bytes(self, n: int) -> bytes:
        k = self.r.random()
        if k < 0.05:
            return bytes(n)
        if k < 0.08:
            return b"\xff" * n
        return self.r.randbytes(n)

    def count(self, hi: int) -> int:
        """A count in 0..hi, usually small (lists in the hot loops stay cheap), sometimes at the limit."""
        return self.r.randint(0, min(hi, 3)) if self.r.random() < 0.7 else self.int(0, hi)

    def length(self, max_len: int, *, near: tuple[int, ...] = ()) -> int:
        """A length in 0..max_len: often tiny, often right at (or one off) a length the parser expects."""
        k = self.r.random()
        if near and k < 0.4:
            return max(0, min(max_len, self.choice(near) + self.choice((-1, 0, 0, 0, 1))))
        if k < 0.7:
            return self.r.randint(0, min(max_len, 64))
        return self.r.randint(0, max_len)

    def blob(self, max_len: int, *, near: tuple[int, ...] = ()) -> bytes:
        return self.bytes(self.length(max_len, near=near))

    def text(self, max_len: int, *, line_breaks: bool = True) -> str:
        """Arbitrary text: mostly printable ASCII with line breaks, or Latin-1, or any code points
        (astral included, no lone surrogates)."""
        n = self.length(max_len)
        raw = self.r.randbytes(n)
        k = self.r.random()
        if k < 0.55:
            s = raw.translate(_ASCII_TABLE).decode("ascii")
        elif k < 0.8:
            s = raw.decode("latin-1")
        else:
            points = (int.from_bytes(raw[i:i + 3], "big") % 0x110000 for i in range(0, n, 3))
            s = "".join(chr(c) if not 0xD800 <= c <= 0xDFFF else "?" for c in points)
        return s if line_breaks else s.translate(_NO_BREAKS)

    def host(self) -> str:
        if self.chance(0.5):
            return str(ipaddress.IPv4Address(self.bytes(4)))
        if self.chance(0.2):
            return str(ipaddress.IPv6Address(bytes(10) + b"\xff\xff" + self.bytes(4)))  # IPv4-mapped
        return str(ipaddress.IPv6Address(self.bytes(16)))

    def port(self) -> int:
        return self.int(1, 65535)

    def mutate(self, data: bytes, *, protect_tail: int = 0) -> bytes:
        """1-3 edits: flip/replace bytes, truncate, extend, insert or delete (never a no-op overall is
        *not* guaranteed: callers that need a change must check)."""
        out = bytearray(data)
        for _ in range(self.r.randint(1, 3)):
            limit = len(out) - protect_tail
            op = self.r.random()
            if op < 0.55 and limit > 0:
                i = self.r.randrange(limit)
                out[i] ^= self.r.randint(1, 255)
            elif op < 0.65 and out:
                del out[self.r.randrange(len(out)):]
            elif op < 0.75:
                out += self.bytes(self.r.randint(1, 8))
            elif op < 0.85 and limit > 0:
                i = self.r.randrange(limit)
                out[i:i] = self.bytes(self.r.randint(1, 4))
            elif limit > 0:
                i = self.r.randrange(limit)
                del out[i:i + self.r.randint(1, 4)]
        return bytes(out)

    def flip_one(self, data: bytes, *, lo: int = 0, hi: int | None = None) -> bytes:
        """Change exactly one byte in data[lo:hi]."""
        hi = len(data) if hi is None else hi
        i = self.r.randrange(lo, hi)
        return data[:i] + bytes([data[i] ^ self.r.randint(1, 255)]) + data[i + 1:]

    def json_value(self, depth: int = 0) -> object:
        """A random JSON-serialisable value (finite numbers only)."""
        k = self.r.random()
        if depth < 3 and k < 0.15:
            return [self.json_value(depth + 1) for _ in range(self.r.randint(0, 3))]
        if depth < 3 and k < 0.3:
            keys = ["format", "identity_seed", "link_private", "onion_keys", "private", "created", "x"]
            return {self.choice(keys): self.json_value(depth + 1) for _ in range(self.r.randint(0, 4))}
        if k < 0.4:
            return self.r.randint(-(2**70), 2**70)
        if k < 0.5:
            return self.r.uniform(-1e300, 1e300)
        if k < 0.55:
            return self.choice([None, True, False])
        if k < 0.75:
            return base64.b64encode(self.bytes(self.choice((0, 16, 31, 32, 33, 48)))).decode()
        return self.text(40)


# ---------------------------------------------------------------------------------------- keys and descriptors
@cache
def key_pool() -> tuple[RelayKeys, ...]:
    return tuple(RelayKeys.generate(det_rng(7000 + i), WALL0) for i in range(4))


@dataclass(frozen=True)
class CachedKeys:
    """Duck-typed stand-in for RelayKeys in ``Descriptor.create`` with the public keys precomputed
    (saves three scalar multiplications per created descriptor in the hot fuzz loop)."""

    identity_pub: bytes
    link_pub: bytes
    current_onion: object
    _keys: RelayKeys

    def sign(self, message: bytes) -> bytes:
        return self._keys.sign(message)


@dataclass(frozen=True)
class _Onion:
    public: bytes


@cache
def cached_key_pool() -> tuple[CachedKeys, ...]:
    return tuple(CachedKeys(k.identity_pub, k.link_pub, _Onion(k.current_onion.public), k) for k in key_pool())


@cache
def descriptor_pool() -> tuple[Descriptor, ...]:
    """Descriptors valid at WALL, one per relay of the first three pool keys."""
    return tuple(
        Descriptor.create(k, nickname=f"pool{i}", addresses=((f"10.1.{i}.1", 9000 + i), ("2001:db8::1", 443)),
                          exit_node=i % 2 == 0, published=int(WALL) - 3600, lifetime_s=86400,
                          family=(bytes(20),) * i)
        for i, k in enumerate(key_pool()[:3]))


@cache
def stale_descriptors() -> tuple[Descriptor, ...]:
    """Well signed but unusable at WALL: expired, and published in the future."""
    k = key_pool()[3]
    expired = Descriptor.create(k, nickname="expired", addresses=(("10.9.9.9", 1),), exit_node=False,
                                published=int(WALL) - 10 * 86400, lifetime_s=86400)
    future = Descriptor.create(k, nickname="future", addresses=(("10.9.9.9", 1),), exit_node=False,
                               published=int(WALL) + 10 * 86400, lifetime_s=86400)
    return expired, future


def random_descriptor_args(g: Gen) -> dict:
    """Keyword arguments for ``Descriptor.create`` within every documented limit."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
    ranges = []
    for _ in range(g.count(32)):
        a, b = g.int(0, 65535), g.int(0, 65535)
        ranges.append((min(a, b), max(a, b)))
    return {
        "keys": g.choice(cached_key_pool()),
        "nickname": "".join(g.choice(alphabet) for _ in range(g.int(1, 32))),
        "addresses": tuple((g.host(), g.port()) for _ in range(max(1, g.count(4)))),
        "exit_node": g.chance(0.5),
        "published": g.int(0, 2**62),
        "lifetime_s": g.int(1, MAX_LIFETIME_S),
        "family": tuple(g.bytes(20) for _ in range(g.count(16))),
        "exit_policy": None if g.chance(0.3) else ExitPolicySummary(g.chance(0.5), tuple(ranges)),
    }


def synthetic_descriptor(g: Gen) -> bytes:
    """A descriptor-shaped byte string with random (often out-of-range) field values and a random
    signature: exercises every field check of ``Descriptor.decode``."""
    out = bytearray(DESCRIPTOR_MAGIC)
    out += bytes([g.int(0, 3), g.int(0, 3)])
    # random identity keys are never small-order (those are covered by an explicit test)
    out += g.choice(key_pool()).identity_pub if g.chance(0.5) else g.r.randbytes(32)
    out += g.bytes(64)
    out += g.int(0, 2**64 - 1).to_bytes(8, "big") + g.int(0, 2**64 - 1).to_bytes(8, "big")
    out.append(g.int(0, 255))
    nick = g.choice([b"relay", "r\u00e9lay".encode(), b"abc\n", b"\xff\xfe", b"", b"x" * 33, g.bytes(g.int(0, 40))])
    out.append(len(nick) if g.chance(0.9) else g.int(0, 255))
    out += nick
    n_addr = g.int(0, 5)
    out.append(n_addr)
    for _ in range(n_addr):
        out.append(g.choice([4, 6, 4, 6, 0, 5]))
        out += g.bytes(4) + bytes(12) if g.chance(0.5) else g.bytes(16)
        out += g.int(0, 65535).to_bytes(2, "big")
    n_fam = g.int(0, 17)
    out.append(n_fam)
    out += g.bytes(20 * n_fam)
    out.append(g.int(0, 2))
    n_ranges = g.int(0, 33)
    out.append(n_ranges)
    for _ in range(n_ranges):
        out += g.int(0, 65535).to_bytes(2, "big") + g.int(0, 65535).to_bytes(2, "big")
    out += g.bytes(64)
    return g.mutate(bytes(out)) if g.chance(0.3) else bytes(out)


# ---------------------------------------------------------------------------------------- build records
def random_instruction(g: Gen) -> ch.Instruction:
    if g.chance(0.3):
        return ch.Terminate(ch.SERVICE_ECHO)
    return ch.ExtendTo(g.host(), g.port(), g.bytes(32), g.bytes(20))


def canonical_instruction(instruction: ch.Instruction) -> ch.Instruction:
    if isinstance(instruction, ch.ExtendTo):
        host = str(ipaddress.ip_address(instruction.host))
        return ch.ExtendTo(host, instruction.port, instruction.link_pub, instruction.relay_id)
    return instruction


def synthetic_payload(g: Gen) -> bytes:
    """96-byte record payloads that often get past the first checks of ``decode_payload``."""
    kind = g.choice([ch.KIND_EXTEND, ch.KIND_TERMINATE, 0, 3, 255])
    out = bytearray([g.choice([1, 1, 1, 0, 2, 255]), kind]) + g.bytes(4)
    if kind == ch.KIND_EXTEND:
        out.append(g.choice([4, 6, 4, 6, 0, 5]))
        out += g.bytes(4) + bytes(12) if g.chance(0.6) else g.bytes(16)
        out += g.int(0, 65535).to_bytes(2, "big") + g.bytes(52)
        out += bytes(19) if g.chance(0.7) else g.bytes(19)
    elif kind == ch.KIND_TERMINATE:
        out.append(g.choice([ch.SERVICE_ECHO, ch.SERVICE_IP, 0, 255]))
        out += bytes(89) if g.chance(0.7) else g.bytes(89)
    else:
        out += g.bytes(90)
    return bytes(out)


# ---------------------------------------------------------------------------------------- link targets
def _established_indices(layer: LinkLayer) -> list[int]:
    return [s.local_index for link in layer.links.values() for s in (link.session, link.previous) if s is not None]


def _pending_indices(layer: LinkLayer) -> list[int]:
    return [link.pending.sender_index for link in layer.links.values() if link.pending is not None]


@dataclass
class Target:
    """A node under fuzz with the indices a forged packet could name to get past the first lookup.  ``nat`` is
    the NAT part of a production node stack (core/nat/stack.py: the first-byte demux in front of the node),
    None for the bare machines."""

    name: str
    node: object  # LinkLayer | RelayNode | ClientNode | NodeStack (all have receive_datagram)
    layer: LinkLayer
    link_pub: bytes
    established: list[int]
    pending: list[int]
    nat: NatPart | None = None

    @property
    def machine(self) -> object:
        """The node behind the demux (itself for the bare targets)."""
        return self.node.node if isinstance(self.node, NodeStack) else self.node

    def events(self) -> list[object]:
        queues = [self.layer.events, getattr(self.machine, "events", ())]
        return [e for q in queues for e in q] + (list(self.nat.events) if self.nat is not None else [])


@cache
def link_targets() -> tuple[Target, ...]:
    """A bare LinkLayer (accepting clients and relays), a RelayNode and a ClientNode, and a relay and a client
    node stack built as the services build them (a public relay serving STUN and introductions; a client
    dialing through its NAT part), each with one established session and one handshake in flight, detached
    from the SimNet they were set up in."""
    net = SimNet()
    (relay, _desc), = make_relays(net, 1, exits=set(), seed=91)
    client = make_client(net, seed=92)
    keys = RelayKeys.generate(det_rng(93), net.wall)
    expires = int(net.wall) + 86400
    bare = LinkLayer(LinkConfig(link_private=keys.link_private, link_pub=keys.link_pub, accept_clients=True,
                                accept_relays=True, identity_pub=keys.identity_pub, cert_expires=expires,
                                cert_sig=keys.link_cert(expires)), rng=det_rng(94))
    bare_addr = ("10.50.0.1", 7000)
    net.add(bare_addr, bare)
    peer_rng = det_rng(95)
    peer = LinkLayer(LinkConfig(*_x25519_pair(peer_rng)), rng=peer_rng)
    net.add(("192.0.2.77", 1234), peer)
    relay_addr = next(a for a, n in net.nodes.items() if n is relay)
    client.link.open_link(relay_addr, relay.keys.link_pub, net.now, net.wall)
    peer.open_link(bare_addr, keys.link_pub, net.now, net.wall)
    # the production stacks: the client stack links up with the relay stack
    skeys = RelayKeys.generate(det_rng(96), net.wall)
    slink = relay_link_layer(skeys, rng=det_rng(97), wall=net.wall)
    snat = NatPart(slink, rng=det_rng(98), serve=True)
    relay_stack = NodeStack(RelayNode(skeys, rng=det_rng(97), wall=net.wall, link=slink,
                                      nat_cells=snat.control_cell), snat)
    stack_addr = ("10.60.0.1", 9000)
    net.add(stack_addr, relay_stack)
    clink = client_link_layer(det_rng(99))
    cnat = NatPart(clink, rng=det_rng(100))
    client_stack = NodeStack(ClientNode(rng=det_rng(99), link=clink, dialer=cnat.dialer,
                                        nat_cells=cnat.control_cell), cnat)
    net.add(("192.0.2.88", 4321), client_stack)
    clink.open_link(stack_addr, skeys.link_pub, net.now, net.wall)
    net.run()
    absent = x25519_public(bytes(range(32)))
    for layer in (bare, relay.link, client.link, slink, clink):  # a handshake to nowhere stays pending (no timers)
        layer.open_link(("10.99.0.1", 9), absent, net.now, net.wall)
        layer.outbox.clear()
        layer.events.clear()

    client.events.clear()
    out = []
    for name, node, layer, pub, nat in (
            ("LinkLayer", bare, bare, keys.link_pub, None),
            ("RelayNode", relay, relay.link, relay.keys.link_pub, None),
            ("ClientNode", client, client.link, client.link.config.link_pub, None),
            ("RelayStack", relay_stack, slink, skeys.link_pub, snat),
            ("ClientStack", client_stack, clink, clink.config.link_pub, cnat)):
        est, pend = _established_indices(layer), _pending_indices(layer)
        assert est and pend, name
        out.append(Target(name, node, layer, pub, est, pend, nat))
    return tuple(out)


def _x25519_pair(rng: object) -> tuple[bytes, bytes]:
    priv = rng(32)  # type: ignore[operator]
    return priv, x25519_public(priv)


EXPECTED_LEN = {0x51: lh.INIT_CLIENT_LEN, 0x52: lh.INIT_RELAY_LEN, 0x53: lh.RESPONSE_LEN, 0x54: 1429}


def datagram_for(target: Target, mode: int, g: Gen) -> bytes:
    """Unauthenticated datagrams of increasing plausibility (mode 0 is plain random bytes)."""
    if mode == 0:
        return g.blob(1600, near=tuple(EXPECTED_LEN.values()))
    kind = g.choice((0x51, 0x52, 0x53, 0x54))
    if mode == 1:  # right type byte, exactly the expected length, random rest
        return bytes([kind]) + g.bytes(EXPECTED_LEN[kind] - 1)
    if mode == 2:  # right type byte, wrong length
        n = g.choice((0, 1, 2, 5, 13, EXPECTED_LEN[kind] - 2, EXPECTED_LEN[kind], 1500))
        return bytes([kind]) + g.bytes(n)
    if mode == 3:  # initiation with a valid mac1 (gets past the cheap filter into the DH)
        kind = g.choice((0x51, 0x52))
        body = bytes([kind, g.choice((1, 1, 0, 2))]) + g.bytes(EXPECTED_LEN[kind] - 2 - 32)
        return body + lh.mac1(target.link_pub, body) + g.bytes(16)
    if mode == 4:  # transport naming a live session: random counter and ciphertext
        return bytes([0x54]) + g.choice(target.established).to_bytes(4, "big") + g.bytes(1429 - 5)
    if mode == 5:  # response naming a handshake in flight
        return bytes([0x53]) + g.choice(target.pending).to_bytes(4, "big") + g.bytes(lh.RESPONSE_LEN - 5)
    # what the NAT demux of a node stack takes (the bare machines drop it as an unknown type): a STUN Binding
    # request (a serving relay answers it), or a NAT frame type with random content
    if g.chance(0.3):
        return stun.binding_request(g.bytes(stun.TXID_LEN), fingerprint=g.chance(0.5))
    return bytes([g.choice((nm.MSG_INTRO_REQUEST, nm.MSG_INTRO_ANSWER, nm.MSG_PUNCH, nm.MSG_RELAYED))]) + g.bytes(
        g.choice((0, 8, 9, 30, 60, 200)))


DATAGRAM_MODES = 7


def counters_of(target: Target) -> tuple[dict, dict, dict]:
    """(link layer, node, NAT part) counters."""
    machine = target.machine
    node_counters = getattr(machine, "counters", None) if machine is not target.layer else None
    return (dict(target.layer.counters), dict(node_counters or {}),
            dict(target.nat.counters) if target.nat is not None else {})


# ---------------------------------------------------------------------------------------- link handshakes
@dataclass(frozen=True)
class HandshakeCase:
    responder_private: bytes
    responder_pub: bytes
    initiation: bytes
    state: lh.InitiatorState
    response: bytes


def fresh_state(case: HandshakeCase) -> lh.InitiatorState:
    """A usable copy of the case's initiator state.  read_response mutates the Noise state (even when it
    fails), so each use needs its own; the fields are immutable bytes, so copying the two objects that
    hold them is enough (and ten times cheaper than copy.deepcopy)."""
    noise = copy.copy(case.state.noise)
    noise.sym = copy.copy(noise.sym)
    return lh.InitiatorState(noise, case.state.sender_index)


@cache
def handshake_cases() -> tuple[HandshakeCase, ...]:
    """Valid NK and IK exchanges.  ``state`` must be deep-copied before use: read_response mutates it."""
    rng = det_rng(4242)
    out = []
    for i in range(4):
        responder = RelayKeys.generate(rng, WALL0)
        if i % 2 == 0:
            state, packet = lh.client_initiation(responder_link_pub=responder.link_pub, sender_index=1000 + i,
                                                 rng=rng)
        else:
            initiator = RelayKeys.generate(rng, WALL0)
            expires = int(WALL) + 86400
            state, packet = lh.relay_initiation(
                link_private=initiator.link_private, identity_pub=initiator.identity_pub, cert_expires=expires,
                cert_sig=initiator.link_cert(expires), responder_link_pub=responder.link_pub,
                sender_index=1000 + i, timestamp_ns=int(WALL * 1e9), rng=rng)
        pristine = copy.deepcopy(state)
        init = lh.read_initiation(link_private=responder.link_private, link_pub=responder.link_pub, packet=packet,
                                  wall=WALL)
        _keys, response = lh.write_response(init, sender_index=2000 + i, rng=rng)
        out.append(HandshakeCase(responder.link_private, responder.link_pub, packet, pristine, response))
    return tuple(out)


# ---------------------------------------------------------------------------------------- key files
def valid_key_json(g: Gen) -> str:
    onion = [OnionKey(g.r.randbytes(32), g.int(0, 2**40)) for _ in range(g.int(1, 3))]
    return RelayKeys(identity_seed=g.r.randbytes(32), link_private=g.r.randbytes(32), onion_keys=onion).to_json()


