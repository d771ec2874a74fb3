"""Pure codecs, the core's ground floor (docs/PROTOCOL.md): bytes in, typed values out, ``DecodeError`` for
anything malformed.  No state, no time, no I/O.

    cells.py        cells and the end-to-end inner messages (§6)
    nat_frames.py   NAT-traversal datagrams and cells (§13.3)
    stun.py         the STUN subset relays answer and clients ask (§13.1)
    ippacket.py     the IPv4/IPv6 header fields the exit policy needs
    ipconfig.py     the IP service's CONFIG answer and tunnel address plan (§6.7)
    addresses.py    how addresses are judged: networks, scopes, where a relay may extend
"""
