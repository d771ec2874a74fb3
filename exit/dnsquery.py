"""The exit DNS forwarder's pure part (docs/PROTOCOL.md §8.6): what a client's query may ask, how an
upstream answer is matched to the query it answers, and the table of pending queries with a quota per
client.  The sockets are exit/dns.py's.

A query is forwarded only if it is one plain question (opcode QUERY, QDCOUNT 1, no answer or authority
records, at most one additional record: the EDNS OPT) of class IN for a public name.  Names about the
exit's own host or network are refused (REFUSED, never forwarded): single-label names (``_gateway``,
``_outbound``, ``localhost``, the host name, LLMNR and NetBIOS-style names), the special-use and
home-network suffixes in ``LOCAL_SUFFIXES`` (mDNS ``.local``, ``.lan``, ``.home.arpa``, ...), the host's
own name and its search domains (split-horizon zones), and reverse lookups (in-addr.arpa, ip6.arpa)
of any range the exit policy rejects (private, loopback, link-local, CGNAT, ...) or of the exit's own
networks.
"""

from __future__ import annotations

import ipaddress
from collections import Counter, OrderedDict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

from shallot.crypto.codec import DecodeError

DNS_HEADER_LEN = 12
MAX_DNS_LEN = 1232  # EDNS-safe UDP size: the largest query the forwarder takes from a client
MAX_NAME_LEN = 255  # RFC 1035 2.3.4, on the wire
CLASS_IN = 1
OPCODE_QUERY = 0
RCODE_REFUSED = 5
LOCAL_SUFFIXES: tuple[tuple[bytes, ...], ...] = tuple(
    tuple(s.encode().split(b".")) for s in (
        "local", "localhost", "localdomain", "lan", "home", "internal", "intranet", "corp", "private",
        "invalid", "home.arpa"))

Labels = tuple[bytes, ...]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Question:
    txid: bytes  # 2 bytes
    flags: int
    labels: Labels  # lowercased, the root excluded
    qtype: int
    qclass: int
    end: int  # offset just past the question section

    def key(self) -> tuple[Labels, int, int]:
        return self.labels, self.qtype, self.qclass


def parse_question(data: bytes) -> Question:
    """The header and the single question of a DNS message; DecodeError if it is not exactly one
    uncompressed question (a message shorter than a header fails the question count or the name).
    Labels are lowercased (resolvers may echo a name's case differently)."""
    flags = int.from_bytes(data[2:4], "big")
    if int.from_bytes(data[4:6], "big") != 1:
        raise DecodeError("not one question")
    pos, labels = DNS_HEADER_LEN, []
    while True:
        if pos >= len(data):
            raise DecodeError("truncated name")
        length = data[pos]
        if length & 0xC0:
            raise DecodeError("compressed or extended label in a question")
        pos += 1
        if length == 0:
            break
        labels.append(data[pos:pos + length].lower())  # a short label: the next turn finds the name truncated
        pos += length
        if pos - DNS_HEADER_LEN >= MAX_NAME_LEN:  # with the root's zero byte still to come: over 255
            raise DecodeError("name too long")
    if pos + 4 > len(data):
        raise DecodeError("truncated question")
    return Question(data[:2], flags, tuple(labels), int.from_bytes(data[pos:pos + 2], "big"),
                    int.from_bytes(data[pos + 2:pos + 4], "big"), pos + 4)


def parse_query(data: bytes) -> Question:
    """A client's query the forwarder may pass on (module docstring); DecodeError otherwise."""
    if len(data) > MAX_DNS_LEN:
        raise DecodeError("query too long")
    q = parse_question(data)
    if q.flags & 0x8000 or (q.flags >> 11) & 0xF != OPCODE_QUERY:
        raise DecodeError("not a query")
    if data[6:10] != b"\x00\x00\x00\x00" or int.from_bytes(data[10:12], "big") > 1:
        raise DecodeError("records besides the question")
    return q


def answer_matches(data: bytes, sent: Question) -> bool:
    """Is ``data`` a response with the id we sent and the question we asked?"""
    try:
        got = parse_question(data)
    except DecodeError:
        return False
    return bool(got.flags & 0x8000) and got.txid == sent.txid and got.key() == sent.key()


