"""The link layer against one cheap attacker (review H4 (i), (ii), (v); docs/PROTOCOL.md §4.5, §4.12, §8.3):
cookies under load, no link before the first transport packet, bounded half-open handshakes, per-source and
per-aggregate link quotas that evict the heaviest source instead of refusing newcomers, handshake buckets per
IPv6 /64.  Each test shows the defence and the honest case one step inside it."""

from __future__ import annotations

from shallot.core.link import LinkLayer, LinkState, LinkUp
from shallot.crypto import link_handshake as lh
from shallot.crypto.keys import RelayKeys
from shallot.crypto.params import COOKIE_SECRET_S, HALF_OPEN_S, MSG_COOKIE_REPLY, MSG_INIT_CLIENT, MSG_RESPONSE
from tests.simnet import SimNet, det_rng
from tests.unit.helpers_links import client_layer, packets, relay_layer
from tests.unit.test_link_limits import WALL, answered, client_init, connect, first_packet, responder

R_ADDR = ("10.0.0.1", 9000)


def _relay(net: SimNet, **limits: float) -> tuple[LinkLayer, RelayKeys]:
    relay, rkeys = relay_layer(net, 1, R_ADDR)
    for name, value in limits.items():
        setattr(relay.config, name, value)
    return relay, rkeys


def _clients(net: SimNet, relay_keys: RelayKeys, addrs: list[tuple[str, int]], seed: int = 10) -> list:
    out = []
    for i, addr in enumerate(addrs):
        c = client_layer(net, seed + i, addr)
        out.append(c.open_link(R_ADDR, relay_keys.link_pub, net.now, net.wall))
    return out


# ---------------------------------------------------------------------------------------------- cookies (§4.12)


def test_under_load_an_initiation_without_mac2_gets_a_cookie_reply_and_costs_no_state() -> None:
    layer, keys = responder(cookie_load_rate=0)  # under load from the first initiation
    peer = RelayKeys.generate(det_rng(50), WALL)
    from tests.unit.test_link_limits import relay_init
    for packet in (client_init(keys, 1), relay_init(peer, keys, 1, timestamp_ns=int(WALL * 1e9))):
        layer.receive_datagram(packet, ("198.51.100.1", 4000), 10.0, WALL)
        (reply, dest), = layer.datagrams_to_send()
        # amplification: the reply is smaller than the initiation that caused it (at most 1.0)
        assert reply[0] == MSG_COOKIE_REPLY and dest == ("198.51.100.1", 4000)
        assert len(reply) / len(packet) <= 1.0
    assert lh.COOKIE_REPLY_LEN / lh.INIT_CLIENT_LEN <= 0.45 and lh.COOKIE_REPLY_LEN / lh.INIT_RELAY_LEN <= 0.2
    assert layer.counters["cookie_reply_sent"] == 2 and layer.counters["handshake_responded"] == 0
    assert layer.half_open_count == 0 and not layer.links and len(layer._seen_ephemerals) == 0


def test_every_unauthenticated_link_reply_is_smaller_than_its_request() -> None:
    table = lh.unauthenticated_replies()
    assert {(req, reply) for req, _, reply, _ in table} == {
        ("INIT_CLIENT", "RESPONSE"), ("INIT_RELAY", "RESPONSE"), ("INIT_CLIENT", "COOKIE_REPLY"),
        ("INIT_RELAY", "COOKIE_REPLY")}
    assert all(reply_len / req_len <= 1.0 for _, req_len, _, reply_len in table)
    assert max(reply_len / req_len for _, req_len, _, reply_len in table) == 57 / 110


