"""``shallot netcheck``: can this machine reach a STUN server, and as what?  A diagnosis from fresh sockets
with aiostun (the product's NAT classification runs on the link socket instead: core/nat/classify.py).

For each of UDP, TCP and TLS it reports whether a Binding answer came back and the public address it
showed; two UDP requests from one socket to two servers also tell whether the mapping depends on the
destination.  It never contacts a server the user did not name."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
from typing import Any

import aiostun
from aiostun.attribute import AttributeStr

from shallot.core.wire import stun

log = logging.getLogger(__name__)
PROTOCOLS = (("udp", aiostun.UDP), ("tcp", aiostun.TCP), ("tls", aiostun.TLS))


async def _mapped(host: str, port: int, proto: int, timeout: float) -> dict[str, Any]:
    # aiostun prints unknown attributes to stdout: keep the user's terminal (and --json) clean
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            async with aiostun.Client(host=host, port=port, proto=proto, timeout=timeout) as client:
                got = await asyncio.wait_for(_padded_mapped_address(client), timeout)
        except Exception as exc:  # aiostun raises bare Exceptions, timeouts and OSErrors alike
            return {"ok": False, "error": str(exc) or type(exc).__name__}
    if not isinstance(got, dict) or "ip" not in got:
        return {"ok": False, "error": "no mapped address in the answer"}
    return {"ok": True, "public": [got["ip"], int(got["port"])]}


async def _padded_mapped_address(client: aiostun.Client) -> dict[str, Any]:
    """aiostun's get_mapped_address, with the request padded: a Shallot relay answers only requests at least as
    long as its answer (no amplification, docs/PROTOCOL.md §13.1); other servers ignore the private attribute."""
    resp = await client.bind_request(attrs=[AttributeStr(stun.ATTR_PADDING, bytes(stun.MAX_RESPONSE_LEN - 20))])
    if not resp:
        return {}
    for kind in (aiostun.attribute.AttrXorMappedAddr, aiostun.attribute.AttrMappedAddr):
        attr = resp.get_attribute(kind)
        if attr is not None:
            return dict(attr.params)
    return {}


async def run_netcheck(servers: list[tuple[str, int]], *, timeout: float = 2.0) -> dict[str, Any]:
    host, port = servers[0]
    result: dict[str, Any] = {"server": f"{host}:{port}"}
    for name, proto in PROTOCOLS:
        result[name] = await _mapped(host, port, proto, timeout)
    if len(servers) > 1:
        result["second_server"] = f"{servers[1][0]}:{servers[1][1]}"
        result["udp_second"] = await _mapped(*servers[1], aiostun.UDP, timeout)
    result["udp_works"] = result["udp"]["ok"]
    return result


def describe(result: dict[str, Any]) -> str:
    lines = [f"STUN server {result['server']}"]
    for name, _ in PROTOCOLS:
        r = result[name]
        lines.append(f"  {name.upper():4} " + (f"public address {r['public'][0]}:{r['public'][1]}" if r["ok"]
                                                 else f"no answer ({r['error']})"))
    if "udp_second" in result:
        r = result["udp_second"]
        lines.append(f"  UDP to {result['second_server']}: " + (f"public address {r['public'][0]}:{r['public'][1]}"
                                                                 if r["ok"] else f"no answer ({r['error']})"))
    lines.append("UDP gets through: Shallot can work here" if result["udp_works"]
                 else "UDP does not get through: Shallot cannot work on this network")
    return "\n".join(lines)
