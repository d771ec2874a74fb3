"""A relay's state directory: keys (0600), settings and its current signed descriptor.

    DIR/            0700
      keys.json     0600  identity seed, link key, onion keys (shallot-relay-keys-1)
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
from shallot.crypto.descriptor import Descriptor, DescriptorError, Reachability
from shallot.crypto.keys import RelayKeys
from shallot.crypto.params import DESCRIPTOR_LIFETIME_S

KEYS_FILE = "keys.json"
SETTINGS_FILE = "relay.json"
DESCRIPTOR_FILE = "descriptor"
CONTROL_SOCKET = "control.sock"


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


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_public(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def keygen(state: Path, address: tuple[str, int], nickname: str | None, exit_node: bool) -> Descriptor:
    if (state / KEYS_FILE).exists():
        raise ShallotError(f"{state} already holds relay keys; refusing to overwrite them")
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(state, 0o700)
    wall = time.time()
    keys = RelayKeys.generate(secrets.token_bytes, wall)
    nickname = nickname or f"shallot{keys.relay_id.hex()[:8]}"
    settings = RelaySettings(nickname=nickname, address=address, exit=exit_node)
    try:
        desc = Descriptor.create(keys, nickname=nickname, addresses=(address,), exit_node=exit_node,
                                 published=int(wall), lifetime_s=DESCRIPTOR_LIFETIME_S)
    except DescriptorError as exc:
        raise ShallotError(str(exc)) from None
    _write_private(state / KEYS_FILE, keys.to_json())
    _write_public(state / SETTINGS_FILE, settings.to_json())
    _write_public(state / DESCRIPTOR_FILE, desc.to_text() + "\n")
    return desc


def load(state: Path) -> tuple[RelayKeys, RelaySettings]:
    try:
        keys_text = (state / KEYS_FILE).read_text()
        settings_text = (state / SETTINGS_FILE).read_text()
    except FileNotFoundError:
        raise ShallotError(f"{state} is not a relay state directory (run 'shallot keygen --state {state}' first)") \
            from None
    except OSError as exc:
        raise ShallotError(f"cannot read {state}: {exc.strerror}") from None
    try:
        keys = RelayKeys.from_json(keys_text)
    except ValueError as exc:
        raise ShallotError(f"{state / KEYS_FILE}: {exc}") from None
    return keys, RelaySettings.from_json(settings_text)


def save_keys(state: Path, keys: RelayKeys) -> None:
    _write_private(state / KEYS_FILE, keys.to_json())


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
    try:
        text = (state / DESCRIPTOR_FILE).read_text().strip()
    except FileNotFoundError:
        raise ShallotError(f"{state} has no descriptor (run 'shallot keygen --state {state}' first)") from None
    except OSError as exc:
        raise ShallotError(f"cannot read {state / DESCRIPTOR_FILE}: {exc.strerror}") from None
    try:
        return Descriptor.decode(base64.b64decode(text, validate=True))
    except (ValueError, DescriptorError) as exc:
        raise ShallotError(f"{state / DESCRIPTOR_FILE}: {exc}") from None
