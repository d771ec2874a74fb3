"""What the link layer tells its owner (``LinkLayer.events``)."""

from __future__ import annotations

from dataclasses import dataclass

from shallot.core.link.state import Link


@dataclass(frozen=True)
class LinkUp:
    link: Link


@dataclass(frozen=True)
class LinkDown:
    link: Link
    reason: str
