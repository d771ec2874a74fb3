"""Discovery: relays find each other through a Kademlia DHT of signed descriptors (docs/DHT.md).

The rest of Shallot sees only this package's narrow interface:

* ``DhtNode`` (dht.py): start, publish a descriptor, crawl the whole network, stop, counters.
* ``NetworkView`` (view.py): the client's verified copy of every live relay, newest descriptor wins.
* ``load_view``/``save_view`` (cache.py): the last good view on disk (0600).
* ``Discovery`` (service.py): what relays and clients run; it is the only user of ``DhtNode``.

Pure modules (no I/O, no clock, no randomness of their own): addresses.py, records.py, storage.py,
wire.py, view.py.  The ``kademlia`` package is used only by dht.py and storage.py, so it could be replaced
without touching anything outside this package.
"""
