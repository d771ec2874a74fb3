"""``shallot paths``: sample paths exactly as a fresh client would choose them now and show how concentrated
they are (docs/PROTOCOL.md §5.1): per position, how often each relay, IP address (without port), /16
(IPv6 /32) and mutual family lands there, and the share of paths whose guard and exit look like one
operator (same IP, same /16 or mutual family).  Anyone can audit a network's concentration with it.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from shallot.core.circuit.path import NO_HISTORY, Candidates, Known, draw_path, mutual_family, same_operator
from shallot.crypto.descriptor import Descriptor

if TYPE_CHECKING:
    import random

POSITIONS = ("guard", "middle", "exit")


def slash16(desc: Descriptor) -> str:
    """The literal /16 (IPv6 /32) of the dialed address; loopback is no exception here."""
    ip = ipaddress.ip_address(desc.address[0])
    return str(ipaddress.ip_network(f"{ip}/{16 if ip.version == 4 else 32}", strict=False))


def families(relays: Sequence[Descriptor]) -> dict[bytes, str]:
    """Relay id -> its mutual family's label (the smallest member id, hex), for relays in one of two or more."""
    by_id = {d.relay_id: d for d in relays}
    parent = {rid: rid for rid in by_id}

    def root(r: bytes) -> bytes:
        while parent[r] != r:
            parent[r] = parent[parent[r]]
            r = parent[r]
        return r

    for d in relays:
        for other in d.family:
            if other in by_id and mutual_family(d, by_id[other]):
                a, b = root(d.relay_id), root(other)
                parent[max(a, b)] = min(a, b)
    groups: dict[bytes, list[bytes]] = {}
    for rid in by_id:
        groups.setdefault(root(rid), []).append(rid)
    return {rid: min(members).hex() for members in groups.values() if len(members) > 1 for rid in members}


def sample(relays: Sequence[Descriptor], rng: random.Random, n: int, *, known: Known = NO_HISTORY,
           exclude: frozenset[bytes] = frozenset()) -> list[list[Descriptor]]:
    cands = Candidates(relays, known, exclude)
    return [draw_path(cands, rng) for _ in range(n)]


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(text: str) -> list[Network]:
    """``CIDR[,CIDR...]`` for ``--colluding`` (a bare address is its own /32 or /128); ValueError if bad."""
    nets = [ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip()]
    if not nets:
        raise ValueError("no network given")
    return nets


def tally(paths: Sequence[Sequence[Descriptor]], relays: Sequence[Descriptor],
          colluding: Sequence[Network] = ()) -> dict[str, Any]:
    """The audit as one JSON-able object.  ``colluding``: networks to treat as one adversary; the result then
    also says in what share of paths the guard and the exit are both inside them."""
    fam = families(relays)
    positions: dict[str, dict[str, Counter[str]]] = {
        pos: {"relays": Counter(), "ips": Counter(), "slash16": Counter(), "families": Counter()} for pos in POSITIONS}
    shared: Counter[str] = Counter()
    for path in paths:
        for pos, d in zip(POSITIONS, path, strict=True):
            row = positions[pos]
            row["relays"][d.id_hex] += 1
            row["ips"][str(ipaddress.ip_address(d.address[0]))] += 1
            row["slash16"][slash16(d)] += 1
            if d.relay_id in fam:
                row["families"][fam[d.relay_id]] += 1
        same = same_operator(path[0], path[-1])
        shared.update(k for k, v in same.items() if v)
        shared["any"] += any(same.values())
    n = len(paths)
    extra: dict[str, Any] = {}
    if colluding:
        def inside(d: Descriptor) -> bool:
            ip = ipaddress.ip_address(d.address[0])
            return any(ip in net for net in colluding)
        both = sum(inside(p[0]) and inside(p[-1]) for p in paths)
        extra["colluding"] = {"networks": [str(net) for net in colluding],
                              "guard_and_exit": round(both / n, 6) if n else 0.0}
    return {**extra, "sample": n, "relays_in_view": len(relays),
            "positions": {pos: {k: dict(c.most_common()) for k, c in row.items()} for pos, row in positions.items()},
            "guard_exit_same_operator": {k: round(shared[k] / n, 6) if n else 0.0
                                         for k in ("any", "ip", "slash16", "family")}}


def describe(result: Mapping[str, Any], relays: Sequence[Descriptor], top: int = 5) -> str:
    """Human-readable: per position the most frequent relays, IPs, /16s and families, then the operator share."""
    n = result["sample"]
    nick = {d.id_hex: d.nickname for d in relays}
    lines = [f"{n} paths sampled from {result['relays_in_view']} relays (as a fresh client chooses them now)"]
    for pos in POSITIONS:
        row = result["positions"][pos]
        lines.append(f"{pos}:")
        for key, label in (("relays", "relay"), ("ips", "IP"), ("slash16", "/16"), ("families", "family")):
            counts = row[key]
            if not counts:
                continue
            items = list(counts.items())[:top]
            shown = ", ".join(f"{nick.get(k, k[:12]) if key == 'relays' else k[:16]} {v / n:.1%}" for k, v in items)
            more = f" (+{len(counts) - top} more)" if len(counts) > top else ""
            lines.append(f"  {label + ':':8} {len(counts):4d} distinct; top: {shown}{more}")
    share = result["guard_exit_same_operator"]
    lines.append(f"guard and exit look like one operator in {share['any']:.2%} of paths "
                 f"(same IP {share['ip']:.2%}, same /16 {share['slash16']:.2%}, mutual family {share['family']:.2%})")
    if "colluding" in result:
        c = result["colluding"]
        lines.append(f"guard and exit both in {', '.join(c['networks'])}: {c['guard_and_exit']:.2%} of paths")
    return "\n".join(lines)