def test_a_client_under_load_completes_its_link_through_one_cookie_round_trip() -> None:
    net = SimNet()
    relay, rkeys = _relay(net, cookie_load_rate=0)
    client = client_layer(net, 2)
    link = client.open_link(R_ADDR, rkeys.link_pub, net.now, net.wall)
    net.run()
    assert link.state is LinkState.UP and link.cookie is not None
    assert client.counters["cookie_received"] == 1 and client.counters["handshake_sent"] == 2
    assert relay.counters["cookie_reply_sent"] == 1 and relay.counters["handshake_responded"] == 1
    assert relay.counters["link_promoted"] == 1 and len(relay.links) == 1
    inits = packets(net, ("192.0.2.20", 4444), R_ADDR, MSG_INIT_CLIENT)
    assert inits[0][-16:] == lh.NO_MAC2 and inits[1][-16:] != lh.NO_MAC2


def test_a_responder_that_answers_every_initiation_with_a_cookie_gets_at_most_the_attempts() -> None:
    """A relay (or whoever saw our initiations) can send cookie replies forever: each makes an immediate
    retry only while attempts remain, then the handshake times out as any unanswered one."""
    from shallot.crypto.params import HANDSHAKE_ATTEMPTS
    net = SimNet()
    relay, rkeys = _relay(net, cookie_load_rate=0)
    # whoever is on the path strips every mac2: the relay under load answers each initiation with a cookie
    net.tap = lambda src, dst, data: data[:-16] + lh.NO_MAC2 if data[0] == MSG_INIT_CLIENT else data
    client = client_layer(net, 2)
    link = client.open_link(R_ADDR, rkeys.link_pub, net.now, net.wall)
    net.run()
    assert client.counters["handshake_sent"] == HANDSHAKE_ATTEMPTS and link.state is LinkState.CONNECTING
    assert client.counters["cookie_received"] == HANDSHAKE_ATTEMPTS
    for _ in range(40):
        net.advance(1.0)
    assert link.state is LinkState.CLOSED and client.counters["handshake_sent"] == HANDSHAKE_ATTEMPTS
    assert relay.counters["cookie_reply_sent"] == HANDSHAKE_ATTEMPTS and relay.counters["handshake_responded"] == 0


def test_a_cookie_is_bound_to_the_source_address_and_port() -> None:
    layer, keys = responder(cookie_load_rate=0)
    state, packet = lh.client_initiation(responder_link_pub=keys.link_pub, sender_index=7, rng=det_rng(70))
    layer.receive_datagram(packet, ("198.51.100.1", 4000), 10.0, WALL)
    (reply, _), = layer.datagrams_to_send()
    cookie = lh.read_cookie_reply(responder_link_pub=keys.link_pub, state=state, packet=reply)
    _s, again = lh.client_initiation(responder_link_pub=keys.link_pub, sender_index=8, rng=det_rng(71), cookie=cookie)
    for addr in (("198.51.100.2", 4000), ("198.51.100.1", 4001)):  # a spoofer elsewhere cannot use it
        layer.receive_datagram(again, addr, 10.0, WALL)
        assert [d[0] for d, _ in layer.datagrams_to_send()] == [MSG_COOKIE_REPLY]
    layer.receive_datagram(again, ("198.51.100.1", 4000), 10.0, WALL)
    assert answered(layer) == 1 and layer.counters["cookie_reply_sent"] == 3


def test_the_cookie_secret_rotates_and_the_previous_one_is_still_good_for_one_period() -> None:
    layer, keys = responder(cookie_load_rate=0)
    src = ("198.51.100.1", 4000)
    state, packet = lh.client_initiation(responder_link_pub=keys.link_pub, sender_index=7, rng=det_rng(70))
    layer.receive_datagram(packet, src, 10.0, WALL)
    (reply, _), = layer.datagrams_to_send()
    cookie = lh.read_cookie_reply(responder_link_pub=keys.link_pub, state=state, packet=reply)

    def with_cookie(i: int, now: float) -> int:
        _s, p = lh.client_initiation(responder_link_pub=keys.link_pub, sender_index=100 + i, rng=det_rng(700 + i),
                                     cookie=cookie)
        layer.receive_datagram(p, src, now, WALL)
        return answered(layer)

    assert with_cookie(1, 10.0 + COOKIE_SECRET_S + 1) == 1  # one rotation: the previous secret still counts
    assert with_cookie(2, 10.0 + 2 * COOKIE_SECRET_S + 2) == 0  # two rotations: a new cookie is needed
    assert layer.counters["cookie_reply_sent"] == 2


