"""Errors shown to users.  ShallotError carries a one-line message; the CLI prints it without a traceback."""

from __future__ import annotations


class ShallotError(Exception):
    """A problem the user can act on: bad input, unreadable files, unreachable relays."""
