"""The asyncio adapters of the sans-I/O machines: the only place in the data plane with sockets, a clock
and a loop.

    udp.py             NodeEndpoint: one UDP socket driving one machine (GRO/GSO batching, one timer)
    circuit_client.py  CircuitClient: a ClientNode and its NAT part (a NodeStack) on a NodeEndpoint, with futures
                       for builds, echoes and the NAT classification
"""