def refused_response(data: bytes, q: Question) -> bytes:
    """REFUSED for query ``data``: its header and question, never longer than the query."""
    flags = 0x8000 | (q.flags & 0x7900) | 0x0080 | RCODE_REFUSED  # QR, its opcode and RD, RA
    return q.txid + flags.to_bytes(2, "big") + b"\x00\x01\x00\x00\x00\x00\x00\x00" + data[DNS_HEADER_LEN:q.end]


def _reverse_network(labels: Labels) -> Network | None:
    """The network a reverse-lookup name stands for (``10.in-addr.arpa`` -> 10.0.0.0/8), None if the name
    is not one.  Malformed reverse names are None too: the resolver answers NXDOMAIN for them."""
    if labels[-2:] == (b"in-addr", b"arpa"):
        parts = labels[:-2]
        if len(parts) > 4 or not all(p.isdigit() and len(p) <= 3 and int(p) <= 255 for p in parts):
            return None
        octets = [int(p) for p in reversed(parts)]
        return ipaddress.IPv4Network((bytes(octets + [0] * (4 - len(octets))), 8 * len(octets)))
    if labels[-2:] == (b"ip6", b"arpa"):
        parts = labels[:-2]
        if len(parts) > 32 or not all(len(p) == 1 and p in b"0123456789abcdef" for p in parts):
            return None
        nibbles = b"".join(reversed(parts)).decode().ljust(32, "0")
        return ipaddress.IPv6Network((int(nibbles, 16), 4 * len(parts)))
    return None


_V4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def refusal(labels: Labels, *, own_names: Iterable[Labels], private: Iterable[Network]) -> str | None:
    """Why a question about ``labels`` is about the exit's own host or network (a counter suffix), or None
    to forward it.  ``own_names``: the host name and search domains (names under them are refused too);
    ``private``: the networks whose reverse names are refused (the policy's built-in rejects and the exit's
    own networks)."""
    if len(labels) <= 1:
        return "single_label"
    for suffix in LOCAL_SUFFIXES:
        if labels[-len(suffix):] == suffix:
            return "local_suffix"
    for own in own_names:
        if own and labels[-len(own):] == own:
            return "own_name"
    network = _reverse_network(labels)
    if network is not None:
        if network.version == 6 and network.overlaps(_V4_MAPPED):
            return "private_reverse"
        if any(network.version == p.version and network.overlaps(p) for p in private):
            return "private_reverse"
    return None


class PendingTable:
    """Pending queries with a quota per client and a global bound.  A client at its quota is refused; a
    full table evicts the oldest query of the client with the most pending (not the newcomer), so one
    client cannot starve another.  Entries are tokens the adapter chooses; expiry is in arrival order
    (every entry lives the same ``timeout_s``)."""

    def __init__(self, max_pending: int, per_client: int, timeout_s: float) -> None:
        self.max_pending, self.per_client, self.timeout_s = max_pending, per_client, timeout_s
        self._all: OrderedDict[Hashable, tuple[Hashable, float]] = OrderedDict()  # token -> (client, deadline)
        self._of: dict[Hashable, OrderedDict[Hashable, None]] = {}  # client -> its tokens, oldest first
        self.counters: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._all)

    def count(self, client: Hashable) -> int:
        return len(self._of.get(client, ()))

    def expired(self, now: float) -> list[Hashable]:
        """Remove and return the tokens whose time is up."""
        out = []
        while self._all:
            token, (_, deadline) = next(iter(self._all.items()))
            if deadline > now:
                break
            self.remove(token)
            out.append(token)
        return out

    def admit(self, client: Hashable, token: Hashable, now: float) -> tuple[bool, list[Hashable]]:
        """(admitted, tokens evicted to make room: the adapter drops their queries)."""
        if self.count(client) >= self.per_client:
            self.counters["dns_drop_client_quota"] += 1
            return False, []
        evicted = []
        while len(self._all) >= self.max_pending:
            heaviest = max(self._of, key=lambda c: len(self._of[c]))
            oldest = next(iter(self._of[heaviest]))
            self.remove(oldest)
            evicted.append(oldest)
            self.counters["dns_evicted"] += 1
        self._all[token] = (client, now + self.timeout_s)
        self._of.setdefault(client, OrderedDict())[token] = None
        return True, evicted

    def remove(self, token: Hashable) -> bool:
        entry = self._all.pop(token, None)
        if entry is None:
            return False
        tokens = self._of[entry[0]]
        del tokens[token]
        if not tokens:
            del self._of[entry[0]]
        return True
