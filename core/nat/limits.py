"""Timers and limits of NAT traversal, in one place (docs/PROTOCOL.md §13.5 lists them by these names)."""

from __future__ import annotations

# dialer
INTRO_RETRY_S = 0.5
INTRO_TRIES = 4  # per introducer
PUNCH_INTERVAL_S = 0.1  # both ends, while punching
PUNCH_TIMEOUT_S = 2.0  # then relay fallback
UPGRADE_INTERVAL_S = 10.0  # a relayed link keeps trying a direct path this often ...
UPGRADE_TRIES = 6  # ... this many times
MAX_DIALS = 256
MAX_PUNCHED = 1024  # addresses remembered as punched (dialer and registrant), least recent forgotten

# registrant (a relay behind a NAT)
INTRODUCED_KEEP_S = 120.0
REREGISTER_S = 2.0
REBIND_CHECK_S = 20.0
MAX_INTRODUCED = 256
# PUNCH probes to an introduced address that has sent us no PUNCH yet (the first 0.6 s of a punch; once the
# dialer's PUNCH arrives we probe for the whole PUNCH_TIMEOUT_S).  The INTRO_REQUEST that caused them is padded
# to cover them with their IP/UDP headers (nat_frames.INTRO_REQUEST_LEN): 37 + 6 x 12 = 109 bytes of payload,
# 109 + 7 x 28 = 305 on the wire, for a 280-byte request (308 on the wire).  A spoofed one reflects, never
# amplifies.  The first probe already opens our NAT towards the dialer, whose own probes then get through
PUNCH_PROBES_UNANSWERED = 6

# introducer (relay-server)
SESSION_IDLE_S = 120.0  # a session without traffic is forgotten
MAX_REGISTRATIONS = 1024  # full: the heaviest source's oldest registration goes (if it holds two or more)
MAX_REGISTRATIONS_PER_SOURCE = 8  # a ninth from one source (IPv4 address, IPv6 /64) replaces its oldest
MAX_SESSIONS = 4096  # full: the oldest never-used session goes, else the heaviest source's least recently used
MAX_PATHS = 1024  # relay sessions a node is an end of (virtual.RelayedPaths), least recently used forgotten
INTRO_RATE, INTRO_BURST = 10.0, 20.0  # INTRO_REQUESTs per source (IPv4 address, IPv6 /64)
MAX_SESSIONS_PER_SOURCE = 8  # relay sessions one source holds; a ninth evicts its least recently used
# INTRODUCE cells per registered relay: flushing its MAX_INTRODUCED table within a punch timeout would
# take MAX_INTRODUCED / PUNCH_TIMEOUT_S = 128/s, far above this
TARGET_INTRO_RATE, TARGET_INTRO_BURST = 16.0, 32.0

# STUN server (§13.1)
STUN_RATE, STUN_BURST = 20.0, 40.0  # requests answered per source (IPv4 address, IPv6 /64)
FORWARD_RATE, FORWARD_BURST = 20.0, 40.0  # one global bucket: OTHER-RELAY forwards and RESPONSE-DESTINATION answers