def test_load_is_the_initiation_rate_of_this_or_the_last_second_or_a_half_full_half_open_table() -> None:
    layer, keys = responder(cookie_load_rate=3, max_half_open=100)
    kinds = []
    for i, now in enumerate((10.0, 10.1, 10.2, 10.3, 11.5, 13.0)):
        layer.receive_datagram(client_init(keys, i), (f"198.51.100.{i}", 1), now, WALL)
        kinds += [d[0] for d, _ in layer.datagrams_to_send()]
    # 3 per second pass; the 4th in that second and anything in the next second get cookies; quiet, it ends
    assert kinds == [MSG_RESPONSE] * 3 + [MSG_COOKIE_REPLY] * 2 + [MSG_RESPONSE]
    layer, keys = responder(max_half_open=4)
    for i in range(3):
        layer.receive_datagram(client_init(keys, i), (f"198.51.100.{i}", 1), 10.0 + i, WALL)
    assert answered(layer) == 2 and layer.counters["cookie_reply_sent"] == 1  # 2 of 4 half-open: under load


def test_under_load_each_source_gets_dh_work_from_a_slower_bucket_and_another_source_still_gets_in() -> None:
    """Cookies do not stop sources that can receive (many addresses of one attacker): under load each source's
    handshakes also spend from ``loaded_handshake_rate`` / ``loaded_handshake_burst``, so they cannot take the
    CPU the data path needs, and a quiet source keeps its own share."""
    layer, keys = responder(cookie_load_rate=0, loaded_handshake_rate=0.001, loaded_handshake_burst=3.0)
    src = ("198.51.100.1", 4000)
    state, packet = lh.client_initiation(responder_link_pub=keys.link_pub, sender_index=7, rng=det_rng(70))
    layer.receive_datagram(packet, src, 10.0, WALL)
    (reply, _), = layer.datagrams_to_send()
    cookie = lh.read_cookie_reply(responder_link_pub=keys.link_pub, state=state, packet=reply)
    results = []
    for i in range(5):  # valid mac2 each time: only the slower bucket can refuse these
        _s, p = lh.client_initiation(responder_link_pub=keys.link_pub, sender_index=100 + i, rng=det_rng(700 + i),
                                     cookie=cookie)
        layer.receive_datagram(p, src, 10.0 + i * 0.01, WALL)
        results.append(answered(layer))
    assert results == [1, 1, 1, 0, 0]
    assert layer.counters["drop_handshake_rate_loaded"] == 2 and layer.counters["drop_handshake_rate"] == 0
    other = ("198.51.100.2", 4000)  # another source under the same load: its own bucket
    state, packet = lh.client_initiation(responder_link_pub=keys.link_pub, sender_index=9, rng=det_rng(90))
    layer.receive_datagram(packet, other, 10.1, WALL)
    (reply, _), = layer.datagrams_to_send()
    cookie = lh.read_cookie_reply(responder_link_pub=keys.link_pub, state=state, packet=reply)
    _s, p = lh.client_initiation(responder_link_pub=keys.link_pub, sender_index=200, rng=det_rng(900), cookie=cookie)
    layer.receive_datagram(p, other, 10.1, WALL)
    assert answered(layer) == 1
    # not under load: the slower bucket is not spent (the normal one is: 20/s, burst 40)
    calm, keys = responder(loaded_handshake_rate=0.001, loaded_handshake_burst=1.0)
    for i in range(4):
        calm.receive_datagram(client_init(keys, i), src, 10.0, WALL)
    assert answered(calm) == 4 and calm.counters["drop_handshake_rate_loaded"] == 0


# ---------------------------------------------------------------------------------------------- half-open (§4.5)


