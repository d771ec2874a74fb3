"""The ``shallot`` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from shallot.core import __version__
from shallot.core.errors import ShallotError

DESCRIPTION = """Shallot: an onion-routed VPN over UDP.

Circuits go guard -> middle -> exit and are built in one round trip; relays forward
fixed-size cells they cannot read.  Start with 'shallot demo' to see it work on one machine."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shallot", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"shallot {__version__} (protocol 1)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    k = sub.add_parser("keygen", help="create a relay's keys and signed descriptor",
                       description="Create DIR (mode 0700) with a new relay identity (0600) and a signed "
                                   "descriptor for ADDRESS.  Prints the relay id.")
    k.add_argument("--state", required=True, type=Path, metavar="DIR", help="state directory to create")
    k.add_argument("--address", required=True, metavar="HOST:PORT", help="IP address and UDP port relays and "
                                                                          "clients will reach this relay at")
    k.add_argument("--nickname", metavar="NAME", help="1-32 characters of A-Z a-z 0-9 _ -")
    k.add_argument("--exit", action="store_true", help="make this relay an exit")

    d = sub.add_parser("directory", help="bundle relays' descriptors into a directory file",
                       description="Write the signed descriptors of the given state directories into FILE.")
    d.add_argument("--out", required=True, type=Path, metavar="FILE", help="directory file to write")
    d.add_argument("states", nargs="+", type=Path, metavar="DIR", help="relay state directories")

    for name, text in (("relay", "run relay-server mode (exit-node mode if keygen had --exit)"),
                       ("exit", "run exit-node mode (the state must have been created with --exit)")):
        r = sub.add_parser(name, help=text, description=text + ".  SIGTERM or SIGINT stop it cleanly.")
        r.add_argument("--state", required=True, type=Path, metavar="DIR", help="state directory made by keygen")
        if name == "exit":
            r.add_argument("--ip", action="store_true",
                           help="also carry clients' IP packets to the internet: creates a TUN device and an "
                                "nftables NAT table (needs root); without it the exit offers echo and discard")
            r.add_argument("--uplink", metavar="IFACE", help="with --ip: interface to the internet (default: "
                                                               "the one of the default route)")
            r.add_argument("--policy", type=Path, metavar="FILE", help="with --ip: exit policy rules file")
            r.add_argument("--resolver", metavar="ADDRESS", help="with --ip: DNS resolver the exit forwards clients' "
                                                                "queries to (default: the first in /etc/resolv.conf)")

    pr = sub.add_parser("probe", help="build a circuit and send datagrams to the exit's echo service",
                        description="Build a guard -> middle -> exit circuit from the directory and send N "
                                    "datagrams through it to the exit's echo service.")
    pr.add_argument("--directory", required=True, type=Path, metavar="FILE",
                    help="directory file of signed relay descriptors (made by 'shallot directory')")
    pr.add_argument("--path", metavar="ID,ID,ID", help="guard,middle,exit (ids, id prefixes or nicknames)")
    pr.add_argument("--exit", metavar="ID", help="use this exit")
    pr.add_argument("--count", type=int, default=10, metavar="N", help="datagrams to send (default 10)")
    pr.add_argument("--size", type=int, default=256, metavar="BYTES", help="datagram size (default 256)")
    pr.add_argument("--json", action="store_true", help="print one JSON object")

    dm = sub.add_parser("demo", help="run a local network of relays on 127.0.0.1 and probe through it",
                        description="Start 6 relays (2 exits) on 127.0.0.1 in child processes, build a circuit, "
                                    "send datagrams through it, print a summary and stop everything.")
    dm.add_argument("--json", action="store_true", help="print one JSON object (the probe's)")
    dm.add_argument("--count", type=int, default=10, metavar="N")
    dm.add_argument("--relays", type=int, default=6, metavar="N")
    dm.add_argument("--exits", type=int, default=2, metavar="N")

    e = sub.add_parser("engine", help="run the client engine and serve its control API",
                       description="Run the client engine (links, crypto, circuits) in this process on its own "
                                   "event loop and serve the control API on a 0600 Unix socket.")
    e.add_argument("--socket", type=Path, metavar="PATH", help="control socket (default: $XDG_RUNTIME_DIR)")
    e.add_argument("--directory", type=Path, metavar="FILE", help="directory file to use")

    c = sub.add_parser("connect", help="connect this machine through a circuit (VPN; needs root for now)",
                       description="Build an IP circuit, create TUN shallot0 and route all IPv4 through it, "
                                   "with a kill switch (nftables) that lets nothing else out while connected or "
                                   "reconnecting.  Serves the control API like 'shallot engine'.  SIGINT/SIGTERM "
                                   "restore the routes and firewall.")
    c.add_argument("--directory", type=Path, metavar="FILE", help="directory file")
    c.add_argument("--exit", metavar="ID", help="use this exit")
    c.add_argument("--path", metavar="ID,ID,ID", help="guard,middle,exit")
    c.add_argument("--no-kill-switch", action="store_true", help="do not block traffic outside the tunnel")
    c.add_argument("--socket", type=Path, metavar="PATH", help="control socket (default: $XDG_RUNTIME_DIR)")
    c.add_argument("--cleanup", action="store_true",
                   help="remove the routes, firewall table and device a crashed client left, then exit")

    a = sub.add_parser("app", help="open the desktop app (the default when a display is available)",
                       description="Open the Shallot window: connect, watch the circuit and traffic, change "
                                   "settings.  It starts the engine when needed and attaches to one already "
                                   "running; closing the window keeps the connection (tray).")
    from shallot.app.cli_args import add_arguments
    add_arguments(a)

    s = sub.add_parser("status", help="ask a running engine, relay or exit for its status")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--state", type=Path, metavar="DIR", help="a relay's or exit's state directory")
    g.add_argument("--socket", type=Path, metavar="PATH", help="an engine's control socket")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def _cmd_keygen(args: argparse.Namespace) -> int:
    from shallot.core.state import keygen, parse_hostport
    desc = keygen(args.state, parse_hostport(args.address), args.nickname, args.exit)
    print(desc.id_hex)
    return 0


