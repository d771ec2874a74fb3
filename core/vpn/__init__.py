"""The client's VPN side (Linux): the TUN device, routes, kill switch, DNS, and the privileged helper that
does the root part for an engine running as an ordinary user (docs/PRIVILEGES.md).

    tunnel.py           Tunnel: the engine's TUN side, packets between the device and the circuit
    tunio.py            batched reads from a non-blocking TUN (also used by the exit)
    netconfig.py        the privileged operations: device, address, routes, nftables kill switch
    netlink.py          the netlink operations they need (routes, addresses, links) over pyroute2
    nftables.py         nftables rulesets as JSON, loaded with `nft -j -f -` (also used by the exit)
    dnsconfig.py        DNS through the tunnel (systemd-resolved or resolv.conf), always put back
    killmark.py         the kill switch's world-readable marker: a block is in place (it outlives a dead engine)
    helper_protocol.py  the helper's typed requests and replies and their JSON lines (pure)
    helper.py           the privileged helper (root side): serves those requests with a NetConfig
    helper_client.py    the engine's side: starts or reaches the helper, HelperNetConfig, PrivilegeError
"""