def test_no_link_exists_before_the_first_authenticated_transport_packet() -> None:
    layer, keys = responder()
    state, packet = lh.client_initiation(responder_link_pub=keys.link_pub, sender_index=7, rng=det_rng(70))
    src = ("198.51.100.1", 4000)
    layer.receive_datagram(packet, src, 10.0, WALL)
    (response, _), = layer.datagrams_to_send()
    assert not layer.links and not layer.events and layer.half_open_count == 1
    first = first_packet(state, response)
    layer.receive_datagram(first[:-1] + bytes([first[-1] ^ 1]), src, 10.1, WALL)  # a forged first packet
    assert not layer.links and layer.counters["drop_bad_tag"] == 1 and layer.half_open_count == 1
    layer.receive_datagram(first, src, 10.2, WALL)
    (link,) = layer.links.values()
    assert [type(e) for e in layer.events] == [LinkUp] and link.state is LinkState.UP and link.addr == src
    assert layer.half_open_count == 0 and layer.counters["link_promoted"] == 1


def test_a_half_open_handshake_is_forgotten_after_half_open_s() -> None:
    layer, keys = responder()
    state, packet = lh.client_initiation(responder_link_pub=keys.link_pub, sender_index=7, rng=det_rng(70))
    layer.receive_datagram(packet, ("198.51.100.1", 4000), 10.0, WALL)
    (response, _), = layer.datagrams_to_send()
    assert layer.timer() is not None and layer.timer() <= 10.0 + HALF_OPEN_S
    layer.handle_timer(10.0 + HALF_OPEN_S, WALL)
    assert layer.half_open_count == 0 and layer.counters["half_open_expired"] == 1
    layer.receive_datagram(first_packet(state, response), ("198.51.100.1", 4000), 10.0 + HALF_OPEN_S, WALL)
    assert not layer.links and layer.counters["drop_unknown_index"] == 1


def test_a_first_packet_after_half_open_s_makes_no_link_even_before_the_timer_ran() -> None:
    layer, keys = responder()
    state, packet = lh.client_initiation(responder_link_pub=keys.link_pub, sender_index=7, rng=det_rng(70))
    layer.receive_datagram(packet, ("198.51.100.1", 4000), 10.0, WALL)
    (response, _), = layer.datagrams_to_send()
    layer.receive_datagram(first_packet(state, response), ("198.51.100.1", 4000), 10.0 + HALF_OPEN_S, WALL)
    assert not layer.links and layer.counters["half_open_expired"] == 1 and layer.half_open_count == 0


def test_half_open_entries_are_bounded_per_source_per_aggregate_and_in_all() -> None:
    layer, keys = responder(max_half_open_per_source=2, max_half_open_per_aggregate=3, max_half_open=1000)
    for i in range(3):  # one source: its oldest goes
        layer.receive_datagram(client_init(keys, i), ("198.51.100.1", 1000 + i), 10.0, WALL)
    assert answered(layer) == 3 and layer.half_open_count == 2
    assert layer.counters["half_open_source_evicted"] == 1
    for i in range(3, 5):  # the same /24: the aggregate's oldest goes
        layer.receive_datagram(client_init(keys, i), (f"198.51.100.{i}", 1000), 10.0, WALL)
    assert layer.half_open_count == 3 and layer.counters["half_open_aggregate_evicted"] == 1
    layer, keys = responder(max_half_open=2, cookie_load_rate=10**6)
    for i in range(2):
        layer.receive_datagram(client_init(keys, i), (f"198.51.{i}.1", 1000), 10.0, WALL)
    assert answered(layer) == 1 and layer.counters["cookie_reply_sent"] == 1  # half full: under load


def test_a_full_half_open_table_evicts_its_oldest_entry_and_the_honest_client_gets_in() -> None:
    """Attackers on six /24s pass the cookie check (they can receive) and never send a transport packet: the
    table of 4 keeps the newest and the honest client, arriving last, still gets its link."""
    net = SimNet()
    relay, rkeys = _relay(net, max_half_open=4)
    attackers = [(f"198.51.{i}.1", 1000) for i in range(6)]
    net.tap = lambda src, dst, data: None if src in attackers and data[0] == 0x54 else data
    _clients(net, rkeys, attackers)
    net.run()
    assert relay.half_open_count == 4 and relay.counters["half_open_evicted"] == 2 and not relay.links
    assert relay.counters["cookie_reply_sent"] >= 4  # half full from the third on: under load
    honest = _clients(net, rkeys, [("192.0.2.50", 5000)], seed=900)
    net.run()
    assert honest[0].state is LinkState.UP and len(relay.links) == 1 and relay.counters["half_open_evicted"] == 3