def _cmd_directory(args: argparse.Namespace) -> int:
    import os
    import time

    from shallot.core.state import read_descriptor
    from shallot.crypto.descriptor import DescriptorError, encode_directory
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


def _cmd_relay(args: argparse.Namespace, *, expect_exit: bool | None) -> int:
    from shallot.core.udp import run
    from shallot.relay.service import run_relay
    run(run_relay(args.state, expect_exit=expect_exit, ip_exit=getattr(args, "ip", False),
                  uplink=getattr(args, "uplink", None), policy_file=getattr(args, "policy", None),
                  resolver=getattr(args, "resolver", None)))
    return 0


def _cmd_probe(args: argparse.Namespace) -> int:
    from shallot.core.directory import load_directory
    from shallot.core.probe import choose_path, describe, run_probe
    from shallot.core.udp import run
    relays = load_directory(args.directory)
    path = choose_path(relays, path_spec=args.path, exit_spec=args.exit)
    if not 0 <= args.size <= 1360:
        raise ShallotError("--size must be 0..1360 bytes (one cell)")
    result = run(run_probe(relays, path, count=args.count, size=args.size))
    print(json.dumps(result) if args.json else describe(result, relays))
    return 0 if result["echoed"] == result["sent"] else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    from shallot.core.demo import run_demo
    from shallot.core.probe import describe
    from shallot.core.udp import run
    out = run(run_demo(count=args.count, relays=args.relays, exits=args.exits, quiet=args.json))
    result = out["result"]
    print(json.dumps(result) if args.json else describe(result, out["directory"]))
    return 0 if result["echoed"] == result["sent"] else 1


def _cmd_engine(args: argparse.Namespace) -> int:
    from shallot.core.engine import default_socket, run_engine
    from shallot.core.udp import run
    run(run_engine(args.socket or default_socket(create=True), directory=args.directory))
    return 0


def _cmd_connect(args: argparse.Namespace) -> int:
    from shallot.core.connect import Tunnel
    from shallot.core.engine import default_socket, run_engine
    from shallot.core.netconfig import cleanup
    from shallot.core.udp import run
    if args.cleanup:
        for line in cleanup() or ["nothing to clean up"]:
            print(line)
        return 0
    if args.directory is None:
        raise ShallotError("connect needs --directory FILE (or --cleanup)")
    run(run_engine(args.socket or default_socket(create=True), directory=args.directory,
                   tunnel=Tunnel(kill_switch=not args.no_kill_switch), autoconnect=True, path=args.path,
                   exit_spec=args.exit))
    return 0


def _cmd_app(args: argparse.Namespace) -> int:
    from shallot.app.main import run_app
    return run_app(args)


def _cmd_status(args: argparse.Namespace) -> int:
    from shallot.core.control import ControlClient
    from shallot.core.engine import default_socket
    from shallot.core.state import CONTROL_SOCKET
    path = args.state / CONTROL_SOCKET if args.state else (args.socket or default_socket())

    async def ask() -> dict[str, object]:
        client = await ControlClient.connect(path)
        try:
            result = await client.call("status")
            return result if isinstance(result, dict) else {"status": result}
        finally:
            await client.close()

    result = asyncio.run(ask())
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            if isinstance(value, dict):
                print(f"{key}:")
                for k2, v2 in sorted(value.items()):
                    print(f"  {k2}: {v2}")
            else:
                print(f"{key}: {value}")
    return 0


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
        "keygen": _cmd_keygen, "directory": _cmd_directory, "probe": _cmd_probe, "demo": _cmd_demo,
        "engine": _cmd_engine, "status": _cmd_status, "connect": _cmd_connect, "app": _cmd_app,
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
