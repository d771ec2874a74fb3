"""The ground floor of every codec: a byte reader for untrusted input, a writer, and the address format.

Every malformed input raises DecodeError and nothing else; a value that cannot be encoded raises
EncodeError.  ``Address`` is the one (host, port) type of the whole code base.
"""

from __future__ import annotations

import ipaddress

Address = tuple[str, int]
ADDRESS_LEN = 19  # family u8 | IP, zero-padded to 16 bytes | port u16 (docs/PROTOCOL.md §3.3)


class DecodeError(ValueError):
    """Input bytes do not form a valid message (truncated, extraneous or bad value)."""


class EncodeError(ValueError):
    """A value cannot be put on the wire (not an IP address, a port out of range, too long)."""


class Reader:
    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self._pos + n > len(self._data):
            raise DecodeError("truncated")
        out = self._data[self._pos:self._pos + n]
        self._pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def u64(self) -> int:
        return int.from_bytes(self.take(8), "big")

    @property
    def consumed(self) -> int:
        return self._pos

    def remaining(self) -> int:
        return len(self._data) - self._pos

    def end(self) -> None:
        if self._pos != len(self._data):
            raise DecodeError("extraneous bytes")


def encode_address(host: str, port: int) -> bytes:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise EncodeError(f"{host!r} is not an IP address") from None
    if not 0 < port < 65536:
        raise EncodeError(f"port {port} out of range")
    family = 4 if ip.version == 4 else 6
    return bytes([family]) + ip.packed.ljust(16, b"\x00") + port.to_bytes(2, "big")


def decode_address(r: Reader) -> Address:
    family = r.u8()
    raw = r.take(16)
    port = r.u16()
    if family == 4:
        if raw[4:] != bytes(12):
            raise DecodeError("bad IPv4 address padding")
        host = str(ipaddress.IPv4Address(raw[:4]))
    elif family == 6:
        host = str(ipaddress.IPv6Address(raw))
    else:
        raise DecodeError("bad address family")
    if port == 0:
        raise DecodeError("port 0")
    return host, port
