"""The ``shallot`` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from shallot import __version__
from shallot.core.errors import ShallotError

if TYPE_CHECKING:  # each command imports what it runs when it runs (a fast start for the others)
    from shallot.core.control.api import EngineConfig, Request, Role
    from shallot.core.discovery.service import Seed

DESCRIPTION = """Shallot: an onion-routed VPN over UDP.

Circuits go guard -> middle -> exit and are built in one round trip; relays forward
fixed-size cells they cannot read.  Start with 'shallot demo' to see it work on one machine."""


PRIVATE_NETWORK_HELP = ("accept relays at loopback and private addresses (10/8, 172.16/12, 192.168/16, "
                        "100.64/10, fc00::/7): a test or private network; off, such relays are refused")
SEED_HELP = ("ID@HOST:PORT pins the seed's relay id (40 hex digits, the id the relay prints); a plain HOST:PORT "
             "works but is not pinned (whoever answers there is believed)")
OWN_RELAY_HELP = ("this machine's relay state directory (the relay runs in its own process): it is never "
                  "used in this client's circuits")


def _own_ids(args: argparse.Namespace) -> tuple[bytes, ...]:
    from shallot.relay.state import read_descriptor
    return (read_descriptor(args.own_relay).relay_id,) if getattr(args, "own_relay", None) else ()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shallot", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"shallot {__version__} (protocol 1)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_keygen, _add_directory, _add_relay_and_exit, _add_probe, _add_paths, _add_demo, _add_engine,
                _add_connect, _add_helper, _add_netcheck, _add_app, _add_status_and_peers):
        add(sub)
    return p


Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _add_keygen(sub: Subparsers) -> None:
    k = sub.add_parser("keygen", help="create a relay's keys and signed descriptor",
                       description="Create DIR (mode 0700) with a new relay identity (0600) and a signed "
                                   "descriptor for ADDRESS.  Prints the relay id.")
    k.add_argument("--state", required=True, type=Path, metavar="DIR", help="state directory to create")
    k.add_argument("--address", required=True, metavar="HOST:PORT", help="IP address and UDP port relays and "
                                                                          "clients will reach this relay at")
    k.add_argument("--nickname", metavar="NAME", help="1-32 characters of A-Z a-z 0-9 _ -")
    k.add_argument("--exit", action="store_true", help="make this relay an exit")


def _add_directory(sub: Subparsers) -> None:
    d = sub.add_parser("directory", help="bundle relays' descriptors into a directory file",
                       description="Write the signed descriptors of the given state directories into FILE.")
    d.add_argument("--out", required=True, type=Path, metavar="FILE", help="directory file to write")
    d.add_argument("states", nargs="+", type=Path, metavar="DIR", help="relay state directories")


def _ip_address(text: str) -> str:
    import ipaddress
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP address: {text!r}") from None


def _add_relay_and_exit(sub: Subparsers) -> None:
    for name, text in (("relay", "run relay-server mode (exit-node mode if keygen had --exit)"),
                       ("exit", "run exit-node mode (the state must have been created with --exit)")):
        r = sub.add_parser(name, help=text, description=text + ".  SIGTERM or SIGINT stop it cleanly.")
        r.add_argument("--state", required=True, type=Path, metavar="DIR", help="state directory made by keygen")
        r.add_argument("--bootstrap", metavar="[ID@]HOST:PORT[,...]",
                       help="join the discovery DHT through these seed relays (their relay addresses; a relay's "
                            "DHT listens on its port + 1) and publish this relay's descriptor there; " + SEED_HELP)
        r.add_argument("--private-network", action="store_true", help=PRIVATE_NETWORK_HELP)
        r.add_argument("--dht", action="store_true",
                       help="serve the discovery DHT even without --bootstrap (the first seed of a network)")
        r.add_argument("--introducers", type=Path, metavar="FILE",
                       help="this relay is behind a NAT: a directory file of public relays to classify the NAT "
                            "with (the first two) and to register with as introducers (up to two)")
        r.add_argument("--directory", type=Path, metavar="FILE",
                       help="a directory file of the network's relays: this relay's view when it runs no DHT "
                            "(an exit ends circuits only for previous hops that are relays in its view; "
                            "re-read when it changes)")
        r.add_argument("--max-circuits", type=int, default=20000, metavar="N",
                       help="size of the circuit table (default 20000; full, it evicts the idlest circuit of "
                            "the heaviest source, docs/PROTOCOL.md §8.2)")
        r.add_argument("--stun-alt-port", action="store_true",
                       help="also answer STUN on PORT+2, the alternate port of RFC 5780 filtering tests "
                            "(public relays that serve as introducers should)")
        if name == "exit":
            r.add_argument("--ip", action="store_true",
                           help="also carry clients' IP packets to the internet: creates a TUN device and an "
                                "nftables NAT table (needs root); without it the exit offers echo and discard")
            r.add_argument("--uplink", metavar="IFACE", help="with --ip: interface to the internet (default: "
                                                               "the one of the default route)")
            r.add_argument("--policy", type=Path, metavar="FILE", help="with --ip: exit policy rules file")
            r.add_argument("--resolver", metavar="ADDRESS", help="with --ip: DNS resolver the exit forwards clients' "
                                                                "queries to (default: the first nameserver of "
                                                                "/etc/resolv.conf not on this host, never a local "
                                                                "stub such as 127.0.0.53)")
            r.add_argument("--public-ip", action="append", default=[], type=_ip_address, metavar="ADDRESS",
                           help="with --ip: a public address of this exit that no interface holds (a 1:1 NAT); "
                                "clients may not reach it (repeatable)")


def _add_probe(sub: Subparsers) -> None:
    pr = sub.add_parser("probe", help="build a circuit and send datagrams to the exit's echo service",
                        description="Build a guard -> middle -> exit circuit from the directory and send N "
                                    "datagrams through it to the exit's echo service.")
    src = pr.add_mutually_exclusive_group(required=True)
    src.add_argument("--directory", type=Path, metavar="FILE",
                     help="directory file of signed relay descriptors (made by 'shallot directory')")
    src.add_argument("--bootstrap", metavar="[ID@]HOST:PORT[,...]",
                     help="discover the whole network through the DHT from these seed relays instead; " + SEED_HELP)
    pr.add_argument("--private-network", action="store_true", help=PRIVATE_NETWORK_HELP)
    pr.add_argument("--cache", type=Path, metavar="FILE", help="with --bootstrap: the network view cache "
                                                               "(default ~/.cache/shallot/network-view)")
    pr.add_argument("--own-relay", type=Path, metavar="DIR", help=OWN_RELAY_HELP)
    pr.add_argument("--path", metavar="ID,ID,ID", help="guard,middle,exit (ids, id prefixes or nicknames)")
    pr.add_argument("--exit", metavar="ID", help="use this exit")
    pr.add_argument("--count", type=int, default=10, metavar="N", help="datagrams to send (default 10)")
    pr.add_argument("--size", type=int, default=256, metavar="BYTES", help="datagram size (default 256)")
    pr.add_argument("--json", action="store_true", help="print one JSON object")


def _add_paths(sub: Subparsers) -> None:
    pa = sub.add_parser("paths", help="sample paths as a fresh client would and show their concentration",
                        description="Sample N paths exactly as a fresh client would choose them now (same caps "
                                    "and weights) and print how often each relay, IP address, /16 and mutual "
                                    "family lands in each position, and the share of paths whose guard and exit "
                                    "look like one operator (same IP, same /16 or mutual family).")
    src = pa.add_mutually_exclusive_group(required=True)
    src.add_argument("--directory", type=Path, metavar="FILE", help="directory file of signed relay descriptors")
    src.add_argument("--bootstrap", metavar="[ID@]HOST:PORT[,...]", help="crawl the DHT from these seed relays")
    pa.add_argument("--private-network", action="store_true", help=PRIVATE_NETWORK_HELP)
    pa.add_argument("--sample", type=int, required=True, metavar="N", help="paths to sample (1..1000000)")
    pa.add_argument("--cache", type=Path, metavar="FILE",
                    help="with --bootstrap: start from this view cache and its first-seen history, as this "
                         "client would (default: none, as a fresh client)")
    pa.add_argument("--own-relay", type=Path, metavar="DIR", help=OWN_RELAY_HELP)
    pa.add_argument("--seed", type=int, metavar="INT", help="seed the draws (reproducible audits)")
    pa.add_argument("--colluding", metavar="CIDR[,...]",
                    help="treat the relays in these networks as one adversary and also report the share of "
                         "paths whose guard and exit are both inside them")
    pa.add_argument("--json", action="store_true", help="print one JSON object")


def _add_demo(sub: Subparsers) -> None:
    dm = sub.add_parser("demo", help="run a local network of relays on 127.0.0.1 and probe through it",
                        description="Start 6 relays (2 exits) on 127.0.0.1 in child processes, build a circuit, "
                                    "send datagrams through it, print a summary and stop everything.")
    dm.add_argument("--json", action="store_true", help="print one JSON object (the probe's)")
    dm.add_argument("--count", type=int, default=10, metavar="N")
    dm.add_argument("--relays", type=int, default=6, metavar="N")
    dm.add_argument("--exits", type=int, default=2, metavar="N")


def _add_socket(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", type=Path, metavar="PATH", help="control socket (default: $XDG_RUNTIME_DIR)")


def _add_cache_and_own_relay(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", type=Path, metavar="FILE", help="with --bootstrap: the network view cache")
    p.add_argument("--private-network", action="store_true", help=PRIVATE_NETWORK_HELP)
    p.add_argument("--own-relay", type=Path, metavar="DIR", help=OWN_RELAY_HELP)


def _add_engine(sub: Subparsers) -> None:
    e = sub.add_parser("engine", help="run the client engine and serve its control API",
                       description="Run the client engine (links, crypto, circuits) in this process on its own "
                                   "event loop and serve the control API on a 0600 Unix socket.")
    _add_socket(e)
    e.add_argument("--directory", type=Path, metavar="FILE", help="directory file to use")
    e.add_argument("--vpn", action="store_true", help="route the system through the circuit when connected "
                   "(as an ordinary user: through the privileged helper, see docs/PRIVILEGES.md)")
    e.add_argument("--no-kill-switch", action="store_true", help="with --vpn: do not block traffic outside the tunnel")
    e.add_argument("--no-dns", action="store_true", help="with --vpn: leave the system's DNS settings alone")
    e.add_argument("--helper-fd", type=int, metavar="FD", help=argparse.SUPPRESS)
    e.add_argument("--bootstrap", metavar="[ID@]HOST:PORT[,...]",
                   help="discover relays through the DHT from these seeds instead of a directory file; " + SEED_HELP)
    _add_cache_and_own_relay(e)


def _add_connect(sub: Subparsers) -> None:
    c = sub.add_parser("connect", help="connect this machine through a circuit (VPN)",
                       description="Build an IP circuit, create TUN shallot0 and route all IPv4 through it, "
                                   "with a kill switch (nftables) that lets nothing else out while connected or "
                                   "reconnecting, and DNS through the exit.  As an ordinary user the privileged "
                                   "part goes through the helper (pkexec; docs/PRIVILEGES.md).  Serves the control "
                                   "API like 'shallot engine'.  SIGINT/SIGTERM restore routes, firewall and DNS; "
                                   "a crash or kill -9 leaves the kill switch on (nothing leaks) until a "
                                   "disconnect, the next connect or --cleanup.")
    c.add_argument("--directory", type=Path, metavar="FILE", help="directory file")
    c.add_argument("--bootstrap", metavar="[ID@]HOST:PORT[,...]",
                   help="discover relays through the DHT instead; " + SEED_HELP)
    _add_cache_and_own_relay(c)
    c.add_argument("--exit", metavar="ID", help="use this exit")
    c.add_argument("--path", metavar="ID,ID,ID", help="guard,middle,exit")
    c.add_argument("--no-kill-switch", action="store_true", help="do not block traffic outside the tunnel")
    c.add_argument("--no-dns", action="store_true", help="leave the system's DNS settings alone")
    c.add_argument("--helper-fd", type=int, metavar="FD",
                   help="a socket to an already running privileged helper (tests, service managers)")
    _add_socket(c)
    c.add_argument("--cleanup", action="store_true",
                   help="remove the routes, firewall table (a kill switch kept after a crash too), DNS change "
                        "and device a crashed client left, then exit")


def _add_helper(sub: Subparsers) -> None:
    sub.add_parser("helper", help="the privileged helper (root; started by the engine through pkexec)",
                   description="The privileged helper: configures the TUN device, routes, kill switch and DNS for "
                               "an engine running as an ordinary user.  It speaks on a Unix socket given as stdin "
                               "and is started by the engine (pkexec), never by hand.  See docs/PRIVILEGES.md.")


def _add_netcheck(sub: Subparsers) -> None:
    nc = sub.add_parser("netcheck", help="diagnose this network with a STUN server (UDP, TCP, TLS)",
                        description="Ask the STUN server(s) you name for this machine's public address over UDP, "
                                    "TCP and TLS from fresh sockets.  Any Shallot relay answers STUN over UDP.")
    nc.add_argument("--stun", required=True, metavar="HOST:PORT[,HOST:PORT]",
                    help="STUN server to ask; a second one also checks whether the UDP mapping changes")
    nc.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for each answer (default 2)")
    nc.add_argument("--json", action="store_true", help="print one JSON object")


def _add_app(sub: Subparsers) -> None:
    from shallot.app.cli_args import add_arguments  # the app's options, without importing Qt
    a = sub.add_parser("app", help="open the desktop app (the default when a display is available)",
                       description="Open the Shallot window: connect, watch the circuit and traffic, change "
                                   "settings.  It starts the engine when needed and attaches to one already "
                                   "running; closing the window keeps the connection (tray).")
    add_arguments(a)


def _add_status_and_peers(sub: Subparsers) -> None:
    for name, text in (("status", "ask a running engine, relay or exit for its status"),
                       ("peers", "list a running node's DHT peers and the relays it knows")):
        s = sub.add_parser(name, help=text)
        g = s.add_mutually_exclusive_group()
        g.add_argument("--state", type=Path, metavar="DIR", help="a relay's or exit's state directory")
        g.add_argument("--socket", type=Path, metavar="PATH", help="an engine's control socket")
        s.add_argument("--json", action="store_true", help="print one JSON object")


def _cmd_keygen(args: argparse.Namespace) -> int:
    from shallot.core.wire.addresses import parse_hostport
    from shallot.relay.state import keygen
    desc = keygen(args.state, parse_hostport(args.address), args.nickname, args.exit)
    print(desc.id_hex)
    return 0


def _cmd_directory(args: argparse.Namespace) -> int:
    import os
    import time

    from shallot.crypto.descriptor import DescriptorError, encode_directory
    from shallot.relay.state import read_descriptor
    descs = []
    for state in args.states:
        desc = read_descriptor(state)
        try:
            desc.check_valid(time.time())
        except DescriptorError as exc:
            raise ShallotError(f"{state}: {exc}") from None
        descs.append(desc)
    ids = [d.relay_id for d in descs]
    if len(set(ids)) != len(ids):
        raise ShallotError("the same relay appears twice")
    tmp = args.out.with_name(args.out.name + ".tmp")
    try:
        tmp.write_text(encode_directory(descs))
        os.replace(tmp, args.out)
    except OSError as exc:
        raise ShallotError(f"cannot write {args.out}: {exc.strerror}") from None
    print(f"wrote {len(descs)} relays to {args.out}", file=sys.stderr)
    return 0


def _seeds(args: argparse.Namespace) -> list[Seed] | None:
    from shallot.core.discovery.service import parse_seeds
    return parse_seeds(args.bootstrap) if getattr(args, "bootstrap", None) else None


def _cmd_relay(args: argparse.Namespace, *, expect_exit: bool | None) -> int:
    from shallot.core.discovery.directory import load_directory
    from shallot.core.io.udp import run
    from shallot.exit.endpoints import endpoint_services
    from shallot.exit.service import IpExit
    from shallot.relay.service import run_relay
    introducers = load_directory(args.introducers, private_network=args.private_network) if args.introducers else None
    if introducers is not None and any(d.reachability is not None for d in introducers):
        raise ShallotError("introducers must be public relays (one in the file is itself behind a NAT)")
    ip_exit = IpExit(uplink=args.uplink, policy_file=args.policy, resolver=args.resolver, public_ips=args.public_ip) \
        if getattr(args, "ip", False) else None
    run(run_relay(args.state, expect_exit=expect_exit, services=endpoint_services(ip_exit and ip_exit.ip_service),
                  part=ip_exit, bootstrap=_seeds(args), dht=args.dht, introducers=introducers,
                  stun_alt_port=args.stun_alt_port, private_network=args.private_network,
                  directory=args.directory, max_circuits=args.max_circuits))
    return 0


PROBE_ATTEMPTS = 3  # drawn paths a probe tries when a build times out


def _cmd_probe(args: argparse.Namespace) -> int:
    import random

    from shallot.commands.probe import describe, run_probe
    from shallot.core.circuit.path import choose_path
    from shallot.core.discovery.directory import load_directory
    from shallot.core.io.udp import run
    from shallot.crypto.params import MAX_DATA_LEN
    if not 0 <= args.size <= MAX_DATA_LEN:
        raise ShallotError(f"--size must be 0..{MAX_DATA_LEN} bytes (one cell)")
    seeds = _seeds(args)
    extra: dict[str, object] = {}
    if seeds is not None:
        import time

        from shallot.core.discovery.cache import default_cache_path
        from shallot.core.discovery.service import discover
        started = time.monotonic()
        relays, disc = run(discover(seeds, args.cache or default_cache_path(), self_ids=_own_ids(args),
                                    private_network=args.private_network))
        extra = {"relays_known": len(relays), "discovery_ms": round((time.monotonic() - started) * 1000, 1),
                 "dht_nodes": disc.last_crawl.get("nodes", 0), "records_rejected": disc.view.rejected()}
        known = disc.known_s()
    else:
        own = set(_own_ids(args))
        relays = [d for d in load_directory(args.directory, private_network=args.private_network)
                  if d.relay_id not in own]
        known = {}
    rng = random.SystemRandom()
    avoid: set[bytes] = set()
    for attempt in range(1, PROBE_ATTEMPTS + 1):
        # a view keeps relays whose DHT node went silent (docs/DHT.md): a drawn path may hold a dead relay,
        # which shows as a timeout; a drawn path is tried again without its guard and middle, as the
        # engine would (a path the user named is tried once: its failure is the answer)
        usable = [d for d in relays if d.relay_id not in avoid]
        path = choose_path(usable, rng, path_spec=args.path, exit_spec=args.exit, known=known)
        try:
            result = {**run(run_probe(relays, path, count=args.count, size=args.size)), **extra}
            break
        except ShallotError as exc:
            if args.path or attempt == PROBE_ATTEMPTS or "timed out" not in str(exc):
                raise
            print(f"shallot: {exc}; trying another guard and middle", file=sys.stderr)
            avoid.update(d.relay_id for d in path[:2])
    result["attempts"] = attempt
    print(json.dumps(result) if args.json else describe(result, relays))
    return 0 if result["echoed"] == result["sent"] else 1


def _cmd_paths(args: argparse.Namespace) -> int:
    import random

    from shallot.commands.paths import describe, parse_networks, sample, tally
    from shallot.core.circuit.path import PathError
    from shallot.core.discovery.directory import load_directory
    from shallot.core.io.udp import run
    if not 1 <= args.sample <= 1_000_000:
        raise ShallotError("--sample must be 1..1000000")
    try:
        colluding = parse_networks(args.colluding) if args.colluding else []
    except ValueError as exc:
        raise ShallotError(f"bad --colluding {args.colluding!r}: {exc}") from None
    own = frozenset(_own_ids(args))
    seeds = _seeds(args)
    known: dict[bytes, float] = {}
    if seeds is not None:
        from shallot.core.discovery.service import discover
        relays, disc = run(discover(seeds, args.cache, self_ids=tuple(own), private_network=args.private_network))
        known = disc.known_s()
    else:
        relays = load_directory(args.directory, private_network=args.private_network)
    rng = random.Random(args.seed) if args.seed is not None else random.SystemRandom()
    try:
        paths = sample(relays, rng, args.sample, known=known, exclude=own)
    except PathError as exc:
        raise ShallotError(str(exc)) from None
    result = tally(paths, relays, colluding)
    print(json.dumps(result) if args.json else describe(result, relays))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from shallot.commands.demo import run_demo
    from shallot.commands.probe import describe
    from shallot.core.io.udp import run
    out = run(run_demo(count=args.count, relays=args.relays, exits=args.exits, quiet=args.json))
    result = out["result"]
    print(json.dumps(result) if args.json else describe(result, out["directory"]))
    return 0 if result["echoed"] == result["sent"] else 1


def _engine_config(args: argparse.Namespace, *, vpn: bool) -> EngineConfig:
    """The flags of ``engine`` and ``connect`` as the settings the app would send with ``configure``."""
    from shallot.core.control.api import EngineConfig
    _seeds(args)  # a bad seed is reported before anything starts
    return EngineConfig(directory=str(args.directory) if args.directory else None,
                        bootstrap=tuple(p.strip() for p in (args.bootstrap or "").split(",") if p.strip()),
                        cache=str(args.cache) if args.cache else None, vpn=vpn,
                        kill_switch=not args.no_kill_switch, dns=not args.no_dns,
                        private_network=args.private_network)


def _cmd_engine(args: argparse.Namespace) -> int:
    from shallot.core.control.paths import default_socket
    from shallot.core.engine import run_engine
    from shallot.core.io.udp import run
    if args.directory and args.bootstrap:
        raise ShallotError("give --directory or --bootstrap, not both")
    run(run_engine(args.socket or default_socket(create=True), _engine_config(args, vpn=args.vpn),
                   own_ids=_own_ids(args), helper_fd=args.helper_fd))
    return 0


def _cmd_helper(args: argparse.Namespace) -> int:
    import socket

    from shallot.core.vpn.helper import serve
    try:
        sock = socket.socket(fileno=0)
    except OSError:
        raise ShallotError("the helper talks to the engine on a Unix socket as stdin; "
                           "it is started by the engine, not by hand") from None
    if sock.family != socket.AF_UNIX:
        raise ShallotError("stdin must be a Unix socket (the helper is started by the engine)")
    return serve(sock)


def _cmd_connect(args: argparse.Namespace) -> int:
    from shallot.core.control.paths import default_socket
    from shallot.core.engine import run_engine
    from shallot.core.io.udp import run
    from shallot.core.vpn.netconfig import cleanup
    if args.cleanup:
        from shallot.core.vpn.helper_client import can_admin_network
        if not can_admin_network():
            raise ShallotError("--cleanup changes routes, firewall and DNS: run it as root "
                               "(sudo shallot connect --cleanup); the helper also cleans up at every connect")
        for line in cleanup() or ["nothing to clean up"]:
            print(line)
        return 0
    if (args.directory is None) == (args.bootstrap is None):
        raise ShallotError("connect needs --directory FILE or --bootstrap HOST:PORT[,...] (or --cleanup)")
    run(run_engine(args.socket or default_socket(create=True), _engine_config(args, vpn=True),
                   own_ids=_own_ids(args), helper_fd=args.helper_fd, autoconnect=True, path=args.path,
                   exit_spec=args.exit))
    return 0


def _cmd_app(args: argparse.Namespace) -> int:
    from shallot.app.main import run_app
    return run_app(args)


def _ask(args: argparse.Namespace, request: Request) -> tuple[Role, Any]:
    """The answer of the engine, relay or exit that ``--state``/``--socket`` names, and its role."""
    from shallot.core.control.client import ControlClient
    from shallot.core.control.errors import ControlError
    from shallot.core.control.paths import default_socket
    from shallot.relay.state import CONTROL_SOCKET
    path = args.state / CONTROL_SOCKET if args.state else (args.socket or default_socket())

    async def ask() -> tuple[Role, Any]:
        client = await ControlClient.connect(path)
        try:
            return client.hello.role, await client.ask(request)
        except ControlError as exc:
            raise ShallotError(f"{path}: {exc}") from None
        finally:
            await client.close()

    return asyncio.run(ask())


def _print_tree(value: object, indent: str = "") -> None:
    items = value.items() if isinstance(value, dict) else []
    for key, item in items:
        if isinstance(item, dict) and item:
            print(f"{indent}{key}:")
            _print_tree(item, indent + "  ")
        else:
            print(f"{indent}{key}: {item}")


def _cmd_status(args: argparse.Namespace) -> int:
    from shallot.core.control.api import Role, SnapshotError, Status, StatusSnapshot
    role, result = _ask(args, Status())
    if role is Role.CLIENT:  # an engine: its snapshot, read as the app reads it
        try:
            result = StatusSnapshot.from_json(result).to_json()
        except SnapshotError as exc:
            raise ShallotError(f"the engine's status is not a snapshot: {exc}") from None
    elif not isinstance(result, dict):  # a relay's or exit's own status object
        result = {"status": result}
    if args.json:
        print(json.dumps(result))
    elif role is Role.CLIENT:
        _print_tree({k: v for k, v in result.items() if k != "guards"})
        print("\n".join(guard_lines(StatusSnapshot.from_json(result))))
    else:
        _print_tree(result)
    return 0


def guard_lines(snap: Any) -> list[str]:
    """The entry guards of an engine's snapshot (docs/PROTOCOL.md §5.10), one line each, in their order."""
    lines = [f"guards: {len(snap.guards) or 'none'}"]
    for g in snap.guards:
        role = "primary" if g.primary else "sampled"
        lines.append(f"  {'*' if g.in_use else ' '} {g.nickname:<20} {g.id[:16]}  {role:<8} {g.state}"
                     + (f" ({g.note})" if g.note else "") + ("  <- your guard" if g.in_use else ""))
    return lines


