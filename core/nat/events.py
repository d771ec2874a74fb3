"""What the NAT part tells its owner (``NatPart.events``); the asyncio adapters react to them or await them."""

from __future__ import annotations

from dataclasses import dataclass

from shallot.core.link import Address, Link
from shallot.core.nat.classify import NatType


@dataclass(frozen=True)
class NatClassified:
    """The probe finished: our NAT's behaviour (``udp_blocked`` if nothing answered) and public address."""

    nat: NatType


@dataclass(frozen=True)
class PublicAddressChanged:
    """The rebinding check saw another mapped address (NAT rebinding or a new network): republish."""

    public: Address
    previous: Address


@dataclass(frozen=True)
class LinkUpgraded:
    """A link we dialed through the relay-server now runs on a direct (hole-punched) path."""

    link: Link


NatEvent = NatClassified | PublicAddressChanged | LinkUpgraded
