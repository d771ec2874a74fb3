"""The services a Shallot exit offers on circuits that end there, by service id (docs/PROTOCOL.md §8.6)."""

from __future__ import annotations

from shallot.crypto.circuit_handshake import SERVICE_DISCARD, SERVICE_ECHO, SERVICE_IP
from shallot.exit.echo import DiscardService, EchoService
from shallot.exit.ipservice import IpExitService
from shallot.relay.endpoints import EndpointService


def endpoint_services(ip: IpExitService | None = None) -> dict[int, EndpointService]:
    """Echo and discard always (a relay that is not an exit refuses them anyway); IP with a TUN."""
    services: dict[int, EndpointService] = {SERVICE_ECHO: EchoService(), SERVICE_DISCARD: DiscardService()}
    if ip is not None:
        services[SERVICE_IP] = ip
    return services
