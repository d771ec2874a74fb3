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
    assert forward["rules"] == [
        [match(meta("iifname"), "shallot-x42"), match(meta("oifname"), "shallot-x42"), DROP],  # client to client
        [match(meta("iifname"), "shallot-x42"), match(meta("oifname"), "eth0", "!="), DROP],  # anywhere else
    ]


def test_names_stay_data() -> None:
    """An interface name that would end a rule in nftables text is one JSON string here, nothing more."""
    evil = 'eth0" accept; flush ruleset; #'
    chains = _table(exit_tun.nat_ruleset("shallot-x1", evil), "ip", exit_tun.NFT_TABLE)  # no extra command
    assert chains["postrouting"]["rules"][0][1] == match(meta("oifname"), evil)
    assert chains["forward"]["rules"][1][1] == match(meta("oifname"), evil, "!=")
