"""The introducer / relay-server role (core/nat/introducer.py, PROTOCOL §13.3-13.4): registrations on relay links,
introductions answered smaller than asked, relay sessions that forward only between their two ends."""

from __future__ import annotations

from collections import Counter

from shallot.core.link import Address, Link, LinkState, PeerKind
from shallot.core.nat.introducer import Introducer, RelaySession
from shallot.core.nat.limits import (
    INTRO_BURST,
    MAX_REGISTRATIONS,
    MAX_REGISTRATIONS_PER_SOURCE,
    MAX_SESSIONS,
    SESSION_IDLE_S,
)
from shallot.core.wire import nat_frames as nm
from shallot.core.wire.nat_frames import CMD_NAT_INTRODUCE
from shallot.relay.forwarder import relay_link_layer
from tests.simnet import SimNet, det_rng
from tests.unit.helpers_nat import keys, relay_stack

B_ID = bytes(range(20))
B_ADDR: Address = ("203.0.113.20", 41000)  # the registered relay, as its NAT maps it
A_ADDR: Address = ("198.51.100.30", 52000)  # a dialer


class Scene:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Address]] = []
        self.counters: Counter[str] = Counter()
        self.layer = relay_link_layer(keys(1), rng=det_rng(1), wall=1.8e9)
        self.intro = Introducer(self.layer, rng=det_rng(2), send=lambda d, a: self.sent.append((d, a)),
                                counters=self.counters)

    def relay_link(self, rid: bytes = B_ID, addr: Address = B_ADDR, link_id: int = 1) -> Link:
        # an authenticated relay link, up; without a session the cells we send it stay queued, for us to read
        return Link(link_id, addr, PeerKind.RELAY, initiator=False, peer_relay_id=rid, state=LinkState.UP)

    def request(self, src: Address = A_ADDR, request_id: bytes = bytes(8), now: float = 0.0) -> None:
        self.intro.on_intro_request(nm.IntroRequest(request_id, B_ID, 3, 2).encode(), src, now, 0.0)

    def answers(self) -> list[tuple[nm.IntroAnswer, Address]]:
        out = [(nm.IntroAnswer.decode(d), a) for d, a in self.sent]
        self.sent.clear()
        return out


def test_a_registration_is_a_relay_link_kept_alive_from_our_side_too() -> None:
    s = Scene()
    link = s.relay_link()
    s.intro.on_register(link)
    s.intro.on_register(link)  # again on the same link: nothing new
    assert s.intro.registrations == {B_ID: link} and link.users == 1 and s.counters["nat_registered"] == 1
    newer = s.relay_link(link_id=2)
    s.intro.on_register(newer)  # the relay came back on a new link
    assert s.intro.registrations[B_ID] is newer and s.counters["nat_registered"] == 2


def _addr(i: int) -> Address:
    return (f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 9000)


def test_registrations_are_bounded() -> None:
    s = Scene()
    for i in range(MAX_REGISTRATIONS + 3):  # one per address: a full table is refused, not churned
        s.intro.on_register(s.relay_link(i.to_bytes(20, "big"), _addr(i), link_id=i + 1))
    assert len(s.intro.registrations) == MAX_REGISTRATIONS
    assert s.counters["nat_drop_registrations_full"] == 3


def test_one_source_holds_at_most_its_quota_of_registrations() -> None:
    s = Scene()
    links = [s.relay_link(i.to_bytes(20, "big"), ("198.51.100.9", 9000 + i), link_id=i + 1)
             for i in range(MAX_REGISTRATIONS_PER_SOURCE + 2)]
    for link in links:  # ports differ, the source (the IPv4 address) is one
        s.intro.on_register(link)
    assert len(s.intro.registrations) == MAX_REGISTRATIONS_PER_SOURCE
    assert s.counters["nat_registration_source_evicted"] == 2
    assert [lk.users for lk in links[:3]] == [0, 0, 1]  # the oldest two went, and we let their links go


