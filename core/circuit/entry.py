"""Introducers in the entry position (pure; docs/PROTOCOL.md §5.1, docs/ANONYMITY.md).

A client reaches a guard behind a NAT through the introducers its descriptor names.  An introducer learns
the client's address and which guard it wants, and a relayed link runs through it: it sits in the entry
position beside the guard.  So it obeys the diversity rules of the guard: it is never the middle or the
exit, never in the /16 (IPv6 /32) of the middle or the exit, never in their family (mutual declarations,
when the client knows the introducer's descriptor), and, when the client knows its own public address,
not in the client's own /16 either (one operator would then see both sides of the first link).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from shallot.core.wire.addresses import subnet_key
from shallot.crypto.descriptor import Descriptor


def _mutual_family(a: Descriptor, b: Descriptor) -> bool:
    return a.relay_id in b.family and b.relay_id in a.family


def introducers_fit(guard: Descriptor, others: Sequence[Descriptor], known: Mapping[bytes, Descriptor], *,
                    client_host: str | None = None) -> bool:
    """True if every introducer of ``guard`` may share a circuit with ``others`` (the middle and exit).
    A public guard has none and always fits.  ``known``: descriptors by relay id (the client's view), for
    the family rule."""
    reach = guard.reachability
    if reach is None:
        return True
    other_ids = {o.relay_id for o in others}
    other_nets = {subnet_key(h, p) for o in others for h, p in o.addresses[:1]}
    for rid, (host, port) in reach.introducers:
        if rid in other_ids:
            return False
        net = subnet_key(host, port)
        if net in other_nets:
            return False
        if client_host is not None and net == subnet_key(client_host, 0):
            return False
        desc = known.get(rid)
        if desc is not None and any(_mutual_family(desc, o) for o in others):
            return False
    return True
