"""nftables rulesets as JSON (libnftables-json(5)), loaded with ``nft -j -f -``: interface names and
addresses go in as JSON strings, so they stay data and can never be read as rules.  Used by the client's
kill switch (core/vpn/netconfig.py) and the exit's NAT table (exit/tun.py).

A table is always replaced in one transaction: add it (so the delete cannot fail), delete it with whatever
it held, add it anew with its chains and rules.  The kernel applies all of it or nothing, so there is no
moment without the table's rules.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network
from typing import Any

from shallot.core.errors import ShallotError

Expr = dict[str, Any]
Ruleset = dict[str, list[dict[str, Any]]]
PRIO_FILTER = 0  # the priorities the text syntax calls "filter" and "srcnat"
PRIO_SRCNAT = 100
ACCEPT: Expr = {"accept": None}
DROP: Expr = {"drop": None}
MASQUERADE: Expr = {"masquerade": None}


def meta(key: str) -> Expr:
    return {"meta": {"key": key}}


def payload(protocol: str, field: str) -> Expr:
    return {"payload": {"protocol": protocol, "field": field}}


def prefix(network: IPv4Network) -> Expr:
    return {"prefix": {"addr": str(network.network_address), "len": network.prefixlen}}


def match(left: Expr, right: object, op: str = "==") -> Expr:
    return {"match": {"op": op, "left": left, "right": right}}


@dataclass(frozen=True)
class Chain:
    """A base chain: its hook, priority and policy, and its rules (each a list of expressions)."""
    name: str
    type: str
    hook: str
    prio: int
    policy: str
    rules: tuple[tuple[Expr, ...], ...]


def replace_table(family: str, table: str, chains: list[Chain], objects: Sequence[Expr] = ()) -> Ruleset:
    """One transaction that leaves exactly ``chains`` in the table, whatever it held before; ``objects``
    (named sets and counters the rules refer to, e.g. ``{"counter": {"name": ...}}``) are added first."""
    ident = {"family": family, "name": table}
    commands: list[dict[str, Any]] = [{"add": {"table": ident}}, {"delete": {"table": ident}},
                                      {"add": {"table": ident}}]
    for obj in objects:
        (kind, spec), = obj.items()
        commands.append({"add": {kind: {"family": family, "table": table, **spec}}})
    for chain in chains:
        commands.append({"add": {"chain": {"family": family, "table": table, "name": chain.name,
                                           "type": chain.type, "hook": chain.hook, "prio": chain.prio,
                                           "policy": chain.policy}}})
        commands.extend({"add": {"rule": {"family": family, "table": table, "chain": chain.name,
                                          "expr": list(rule)}}} for rule in chain.rules)
    return {"nftables": commands}


def delete_table(family: str, table: str) -> Ruleset:
    return {"nftables": [{"delete": {"table": {"family": family, "name": table}}}]}


def list_table(family: str, table: str) -> Ruleset:
    """Runs without error only if the table exists."""
    return {"nftables": [{"list": {"table": {"family": family, "name": table}}}]}


def run(ruleset: Ruleset) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nft", "-j", "-f", "-"], input=json.dumps(ruleset), capture_output=True, text=True)


def load(ruleset: Ruleset, what: str) -> None:
    """Load ``ruleset``; ShallotError names ``what`` and nft's reason when the kernel refuses it."""
    res = run(ruleset)
    if res.returncode != 0:
        raise ShallotError(f"nftables refused {what}: {res.stderr.strip()}")
