"""How the client finds a guard's real egress (core/vpn/netlink.py Netlink.egress), on a made-up routing
table: the kernel's own answer first, and once Shallot's split routes answer "into the tunnel", the most
specific route that is not Shallot's.  tests/netns runs the same code against a real kernel."""

from __future__ import annotations

from typing import Any

from shallot.core.vpn.netlink import RT_TABLE_MAIN, RTN_UNICAST, Egress, Netlink

TUN, ETH, WLAN = 9, 2, 3
OURS = 147


class Msg(dict):
    """A pyroute2 message: header fields by key, attributes by get_attr."""

    def __init__(self, attrs: dict[str, Any], **fields: Any) -> None:
        super().__init__(fields)
        self.attrs = attrs

    def get_attr(self, name: str) -> Any:
        return self.attrs.get(name)


def route(dst: str, dst_len: int, *, oif: int | None = None, gateway: str | None = None, proto: int = 3,
          metric: int = 0, multipath: list[Msg] | None = None) -> Msg:
    attrs = {"RTA_TABLE": RT_TABLE_MAIN, "RTA_DST": dst if dst_len else None, "RTA_OIF": oif,
             "RTA_GATEWAY": gateway, "RTA_PRIORITY": metric or None, "RTA_MULTIPATH": multipath}
    return Msg(attrs, type=RTN_UNICAST, table=RT_TABLE_MAIN, dst_len=dst_len, proto=proto)


class FakeIPRoute:
    def __init__(self, routes: list[Msg], get: Msg | None) -> None:
        self._routes, self._get = routes, get

    def get_routes(self, family: int) -> list[Msg]:
        return self._routes

    def route(self, command: str, dst: str) -> list[Msg]:
        assert command == "get"
        return [self._get] if self._get is not None else []


TABLE = [
    route("0.0.0.0", 0, oif=WLAN, gateway="10.0.0.1", metric=600),
    route("0.0.0.0", 0, oif=ETH, gateway="192.168.1.1", metric=100),
    route("192.168.1.0", 24, oif=ETH),
    route("0.0.0.0", 1, oif=TUN, proto=OURS),
    route("128.0.0.0", 1, oif=TUN, proto=OURS),
    route("192.0.2.21", 32, oif=WLAN, gateway="10.0.0.1", proto=OURS),
]


def netlink(table: list[Msg], get: Msg | None) -> Netlink:
    return Netlink(FakeIPRoute(table, get))  # type: ignore[arg-type]  # duck-typed IPRoute


def egress(host: str, get: Msg | None) -> Egress | None:
    return netlink(TABLE, get).egress(host, ignore_proto=OURS, ignore_oif=TUN)


def test_the_kernels_answer_wins_when_it_is_not_the_tunnel() -> None:
    assert egress("198.51.100.5", route("198.51.100.5", 32, oif=WLAN, gateway="10.0.0.1")) == Egress("10.0.0.1", WLAN)


def test_past_the_split_routes_the_most_specific_route_that_is_not_ours() -> None:
    into_tunnel = route("198.51.100.5", 32, oif=TUN)
    assert egress("198.51.100.5", into_tunnel) == Egress("192.168.1.1", ETH)  # the default with the lower metric
    assert egress("192.168.1.40", into_tunnel) == Egress(None, ETH)  # a guard on the local network: on-link
    assert egress("192.0.2.21", None) == Egress("192.168.1.1", ETH)  # our own /32 to it does not count


def test_a_multipath_default_gives_its_first_hop() -> None:
    hops = [Msg({"RTA_GATEWAY": "172.16.0.1"}, oif=WLAN), Msg({"RTA_GATEWAY": "172.16.0.2"}, oif=ETH)]
    table = [route("0.0.0.0", 0, multipath=hops)]
    assert netlink(table, None).egress("203.0.113.9", ignore_proto=OURS) == Egress("172.16.0.1", WLAN)


def test_nothing_routes_it() -> None:
    only_ours = [route("0.0.0.0", 1, oif=TUN, proto=OURS)]
    assert netlink(only_ours, None).egress("8.8.8.8", ignore_proto=OURS, ignore_oif=TUN) is None
