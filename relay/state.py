"""A relay's state directory: keys (0600), settings and its current signed descriptor.

    DIR/            0700  refused when another user owns it or may write to it (or to a folder above it)
      keys.json     0600  identity seed, link key, onion keys (shallot-relay-keys-1); refused when group or
                          others may read it, or when it is a symlink or another user's
      relay.json    0644  nickname, address, exit flag (what keygen was given)
      descriptor    0644  base64 of the current signed descriptor
      control.sock  0600  control socket while the relay runs
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from shallot.core.errors import ShallotError
from shallot.core.privfile import check_private_dir, private_dir, read_regular, write_private
from shallot.crypto.descriptor import Descriptor, DescriptorError, Reachability
from shallot.crypto.keys import RelayKeys
from shallot.crypto.params import DESCRIPTOR_LIFETIME_S

KEYS_FILE = "keys.json"
SETTINGS_FILE = "relay.json"
DESCRIPTOR_FILE = "descriptor"
CONTROL_SOCKET = "control.sock"
MAX_STATE_FILE = 1 << 20  # keys.json, relay.json and the descriptor are a few kB


@dataclass
class RelaySettings:
    nickname: str
    address: tuple[str, int]
    exit: bool

    def to_json(self) -> str:
        return json.dumps({"nickname": self.nickname, "address": [self.address[0], self.address[1]],
                           "exit": self.exit}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> RelaySettings:
        try:
            d = json.loads(text)
            host, port = d["address"]
            return cls(nickname=str(d["nickname"]), address=(str(host), int(port)), exit=bool(d["exit"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ShallotError(f"corrupt {SETTINGS_FILE}: {exc}") from None


def _write_public(path: Path, text: str) -> None:
    write_private(path, text, mode=0o644)  # readable by anyone (the descriptor is public), planted by no one


def _check_state(state: Path) -> None:
    """The state directory must be ours and closed to others (core/privfile.py): whoever can write into it can
    plant a symlink for the next write to follow, or swap keys.json (docs/PROTOCOL.md §3.6)."""
    check_private_dir(state)


def keygen(state: Path, address: tuple[str, int], nickname: str | None, exit_node: bool) -> Descriptor:
    private_dir(state)  # created 0700, or refused if it is not ours alone: before anything is looked at in it
    if os.path.lexists(state / KEYS_FILE):
        raise ShallotError(f"{state} already holds relay keys; refusing to overwrite them")
    if os.stat(state).st_mode & 0o077:
        os.chmod(state, 0o700)  # ours and closed to writes (checked); closed to reading too
    wall = time.time()
    keys = RelayKeys.generate(secrets.token_bytes, wall)
    nickname = nickname or f"shallot{keys.relay_id.hex()[:8]}"
    settings = RelaySettings(nickname=nickname, address=address, exit=exit_node)
    try:
        desc = Descriptor.create(keys, nickname=nickname, addresses=(address,), exit_node=exit_node,
                                 published=int(wall), lifetime_s=DESCRIPTOR_LIFETIME_S)
    except DescriptorError as exc:
        raise ShallotError(str(exc)) from None
    write_private(state / KEYS_FILE, keys.to_json())
    _write_public(state / SETTINGS_FILE, settings.to_json())
    _write_public(state / DESCRIPTOR_FILE, desc.to_text() + "\n")
    return desc


def load(state: Path) -> tuple[RelayKeys, RelaySettings]:
    """Keys and settings; ShallotError if the directory or keys.json could be changed or read by another user
    (like ssh with a private key file: refused, never silently fixed; the message says what to chmod)."""
    if not os.path.lexists(state / KEYS_FILE) and not os.path.lexists(state / SETTINGS_FILE):
        raise ShallotError(f"{state} is not a relay state directory (run 'shallot keygen --state {state}' first)")
    _check_state(state)
    try:
        keys_text = read_regular(state / KEYS_FILE, MAX_STATE_FILE, private=True).decode()
        settings_text = read_regular(state / SETTINGS_FILE, MAX_STATE_FILE).decode()
    except FileNotFoundError:
        raise ShallotError(f"{state} is not a relay state directory (run 'shallot keygen --state {state}' first)") \
            from None
    except UnicodeDecodeError as exc:
        raise ShallotError(f"cannot read {state}: {exc}") from None
    try:
        keys = RelayKeys.from_json(keys_text)
    except ValueError as exc:
        raise ShallotError(f"{state / KEYS_FILE}: {exc}") from None
    return keys, RelaySettings.from_json(settings_text)


def save_keys(state: Path, keys: RelayKeys) -> None:
    write_private(state / KEYS_FILE, keys.to_json())


def publish_descriptor(state: Path, keys: RelayKeys, settings: RelaySettings, wall: float, *,
                       reachability: Reachability | None = None,
                       public: tuple[str, int] | None = None) -> Descriptor:
    """Sign and write our descriptor.  Behind a NAT: ``public`` (seen via STUN) is the address listed and
    ``reachability`` names our introducers (docs/PROTOCOL.md §3.4.1)."""
    desc = Descriptor.create(keys, nickname=settings.nickname, addresses=(public or settings.address,),
                             exit_node=settings.exit, published=int(wall), lifetime_s=DESCRIPTOR_LIFETIME_S,
                             reachability=reachability)
    _write_public(state / DESCRIPTOR_FILE, desc.to_text() + "\n")
    return desc


def read_descriptor(state: Path) -> Descriptor:
    import base64
    try:  # any user's relay (``shallot directory``): no ownership asked, but never a FIFO or a huge file
        text = read_regular(state / DESCRIPTOR_FILE, MAX_STATE_FILE).decode().strip()
    except FileNotFoundError:
        raise ShallotError(f"{state} has no descriptor (run 'shallot keygen --state {state}' first)") from None
    except UnicodeDecodeError as exc:
        raise ShallotError(f"cannot read {state / DESCRIPTOR_FILE}: {exc}") from None
    try:
        return Descriptor.decode(base64.b64decode(text, validate=True))
    except (ValueError, DescriptorError) as exc:
        raise ShallotError(f"{state / DESCRIPTOR_FILE}: {exc}") from None
