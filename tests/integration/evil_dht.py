"""A malicious DHT node for the integration tests.

    python tests/integration/evil_dht.py --port P --bootstrap HOST:PORT --victims DIR[,DIR...]

It is a real DHT node (our DhtNode, so it passes the id binding with its own valid identity: that much
any attacker can do) that, once joined, tries every poisoning it can against the victims' records:

* forged   - a victim's descriptor pointing at the attacker, signed with the attacker's key;
* altered  - a victim's real descriptor with its port changed, original signature kept;
* expired  - a validly signed descriptor (the attacker's second identity) whose validity has passed;
* replayed - a victim's older descriptor, validly signed by the victim (the test harness signs it with
             the victim's key from its state directory, standing in for one captured earlier), pointing
             at the attacker: the rollback attack;
* misfiled - a victim's current descriptor stored under another victim's key.

It stores each at every DHT node it can find (trying to overwrite the good ones) and serves them,
instead of what it holds, in its own ``list_records`` and ``find_value`` answers.  It prints
``evil: stored N at K nodes, accepted {kind: count}`` (how many honest nodes took each kind) and then
``evil: ready``, and runs until SIGTERM.  It sends only to the loopback addresses it is given or finds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Any

from shallot.core.discovery.addresses import Address, dht_address
from shallot.core.discovery.dht import DhtNode, ShallotRpc
from shallot.core.wire.addresses import parse_hostport
from shallot.crypto.descriptor import Descriptor
from shallot.crypto.keys import RelayKeys
from shallot.crypto.params import LABEL_DESCRIPTOR
from shallot.relay.state import load, read_descriptor


def bad_records(victims: list[Path], evil_addr: Address) -> list[tuple[str, bytes, bytes]]:
    """(kind, key, value) for every attack on every victim."""
    now = int(time.time())
    attacker = RelayKeys.generate(secrets.token_bytes, now)
    second = RelayKeys.generate(secrets.token_bytes, now)
    out: list[tuple[str, bytes, bytes]] = []
    expired = Descriptor.create(second, nickname="evilexpired", addresses=(evil_addr,), exit_node=True,
                                published=now - 8 * 86400, lifetime_s=7 * 86400)
    out.append(("expired", expired.relay_id, expired.encode()))
    descs = [read_descriptor(v) for v in victims]
    for state, real in zip(victims, descs):
        fields = {**real.__dict__, "addresses": (evil_addr,)}
        unsigned = Descriptor(**{**fields, "signature": b""})
        forged = Descriptor(**{**fields, "signature": attacker.sign(LABEL_DESCRIPTOR + unsigned.body())})
        out.append(("forged", real.relay_id, forged.encode()))
        raw = bytearray(real.encode())
        port_at = len(raw) - 64 - 1 - 1 - 4 * len(real.exit_policy.ranges) - 1 - 20 * len(real.family) - 2
        raw[port_at + 1] ^= 0x01  # the low byte of the first address's port
        out.append(("altered", real.relay_id, bytes(raw)))
        keys, _settings = load(state)
        old = Descriptor.create(keys, nickname=real.nickname, addresses=(evil_addr,), exit_node=real.is_exit,
                                published=real.published - 600, lifetime_s=7 * 86400)
        out.append(("replayed", real.relay_id, old.encode()))
    if len(descs) >= 2:
        out.append(("misfiled", descs[1].relay_id, descs[0].encode()))
    return out


class EvilRpc(ShallotRpc):
    poison: list[bytes] = []

    def rpc_list_records(self, sender: Address, nodeid: bytes | None, after: bytes | None) -> list[Any]:
        # one poisoned record per page: an answer must fit its (1200-byte) request, PROTOCOL §12.3
        i = 0 if after is None else int.from_bytes(after, "big")
        if i >= len(self.poison):
            return [[], None]
        return [[self.poison[i]], (i + 1).to_bytes(20, "big") if i + 1 < len(self.poison) else None]

    def rpc_find_value(self, sender: Address, nodeid: bytes | None, key: bytes) -> Any:
        return {"value": self.poison[0]}


class EvilNode(DhtNode):
    def _create_protocol(self) -> ShallotRpc:
        return EvilRpc(self.node, self.storage, self.ksize, serve=True, own_record=self.own_record,
                       allow_loopback=True, sign=self.sign)


async def main_async(args: argparse.Namespace) -> int:
    link = ("127.0.0.1", args.port - 1)
    keys = RelayKeys.generate(secrets.token_bytes, time.time())
    me = Descriptor.create(keys, nickname="evil", addresses=(link,), exit_node=False,
                           published=int(time.time()), lifetime_s=3600)
    victims = [Path(v) for v in args.victims.split(",") if v]
    records = bad_records(victims, link)
    EvilRpc.poison = [raw for _kind, _key, raw in records]
    node = EvilNode(node_id=me.relay_id, serve=True, own_record=me.encode, allow_loopback=True, sign=keys.sign)
    await node.start(dht_address(link))
    await node.join([dht_address(parse_hostport(args.bootstrap))])
    crawl = await node.crawl([dht_address(parse_hostport(args.bootstrap))], time_limit_s=8)
    targets = [a for nid, a in crawl.nodes.items() if nid != me.relay_id]
    stored = 0
    accepted: dict[str, int] = {}
    for addr in targets:
        results = await asyncio.gather(*(node.store_at(addr, key, raw) for _kind, key, raw in records))
        stored += len(results)
        for (kind, _key, _raw), took in zip(records, results):
            accepted[kind] = accepted.get(kind, 0) + took
    # a node that holds no descriptor of a victim yet cannot tell a replayed older one from the first it
    # sees: it keeps it until the newer one arrives (newest wins); every other kind must never be taken
    print(f"evil: stored {stored} at {len(targets)} nodes, accepted {json.dumps(accepted)}", flush=True)
    print("evil: ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    node.stop()
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", required=True, type=int, help="the evil DHT port on 127.0.0.1")
    p.add_argument("--bootstrap", required=True, help="a relay address (its DHT is port + 1)")
    p.add_argument("--victims", required=True, help="relay state directories, comma-separated")
    args = p.parse_args()
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
