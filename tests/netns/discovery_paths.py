"""Discover the network from the client namespace and sample paths exactly as a client chooses them
(for tests/netns/test_discovery_nat.py's on-path attacker test).

    python tests/netns/discovery_paths.py --bootstrap SEEDS --cache FILE --samples N --attacker ID[,ID...]

Prints one JSON object: relays known, how often each position went to the attacker's relays, the share
of paths entirely the attacker's, and the client's discovery counters (what it dropped and why).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
from pathlib import Path

from shallot.core.circuit.path import choose_path
from shallot.core.discovery.service import ClientDiscovery, parse_seeds


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--cache", required=True, type=Path)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--attacker", default="")
    args = ap.parse_args()
    attacker = {bytes.fromhex(h) for h in args.attacker.split(",") if h}
    disc = ClientDiscovery(parse_seeds(args.bootstrap), args.cache)

    async def crawl() -> dict:
        try:
            await disc.refresh()
            return disc.status()["counters"]  # with the DHT node's own (gone once it is closed)
        finally:
            disc.close()

    counters = asyncio.run(crawl())
    relays = disc.relays()
    rng = random.Random(11)
    hits = {"guard": 0, "middle": 0, "exit": 0}
    whole = 0
    for _ in range(args.samples):
        path = choose_path(relays, rng, path_spec=None, exit_spec=None)
        owned = [d.relay_id in attacker for d in path]
        for pos, own in zip(hits, owned):
            hits[pos] += own
        whole += all(owned)
    print(json.dumps({"relays_known": len(relays), "view": sorted(d.id_hex for d in relays),
                      "samples": args.samples, "attacker_positions": hits, "attacker_whole_paths": whole,
                      "dht_nodes": disc.last_crawl.get("nodes"), "alarm": disc.alarm,
                      "dropped": {k: v for k, v in counters.items() if k.startswith("drop_answer")},
                      "rpc_timeouts": counters.get("rpc_timeouts", 0)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
