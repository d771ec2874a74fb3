"""Shallot: an onion-routed VPN over UDP (guard -> middle -> exit circuits built in one round trip).

This package is the composition root: ``shallot`` (cli.py, ``python -m shallot``) is the one place that
imports every part.  The parts are installed as ``shallot.app``, ``shallot.core``, ``shallot.crypto``,
``shallot.exit`` and ``shallot.relay``; docs/ARCHITECTURE.md maps them.
"""

__version__ = "0.1.0"