# ---------------------------------------------------------------------------------------------- quotas (§8.3)


def test_links_per_source_a_full_source_loses_its_oldest_idle_link_and_is_refused_when_all_are_busy() -> None:
    layer, keys = responder(max_links_per_source=2)
    src = "198.51.100.1"
    assert connect(layer, keys, 0, (src, 1), 10.0) and connect(layer, keys, 1, (src, 2), 11.0)
    first, second = layer.links.values()
    assert connect(layer, keys, 2, (src, 3), 12.0)
    assert first.state is LinkState.CLOSED and second.state is LinkState.UP and len(layer.links) == 2
    assert layer.counters["link_source_evicted"] == 1
    for link in layer.links.values():
        link.users = 1  # both carry circuits
    assert not connect(layer, keys, 3, (src, 4), 13.0)
    assert layer.counters["drop_link_quota"] == 1 and len(layer.links) == 2
    assert connect(layer, keys, 4, ("198.51.100.2", 1), 14.0)  # another source is not affected


def test_links_per_aggregate_the_heaviest_source_of_the_slash_24_gives_way() -> None:
    layer, keys = responder(max_links_per_aggregate=3)
    for i, addr in enumerate((("198.51.100.1", 1), ("198.51.100.1", 2), ("198.51.100.2", 1))):
        assert connect(layer, keys, i, addr, 10.0 + i)
    heavy_old, heavy_new, light = layer.links.values()
    assert connect(layer, keys, 3, ("198.51.100.3", 1), 20.0)
    assert heavy_old.state is LinkState.CLOSED and heavy_new.state is LinkState.UP and light.state is LinkState.UP
    assert layer.counters["link_aggregate_evicted"] == 1


def test_an_aggregate_whose_links_are_all_delivering_right_now_refuses_the_newcomer() -> None:
    layer, keys = responder(max_links_per_aggregate=2)
    assert connect(layer, keys, 0, ("198.51.100.1", 1), 10.0) and connect(layer, keys, 1, ("198.51.100.1", 2), 10.0)
    assert not connect(layer, keys, 2, ("198.51.100.2", 1), 10.0)  # both links received at this instant
    assert layer.counters["drop_link_quota"] == 1 and len(layer.links) == 2
    assert connect(layer, keys, 3, ("198.51.100.2", 1), 10.5)  # a moment later one of them gives way
    assert layer.counters["link_aggregate_evicted"] == 1


def test_ipv6_sources_count_by_slash_64_for_links_and_handshake_tokens() -> None:
    layer, keys = responder(max_links_per_source=2, handshake_rate=0.001, handshake_burst=3)
    for i in range(3):  # three addresses of one /64
        assert connect(layer, keys, i, (f"2001:db8:0:1::{i + 1}", 1), 10.0 + i)
    assert layer.counters["link_source_evicted"] == 1 and len(layer.links) == 2
    layer.receive_datagram(client_init(keys, 10), ("2001:db8:0:1::99", 1), 20.0, WALL)
    assert answered(layer) == 0 and layer.counters["drop_handshake_rate"] == 1  # tokens: the /64's, spent
    layer.receive_datagram(client_init(keys, 11), ("2001:db8:0:2::1", 1), 20.0, WALL)
    assert answered(layer) == 1  # the next /64 is another source