def test_a_full_table_evicts_from_the_heaviest_source_instead_of_refusing() -> None:
    s = Scene()
    heavy = [s.relay_link(i.to_bytes(20, "big"), ("198.51.100.9", 9000 + i), link_id=i + 1) for i in range(4)]
    for link in heavy:
        s.intro.on_register(link)
    for i in range(4, MAX_REGISTRATIONS):
        s.intro.on_register(s.relay_link(i.to_bytes(20, "big"), _addr(i), link_id=i + 1))
    newcomer = s.relay_link(b"N" * 20, ("192.0.2.77", 9000), link_id=5000)
    s.intro.on_register(newcomer)
    assert s.intro.registrations[b"N" * 20] is newcomer and len(s.intro.registrations) == MAX_REGISTRATIONS
    assert heavy[0].peer_relay_id not in s.intro.registrations  # the heaviest source's oldest
    assert s.counters["nat_registration_evicted"] == 1 and not s.counters["nat_drop_registrations_full"]


def test_only_relay_links_register() -> None:
    net = SimNet()
    relay, _, _ = relay_stack(net, 1, serve=True)
    client_link = Link(7, A_ADDR, PeerKind.CLIENT, initiator=False, state=LinkState.UP)
    relay.nat.control_cell(client_link, nm.register_cell(), net.now)
    assert relay.nat.introducer is not None and not relay.nat.introducer.registrations
    assert relay.nat.counters["nat_drop_unexpected_cell"] == 1


def test_introduction_tells_both_ends_and_reuses_the_session() -> None:
    s = Scene()
    s.request()
    (ans, to), = s.answers()
    assert to == A_ADDR and ans.status == nm.STATUS_UNKNOWN_TARGET and s.counters["nat_intro_unknown_target"] == 1
    link = s.relay_link()
    s.intro.on_register(link)
    s.request(request_id=b"\x01" * 8)
    (ans, to), = s.answers()
    assert (to, ans.status, ans.peer, ans.request_id) == (A_ADDR, nm.STATUS_OK, B_ADDR, b"\x01" * 8)
    cell = link.queued.popleft()
    assert cell[4] == CMD_NAT_INTRODUCE
    intro = nm.Introduce.decode(cell)
    assert (intro.requester, intro.token, intro.session, intro.mapping, intro.filtering) == (
        A_ADDR, b"\x01" * 8, ans.session, 3, 2)
    s.request(request_id=b"\x02" * 8)  # the same dialer again: the same session
    (again, _), = s.answers()
    assert again.session == ans.session and len(s.intro.sessions) == 1
    s.request(("198.51.100.31", 52000))  # another dialer: another session
    (other, _), = s.answers()
    assert other.session != ans.session and len(s.intro.sessions) == 2
    assert s.counters["nat_introduced"] == 3


def test_intro_requests_are_rate_limited_per_source() -> None:
    s = Scene()
    s.intro.on_register(s.relay_link())
    s.intro.on_intro_request(b"\x55" * 40, A_ADDR, 0.0, 0.0)
    assert s.counters["nat_drop_bad_intro"] == 1
    for _ in range(int(INTRO_BURST) + 5):
        s.request()
    assert len(s.answers()) == int(INTRO_BURST) and s.counters["nat_drop_intro_rate"] == 5


def _fill_sessions(s: Scene, link: Link) -> list[bytes]:
    """A full session table, as spoofed INTRO_REQUESTs from many addresses leave it (no traffic on any)."""
    sids = []
    for i in range(MAX_SESSIONS):
        s.request(_addr(i), now=i * 0.001)
        sids.append(s.answers()[0][0].session)
        s.intro._target_buckets = type(s.intro._target_buckets)(1e9, 1e9)  # only the table is tested here
    return sids


