"""The nftables rulesets Shallot loads as JSON (``nft -j -f -``): the client's kill switch and the exit's NAT
table.  Their structure is checked here; tests/netns checks what the kernel holds once they are loaded."""

from __future__ import annotations

import json
from typing import Any

from shallot.core.vpn.netconfig import NFT_TABLE, TUN_NAME, kill_switch_ruleset
from shallot.core.vpn.nftables import ACCEPT, DROP, MASQUERADE, match, meta, payload, prefix
from shallot.core.wire.ipconfig import POOL
from shallot.exit import tun as exit_tun


def _table(ruleset: dict[str, Any], family: str, name: str) -> dict[str, Any]:
    """The chains (with their rules) that the transaction leaves, after checking it replaces the table whole."""
    commands = ruleset["nftables"]
    ident = {"family": family, "name": name}
    # add (so the delete cannot fail), delete, add: one transaction, never a moment without the rules
    assert commands[:3] == [{"add": {"table": ident}}, {"delete": {"table": ident}}, {"add": {"table": ident}}]
    chains: dict[str, Any] = {}
    for command in commands[3:]:
        (verb, body), = command.items()
        assert verb == "add"
        (kind, spec), = body.items()
        assert spec["family"] == family and spec["table"] == name
        if kind == "chain":
            chains[spec["name"]] = {**spec, "rules": []}
        elif kind in ("set", "counter"):  # named objects the rules refer to
            chains.setdefault(f"{kind}s", {})[spec["name"]] = spec
        else:
            assert kind == "rule"
            chains[spec["chain"]]["rules"].append(spec["expr"])
    json.dumps(ruleset)  # what goes to nft as it is
    return chains


def test_the_kill_switch_lets_out_only_loopback_the_tunnel_and_the_guards() -> None:
    guards = [("192.0.2.21", 9001), ("198.51.100.5", 443)]
    chains = _table(kill_switch_ruleset(guards, kill_switch=True), "inet", NFT_TABLE)
    assert list(chains) == ["output"]
    output = chains["output"]
    assert (output["type"], output["hook"], output["prio"], output["policy"]) == ("filter", "output", 0, "drop")
    assert output["rules"] == [
        [match(meta("oifname"), "lo"), ACCEPT],
        [match(meta("oifname"), TUN_NAME), match(meta("nfproto"), "ipv4"), ACCEPT],
        [match(payload("ip", "daddr"), "192.0.2.21"), match(payload("udp", "dport"), 9001), ACCEPT],
        [match(payload("ip", "daddr"), "198.51.100.5"), match(payload("udp", "dport"), 443), ACCEPT],
    ]


def test_without_the_kill_switch_only_ipv6_is_dropped() -> None:
    chains = _table(kill_switch_ruleset([("192.0.2.21", 9001)], kill_switch=False), "inet", NFT_TABLE)
    output = chains["output"]
    assert output["policy"] == "accept"
    assert output["rules"] == [[match(meta("oifname"), "lo"), ACCEPT], [match(meta("nfproto"), "ipv6"), DROP]]


def test_the_exit_masquerades_its_pool_and_forwards_only_to_the_uplink() -> None:
    chains = _table(exit_tun.nat_ruleset("shallot-x42", "eth0"), "ip", exit_tun.NFT_TABLE)
    post, forward = chains["postrouting"], chains["forward"]
    assert (post["type"], post["hook"], post["prio"], post["policy"]) == ("nat", "postrouting", 100, "accept")
    assert post["rules"] == [[match(payload("ip", "saddr"), prefix(POOL)), match(meta("oifname"), "eth0"),
                              MASQUERADE]]
    assert prefix(POOL) == {"prefix": {"addr": "100.64.0.0", "len": 10}}
    assert (forward["type"], forward["hook"], forward["prio"], forward["policy"]) == ("filter", "forward", 0, "accept")
    tun, new = "shallot-x42", match({"ct": {"key": "state"}}, "new", "in")
    saddr = payload("ip", "saddr")
    assert forward["rules"] == [
        [match(meta("iifname"), tun), match(meta("oifname"), tun), DROP],  # client to client
        [match(meta("iifname"), tun), match(meta("oifname"), "eth0", "!="), DROP],  # anywhere else
        # into the TUN only the answers of flows a client opened: nothing from the LAN or the internet unasked
        [match(meta("oifname"), tun), match({"ct": {"key": "state"}}, ["established", "related"], "in"), ACCEPT],
        [match(meta("oifname"), tun), {"counter": "into_tun"}, DROP],
        # per tunnel address: at most 100 new connections a second (burst 300) and 512 conntrack entries
        [match(meta("iifname"), tun), new, {"set": {"op": "add", "elem": saddr, "set": "@new_flows", "stmt": [
            {"limit": {"rate": 100, "burst": 300, "per": "second", "inv": True}}]}}, {"counter": "new_flow_rate"},
         DROP],
        [match(meta("iifname"), tun), new, {"set": {"op": "add", "elem": saddr, "set": "@flows", "stmt": [
            {"ct count": {"val": 512, "inv": True}}]}}, {"counter": "flow_cap"}, DROP],
    ]
    assert set(chains["counters"]) == {"into_tun", "new_flow_rate", "flow_cap"}
    assert chains["sets"]["flows"]["size"] == chains["sets"]["new_flows"]["size"] == 65536
    assert chains["sets"]["new_flows"]["timeout"] == 60


def test_names_stay_data() -> None:
    """An interface name that would end a rule in nftables text is one JSON string here, nothing more."""
    evil = 'eth0" accept; flush ruleset; #'
    chains = _table(exit_tun.nat_ruleset("shallot-x1", evil), "ip", exit_tun.NFT_TABLE)  # no extra command
    assert chains["postrouting"]["rules"][0][1] == match(meta("oifname"), evil)
    assert chains["forward"]["rules"][1][1] == match(meta("oifname"), evil, "!=")