def test_a_flood_from_many_sources_cannot_keep_an_honest_client_out() -> None:
    """20 attacker addresses hold every slot of a 40-link table; an honest newcomer still gets a link, and
    the link that goes is one of the heaviest attacker source's."""
    net = SimNet()
    relay, rkeys = _relay(net, max_links=40)
    attackers = [(f"203.0.{113 + i // 10}.{i % 10 + 1}", 7000 + j) for i in range(20) for j in range(2)]
    links = _clients(net, rkeys, attackers)
    net.run()
    net.advance(1.0)
    attackers.append(("203.0.113.1", 7999))  # one source a little heavier than the rest (evicts one of its own)
    links += _clients(net, rkeys, attackers[-1:], seed=800)
    net.run()
    assert len(relay.links) == 40 and relay.counters["link_table_evicted"] == 1
    for link in relay.links.values():
        link.users = 1  # every attacker link carries a circuit
    net.advance(1.0)
    honest = _clients(net, rkeys, [("192.0.2.50", 5000)], seed=900)
    net.run()
    assert honest[0].state is LinkState.UP and len(relay.links) == 40
    assert relay.counters["link_table_evicted"] == 2
    closed = [a for a, link in zip(attackers, links) if link.state is LinkState.CLOSED or all(
        r.addr != a for r in relay.links.values())]
    assert closed and all(a[0] == "203.0.113.1" for a in closed)


def test_our_own_dial_into_a_full_table_evicts_an_accepted_link_but_never_the_one_asking() -> None:
    net = SimNet()
    relay, rkeys = _relay(net, max_links=2)
    _clients(net, rkeys, [("198.51.100.1", 1), ("198.51.100.1", 2)])
    net.run()
    assert len(relay.links) == 2
    other = RelayKeys.generate(det_rng(77), net.wall)
    net.advance(1.0)
    relay.open_link(("10.0.0.9", 9000), other.link_pub, net.now, net.wall)
    assert len(relay.links) == 2 and relay.counters["link_table_evicted"] == 1


def test_the_victim_is_idle_before_busy_and_a_client_before_a_relay() -> None:
    from shallot.core.link import Link, PeerKind
    idle_relay, busy_client, busy_relay = (Link(i, ("198.51.100.1", i), kind, False) for i, kind in (
        (1, PeerKind.RELAY), (2, PeerKind.CLIENT), (3, PeerKind.RELAY)))
    busy_client.users = busy_relay.users = 1
    links = dict.fromkeys([busy_relay, busy_client, idle_relay])
    assert LinkLayer._victim(links, 10.0, idle_only=False) is idle_relay
    del links[idle_relay]
    assert LinkLayer._victim(links, 10.0, idle_only=False) is busy_client
    assert LinkLayer._victim(links, 10.0, idle_only=True) is None
    busy_client.last_recv = 10.0  # it is delivering a packet right now
    assert LinkLayer._victim(links, 10.0, idle_only=False) is busy_relay


def test_every_ephemeral_is_remembered_for_the_whole_lifetime_whatever_bucket_it_fell_in() -> None:
    from shallot.core.link.limits import EphemeralCache
    cache = EphemeralCache(240.0, 1000)  # 16 buckets of 15 s
    assert cache.check_and_add(b"first", 0.0)
    assert cache.check_and_add(b"later", 200.0)  # a bucket of its own, not the one opened at 0
    assert not cache.check_and_add(b"later", 256.0)  # the bucket opened at 0 is gone by now; this one is not
    assert cache.check_and_add(b"first", 256.0) and len(cache) == 2
    assert cache.check_and_add(b"later", 200.0 + 15.0 + 240.0)  # and it, too, ages out


def test_sources_and_aggregates() -> None:
    from shallot.core.wire.addresses import aggregate_key, source_key
    assert [source_key(h) for h in ("198.51.100.7", "2001:db8:1:2:3::4", "::ffff:198.51.100.7")] == [
        "198.51.100.7", "2001:db8:1:2::/64", "198.51.100.7"]
    assert [aggregate_key(h) for h in ("198.51.100.7", "2001:db8:1:2:3::4", "::ffff:198.51.100.7")] == [
        "198.51.100.0/24", "2001:db8:1::/48", "198.51.100.0/24"]
    assert aggregate_key("127.0.0.5") == "127.0.0.5" and aggregate_key("::1") == "::1"
