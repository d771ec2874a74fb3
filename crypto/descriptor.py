"""Signed relay descriptors and the directory file that bundles them (docs/PROTOCOL.md §3)."""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field

from shallot.crypto.codec import Address, DecodeError, EncodeError, Reader, decode_address, encode_address
from shallot.crypto.keys import RELAY_ID_LEN, RelayKeys, onion_key_id, relay_id_of
from shallot.crypto.params import LABEL_DESCRIPTOR, SUPPORTED_VERSIONS
from shallot.crypto.primitives import AuthFailure, ed25519_verify

DESCRIPTOR_MAGIC = b"SHD1"
DIRECTORY_HEADER = "shallot-directory 1"
FLAG_EXIT = 0x01
FLAG_EXTENSIONS = 0x02  # an extension list follows the exit policy (§3.4.1)
EXT_REACHABILITY = 1  # "reach me through these introducers" (NAT traversal, §13)
MAX_EXTENSIONS = 8
MAX_INTRODUCERS = 4
NICKNAME_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")  # always used with fullmatch
MAX_ADDRESSES = 4
MAX_FAMILY = 16
MAX_POLICY_RANGES = 32
MAX_DESCRIPTOR_LEN = 2048
MAX_LIFETIME_S = 30 * 86400  # a descriptor may not claim to be valid for longer than this



class DescriptorError(ValueError):
    """A descriptor or directory is malformed, wrongly signed, expired or unusable."""


@dataclass(frozen=True)
class ExitPolicySummary:
    """Ports an exit accepts: ``accept`` is the default, ``ranges`` the exceptions (inclusive)."""

    accept_by_default: bool = True
    ranges: tuple[tuple[int, int], ...] = ()

    def allows_port(self, port: int) -> bool:
        inside = any(lo <= port <= hi for lo, hi in self.ranges)
        return self.accept_by_default != inside

    @classmethod
    def default_exit(cls) -> ExitPolicySummary:
        return cls(accept_by_default=True, ranges=((25, 25),))  # no SMTP: spam magnet

    def __str__(self) -> str:
        spans = ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in self.ranges)
        return f"{'accept' if self.accept_by_default else 'reject'} all{' except ' + spans if spans else ''}"


@dataclass(frozen=True)
class Reachability:
    """A relay behind a NAT: its NAT behaviour (RFC 4787 codes 0-3: unknown, endpoint-independent,
    address-dependent, address-and-port-dependent) and the introducers it keeps a registration with."""

    mapping: int
    filtering: int
    introducers: tuple[tuple[bytes, Address], ...]  # (relay id, address)

    def encode(self) -> bytes:
        out = bytearray((self.mapping, self.filtering, len(self.introducers)))
        for relay_id, (host, port) in self.introducers:
            out += relay_id + _encode_address(host, port)
        return bytes(out)

    @classmethod
    def decode(cls, value: bytes) -> Reachability:
        r = Reader(value)
        mapping, filtering, n = r.u8(), r.u8(), r.u8()
        if mapping > 3 or filtering > 3:
            raise DecodeError("bad NAT behaviour code")
        if not 1 <= n <= MAX_INTRODUCERS:
            raise DecodeError("bad introducer count")
        intro = tuple((r.take(RELAY_ID_LEN), decode_address(r)) for _ in range(n))
        r.end()
        return cls(mapping, filtering, intro)