def _cmd_peers(args: argparse.Namespace) -> int:
    from shallot.core.control.api import Peers, PeersReply
    reply = PeersReply.from_json(_ask(args, Peers())[1])
    if args.json:
        print(json.dumps(reply.to_json()))
        return 0
    print(f"DHT peers ({len(reply.dht_peers)}):")
    for p in reply.dht_peers:
        print(f"  {p.id[:16]}  {p.address}")
    print(f"relays known ({len(reply.relays)}):")
    for r in reply.relays:
        print(f"  {r.id[:16]}  {r.nickname:<20} {r.address:<22} {'exit' if r.exit else ''}")
    return 0


def _cmd_netcheck(args: argparse.Namespace) -> int:
    from shallot.commands.netcheck import describe, run_netcheck
    from shallot.core.wire.addresses import parse_hostport
    servers = [parse_hostport(p) for p in args.stun.split(",") if p.strip()]
    if not servers or len(servers) > 2:
        raise ShallotError("--stun takes one or two HOST:PORT")
    result = asyncio.run(run_netcheck(servers, timeout=args.timeout))
    print(json.dumps(result) if args.json else describe(result))
    return 0 if result["udp_works"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("kademlia", "rpcudp"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.command is None:
        from shallot.app.cli_args import display_available
        if not display_available():
            parser.print_help()
            return 0
        args = parser.parse_args([*(argv if argv is not None else sys.argv[1:]), "app"])
    handlers = {
        "keygen": _cmd_keygen, "directory": _cmd_directory, "probe": _cmd_probe, "paths": _cmd_paths,
        "demo": _cmd_demo,
        "engine": _cmd_engine, "status": _cmd_status, "peers": _cmd_peers, "connect": _cmd_connect,
        "helper": _cmd_helper, "netcheck": _cmd_netcheck, "app": _cmd_app,
        "relay": lambda a: _cmd_relay(a, expect_exit=None),
        "exit": lambda a: _cmd_relay(a, expect_exit=True),
    }
    try:
        return handlers[args.command](args)
    except ShallotError as exc:
        print(f"shallot: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug: one line for the user, the traceback only with -vv
        if args.verbose >= 2:
            raise
        print(f"shallot: internal error: {exc!r} (run with -vv for details)", file=sys.stderr)
        return 70


if __name__ == "__main__":
    sys.exit(main())