def test_a_full_session_table_evicts_a_never_used_session_instead_of_refusing() -> None:
    s = Scene()
    link = s.relay_link()
    s.intro.on_register(link)
    s.intro._target_buckets = type(s.intro._target_buckets)(1e9, 1e9)
    sids = _fill_sessions(s, link)
    used = sids[0]  # the oldest, but carrying a relayed link
    s.intro.forward(b"\x58" + used + b"\x54", used, _addr(0), 10.0)
    s.sent.clear()
    s.request(("198.51.100.99", 1), now=11.0)  # a new dialer is introduced, not refused
    (ans, _), = s.answers()
    assert ans.status == nm.STATUS_OK and len(s.intro.sessions) == MAX_SESSIONS
    assert used in s.intro.sessions and sids[1] not in s.intro.sessions  # the oldest unused went
    assert s.counters["nat_intro_session_evicted"] == 1


def test_when_every_session_carries_traffic_the_heaviest_source_loses_its_least_recently_used() -> None:
    s = Scene()
    link = s.relay_link()
    s.intro.on_register(link)
    s.intro.sessions.update({i.to_bytes(8, "big"): RelaySession(_addr(i), link, 5.0, forwarded=1)
                             for i in range(MAX_SESSIONS - 3)})
    for i in range(MAX_SESSIONS - 3):
        s.intro._by_source[_addr(i)[0]] = {i.to_bytes(8, "big"): None}
    s.intro._buckets = type(s.intro._buckets)(1e9, 1e9)
    for n in range(3):  # one source, three sessions (three ports), each used
        s.request(("192.0.2.50", 100 + n), request_id=bytes([n]) * 8, now=6.0 + n)
        sid = s.answers()[0][0].session
        s.intro.forward(b"\x58" + sid + b"\x54", sid, ("192.0.2.50", 100 + n), 7.0 + n)
        s.sent.clear()
    heavy = list(s.intro._by_source["192.0.2.50"])
    s.request(("198.51.100.99", 1), now=20.0)
    (ans, _), = s.answers()
    assert ans.status == nm.STATUS_OK and heavy[0] not in s.intro.sessions and heavy[1] in s.intro.sessions


def test_relayed_datagrams_go_only_between_the_two_ends_of_their_session() -> None:
    s = Scene()
    link = s.relay_link()
    s.intro.on_register(link)
    s.request()
    (ans, _), = s.answers()
    data = b"\x58" + ans.session + b"\x54" + bytes(40)
    s.intro.forward(data, ans.session, A_ADDR, 5.0)
    s.intro.forward(data, ans.session, B_ADDR, 6.0)
    assert s.sent == [(data, B_ADDR), (data, A_ADDR)]  # unchanged, to the other end
    s.intro.forward(data, ans.session, ("198.51.100.66", 1), 7.0)
    s.intro.forward(data, bytes(8), A_ADDR, 7.0)
    assert len(s.sent) == 2
    assert s.counters["nat_drop_relayed_wrong_source"] == 1 and s.counters["nat_drop_relayed_unknown_session"] == 1
    session = s.intro.sessions[ans.session]
    assert (session.forwarded, session.last, s.counters["nat_relayed"]) == (2, 6.0, 2)
    link.addr = ("203.0.113.20", 41999)  # the relay's NAT rebound; its link roamed
    s.intro.forward(data, ans.session, A_ADDR, 8.0)
    assert s.sent[-1] == (data, link.addr)


def test_idle_sessions_and_closed_links_are_forgotten() -> None:
    s = Scene()
    link = s.relay_link()
    s.intro.on_register(link)
    s.request(now=0.0)
    s.request(("198.51.100.31", 1), now=100.0)
    s.intro.expire(SESSION_IDLE_S + 1.0)
    assert len(s.intro.sessions) == 1  # the first one went idle
    link.state = LinkState.CLOSED
    s.intro.expire(SESSION_IDLE_S + 2.0)
    assert not s.intro.sessions and not s.intro.registrations