@dataclass(frozen=True)
class Descriptor:
    identity_pub: bytes
    link_pub: bytes
    onion_pub: bytes
    published: int
    expires: int
    flags: int
    nickname: str
    addresses: tuple[Address, ...]
    version_min: int = 1
    version_max: int = 1
    family: tuple[bytes, ...] = ()
    exit_policy: ExitPolicySummary = field(default_factory=ExitPolicySummary)
    reachability: Reachability | None = None
    signature: bytes = b""

    @property
    def relay_id(self) -> bytes:
        return relay_id_of(self.identity_pub)

    @property
    def id_hex(self) -> str:
        return self.relay_id.hex()

    @property
    def is_exit(self) -> bool:
        return bool(self.flags & FLAG_EXIT)

    @property
    def onion_key_id(self) -> bytes:
        return onion_key_id(self.onion_pub)

    @property
    def address(self) -> Address:
        return self.addresses[0]

    def body(self) -> bytes:
        out = bytearray(DESCRIPTOR_MAGIC)
        out += bytes([self.version_min, self.version_max])
        out += self.identity_pub + self.link_pub + self.onion_pub
        out += self.published.to_bytes(8, "big") + self.expires.to_bytes(8, "big")
        out.append(self.flags)
        nick = self.nickname.encode()
        out.append(len(nick))
        out += nick
        out.append(len(self.addresses))
        for host, port in self.addresses:
            out += _encode_address(host, port)
        out.append(len(self.family))
        for member in self.family:
            out += member
        out.append(1 if self.exit_policy.accept_by_default else 0)
        out.append(len(self.exit_policy.ranges))
        for lo, hi in self.exit_policy.ranges:
            out += lo.to_bytes(2, "big") + hi.to_bytes(2, "big")
        if self.flags & FLAG_EXTENSIONS:
            exts = [(EXT_REACHABILITY, self.reachability.encode())] if self.reachability is not None else []
            out.append(len(exts))
            for ext_type, value in exts:
                out += bytes((ext_type, len(value))) + value
        return bytes(out)

    def encode(self) -> bytes:
        return self.body() + self.signature

    @classmethod
    def create(cls, keys: RelayKeys, *, nickname: str, addresses: tuple[Address, ...], exit_node: bool,
               published: int, lifetime_s: int, family: tuple[bytes, ...] = (),
               exit_policy: ExitPolicySummary | None = None,
               reachability: Reachability | None = None) -> Descriptor:
        if not NICKNAME_RE.fullmatch(nickname):
            raise DescriptorError("nickname must be 1-32 characters of A-Z a-z 0-9 _ -")
        # refuse to sign anything decode() would reject
        if not 1 <= len(addresses) <= MAX_ADDRESSES:
            raise DescriptorError(f"a descriptor has 1..{MAX_ADDRESSES} addresses")
        for host, port in addresses:
            _encode_address(host, port)  # validates
        if len(family) > MAX_FAMILY or any(len(m) != RELAY_ID_LEN for m in family):
            raise DescriptorError(f"a family has at most {MAX_FAMILY} relay ids of {RELAY_ID_LEN} bytes")
        if exit_policy is not None and (len(exit_policy.ranges) > MAX_POLICY_RANGES or any(
                not 0 <= lo <= hi <= 65535 for lo, hi in exit_policy.ranges)):
            raise DescriptorError(f"an exit policy has at most {MAX_POLICY_RANGES} port ranges lo..hi")
        if not 0 < lifetime_s <= MAX_LIFETIME_S:
            raise DescriptorError(f"descriptor lifetime must be 1 s .. {MAX_LIFETIME_S // 86400} days")
        if reachability is not None:
            try:
                Reachability.decode(reachability.encode())
            except (DecodeError, DescriptorError, ValueError) as exc:
                raise DescriptorError(f"bad reachability: {exc}") from None
        flags = (FLAG_EXIT if exit_node else 0) | (FLAG_EXTENSIONS if reachability is not None else 0)
        unsigned = cls(identity_pub=keys.identity_pub, link_pub=keys.link_pub, onion_pub=keys.current_onion.public,
                       published=published, expires=published + lifetime_s, flags=flags,
                       nickname=nickname, addresses=addresses, version_min=min(SUPPORTED_VERSIONS),
                       version_max=max(SUPPORTED_VERSIONS), family=family,
                       exit_policy=exit_policy or (ExitPolicySummary.default_exit() if exit_node
                                                   else ExitPolicySummary(False, ())),
                       reachability=reachability)
        sig = keys.sign(LABEL_DESCRIPTOR + unsigned.body())
        return cls(**{**unsigned.__dict__, "signature": sig})

    @classmethod
    def decode(cls, data: bytes) -> Descriptor:
        """Parse and check the signature.  Raises DescriptorError; expiry is checked by ``check_valid``."""
        if len(data) > MAX_DESCRIPTOR_LEN:
            raise DescriptorError("descriptor too long")
        try:
            r = Reader(data)
            if r.take(4) != DESCRIPTOR_MAGIC:
                raise DecodeError("bad magic")
            vmin, vmax = r.u8(), r.u8()
            identity_pub, link_pub, onion_pub = r.take(32), r.take(32), r.take(32)
            published, expires = r.u64(), r.u64()
            flags = r.u8()
            nickname = r.take(r.u8()).decode("utf-8")
            if not NICKNAME_RE.fullmatch(nickname):
                raise DecodeError("bad nickname")
            n_addr = r.u8()
            if not 1 <= n_addr <= MAX_ADDRESSES:
                raise DecodeError("bad address count")
            addresses = tuple(decode_address(r) for _ in range(n_addr))
            n_fam = r.u8()
            if n_fam > MAX_FAMILY:
                raise DecodeError("family too large")
            family = tuple(r.take(RELAY_ID_LEN) for _ in range(n_fam))
            default = r.u8()
            if default > 1:
                raise DecodeError("bad policy default")
            n_ranges = r.u8()
            if n_ranges > MAX_POLICY_RANGES:
                raise DecodeError("policy too large")
            ranges = []
            for _ in range(n_ranges):
                lo, hi = r.u16(), r.u16()
                if lo > hi:
                    raise DecodeError("bad port range")
                ranges.append((lo, hi))
            reachability = None
            if flags & FLAG_EXTENSIONS:
                n_ext = r.u8()
                if n_ext > MAX_EXTENSIONS:
                    raise DecodeError("too many extensions")
                for _ in range(n_ext):
                    ext_type, value = r.u8(), r.take(r.u8())
                    if ext_type == EXT_REACHABILITY:
                        if reachability is not None:
                            raise DecodeError("duplicate reachability")
                        reachability = Reachability.decode(value)
                    # other types: skipped (later versions), still covered by the signature
            body_len = r.consumed
            signature = r.take(64)
            r.end()
        except (DecodeError, UnicodeDecodeError) as exc:
            raise DescriptorError(f"malformed descriptor: {exc}") from None
        if vmin > vmax:
            raise DescriptorError("malformed descriptor: bad version range")
        if not published < expires <= published + MAX_LIFETIME_S:
            raise DescriptorError("malformed descriptor: bad validity period")
        try:
            ed25519_verify(identity_pub, signature, LABEL_DESCRIPTOR + data[:body_len])
        except AuthFailure:
            raise DescriptorError(f"bad signature on descriptor of {nickname}") from None
        return cls(identity_pub=identity_pub, link_pub=link_pub, onion_pub=onion_pub, published=published,
                   expires=expires, flags=flags, nickname=nickname, addresses=addresses, version_min=vmin,
                   version_max=vmax, family=family, exit_policy=ExitPolicySummary(bool(default), tuple(ranges)),
                   reachability=reachability, signature=signature)

    def check_valid(self, wall: float, *, skew_s: float = 3600) -> None:
        if wall > self.expires:
            raise DescriptorError(f"descriptor of {self.nickname} ({self.id_hex[:8]}) expired")
        if self.published > wall + skew_s:
            raise DescriptorError(f"descriptor of {self.nickname} ({self.id_hex[:8]}) is from the future")
        if not any(v in SUPPORTED_VERSIONS for v in range(self.version_min, self.version_max + 1)):
            raise DescriptorError(f"relay {self.nickname} speaks no protocol version we support")

    def to_text(self) -> str:
        return base64.b64encode(self.encode()).decode()


def _encode_address(host: str, port: int) -> bytes:
    try:
        return encode_address(host, port)
    except EncodeError as exc:
        raise DescriptorError(str(exc)) from None


def encode_directory(descriptors: list[Descriptor]) -> str:
    lines = [DIRECTORY_HEADER] + [d.to_text() for d in descriptors]
    return "\n".join(lines) + "\n"


def decode_directory(text: str, wall: float) -> tuple[list[Descriptor], list[str]]:
    """Return (usable descriptors, problems).  Raises DescriptorError if the file is not a directory or
    holds no usable descriptor at all; otherwise individual bad entries are skipped and reported."""
    lines = [(n, ln.strip()) for n, ln in enumerate(text.splitlines(), start=1)
             if ln.strip() and not ln.strip().startswith("#")]
    if not lines or lines[0][1] != DIRECTORY_HEADER:
        raise DescriptorError(f"not a Shallot directory file (first line must be {DIRECTORY_HEADER!r})")
    good: list[Descriptor] = []
    problems: list[str] = []
    seen: set[bytes] = set()
    verdicts: dict[str, str] = {}  # a line met before: its problem again, without decoding it again (DoS: cheap)
    for n, line in lines[1:]:
        if line in verdicts:
            problems.append(f"line {n}: {verdicts[line]}")
            continue
        verdicts[line] = "not base64"
        try:
            raw = base64.b64decode(line, validate=True)
        except ValueError:
            problems.append(f"line {n}: not base64")
            continue
        try:
            desc = Descriptor.decode(raw)
            desc.check_valid(wall)
        except DescriptorError as exc:
            verdicts[line] = str(exc)
            problems.append(f"line {n}: {exc}")
            continue
        verdicts[line] = f"duplicate relay {desc.id_hex[:8]}"
        if desc.relay_id in seen:
            problems.append(f"line {n}: duplicate relay {desc.id_hex[:8]}")
            continue
        seen.add(desc.relay_id)
        good.append(desc)
    if not good:
        detail = "; ".join(problems[:3]) if problems else "it is empty"
        raise DescriptorError(f"directory has no usable relay: {detail}")
    return good, problems
