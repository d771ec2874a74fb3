#!/usr/bin/env python3
"""Mutation check of Shallot's defences: can a guard be deleted without a test going red?

For the security-critical modules in TARGETS the guard conditions are read from the AST:

* ``guard-off``: an ``if``/``elif`` whose body drops, counts, refuses, returns or raises gets the
  condition ``False`` (the defence is gone);
* ``else-off``: an ``if`` whose ``else`` drops (``if ok: ... else: drop``) gets the condition ``True``;
* ``disjunct-off``: in such a condition ``A or B``, each of ``A`` and ``B`` alone becomes ``False``
  (one half of a two-part check is gone);
* ``boundary``: in such a condition, a comparison against a limit moves its boundary by one
  (``>=`` to ``>``, ``<`` to ``<=``, ...): the limit lets one more through.

How it runs.  One baseline run of the fast tiers (unit + property tests that can reach the modules,
through their import closure) must be green; it also records, per test, which lines of the target
modules it executes.  Each mutant then runs alone against the tests that executed its guard's line
(a test that never reaches the line cannot tell the difference), with ``-x``: *killed* when a test
fails or hangs past its time limit, *survived* when they all pass.  A mutant never touches a file:
each run is a forked child that loads the mutated module from memory through an import hook (a run
that never imported the mutant is an error, not a survivor).  Hypothesis runs derandomized, without
its example database and deadlines, so a score is reproducible.  Mutants that no test can kill
because the program behaves the same are listed, with the reason, in EQUIVALENT.

    .venv/bin/python scripts/mutation.py                  # every module, 2 jobs
    .venv/bin/python scripts/mutation.py --module relay/forwarder.py --jobs 1
    .venv/bin/python scripts/mutation.py --list           # the mutants, without running them
    .venv/bin/python scripts/mutation.py --before REV     # only the test files that existed at REV
    .venv/bin/python scripts/mutation.py --tests tests/unit/test_relay_limits.py --module relay/forwarder.py

The tree must be clean (the score describes a commit).  Exit status: 0 when every module reaches
TARGET_SCORE, 1 otherwise, 2 on a setup error.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.architecture.imports import imports_of, modules, package_dirs  # noqa: E402  (the root is on sys.path)

TARGET_SCORE = 0.90
TEST_TIERS = ("tests/unit", "tests/property")


@dataclass(frozen=True)
class Target:
    path: str  # relative to the repo root
    functions: tuple[str, ...] = ()  # qualified names to mutate; empty: the whole module
    all_ifs: bool = False  # every ``if`` is a guard (not only those whose body drops, counts, returns ...)


# The relay, the link layer, the client's circuits and their manager, the DHT's and the record store's limits
# and record checks, the NAT roles, the exit's policy and services, onion-key rotation.
TARGETS: tuple[Target, ...] = (
    Target("relay/forwarder.py"),
    Target("relay/quotas.py"),
    Target("core/link/layer.py"),
    Target("core/link/circuit_ids.py"),
    Target("core/link/limits.py", all_ifs=True),
    Target("core/circuit/client.py"),
    Target("core/circuit/manager.py"),
    Target("core/circuit/path.py"),
    Target("core/circuit/guards.py"),
    Target("core/discovery/dht.py", functions=(
        "BoundRoutingTable.add_contact", "ShallotRpc.datagram_received", "ShallotRpc._accept_response",
        "ShallotRpc._timeout", "ShallotRpc._rate_ok", "ShallotRpc.rpc_ping", "ShallotRpc._call",
        "ShallotRpc.welcome_if_new", "ShallotRpc._bind", "ShallotRpc.call_find_value", "ShallotRpc.call_store",
        "ShallotRpc.handle_call_response", "DhtNode.crawl", "DhtNode.crawl.enqueue", "DhtNode.crawl.visit",
        "DhtNode.crawl.page",
        "ShallotRpc._authentic", "ShallotRpc._learn_key", "ShallotRpc._proven")),
    Target("core/discovery/wire.py", functions=("decode_datagram", "verify_answer", "encode_response",
                                                "encode_result_within")),
    Target("core/discovery/addresses.py"),
    Target("core/discovery/directory.py"),
    Target("core/discovery/storage.py"),
    Target("core/discovery/view.py"),
    Target("core/discovery/records.py"),
    Target("core/nat/introducer.py"),
    Target("core/nat/stun_server.py"),
    Target("core/nat/registrant.py"),
    Target("core/nat/dialer.py"),
    Target("core/nat/own.py"),
    Target("core/nat/virtual.py"),
    Target("core/nat/part.py"),
    Target("exit/policy.py"),
    Target("exit/ipservice.py"),
    Target("exit/dns.py"),
    Target("exit/dnsquery.py"),
    Target("crypto/keys.py", functions=("RelayKeys.rotate_onion_keys",), all_ifs=True),
    Target("core/wire/jsonlines.py"),
    Target("core/privfile.py"),
)

# Mutants no test can kill because the program behaves the same with and without them:
# (file, function, kind, detail as --list prints it) -> why.  Most are a second check of what another
# check (named in the reason) already guarantees; a test can only reach them by breaking that one first.
_CONNECTING = ("a CONNECTING link always has a handshake in flight: open_link starts one, and a link whose "
               "handshake gives up without a session is closed (LinkLayer.handle_timer)")
_REACH = "a dial exists only for a descriptor that names introducers, so reach is None exactly when dial is None"
_ANSWER = "IntroAnswer.decode gives a peer exactly when the status is OK, so either half alone decides"
EQUIVALENT: dict[tuple[str, str, str, str], str] = {
    ("core/circuit/path.py", "resolve_relay", "boundary", "len(found) > 1  ->  len(found) >= 1"):
        "a name that fits exactly one relay has returned it on the line before",
    ("core/circuit/path.py", "Candidates.__init__", "boundary",
     "len(members) <= MAX_PER_ADDRESS  ->  len(members) < MAX_PER_ADDRESS"):
        "an address with exactly MAX_PER_ADDRESS relays then goes through the cut, which keeps all of them too "
        "(the ones above the cut plus MAX_PER_ADDRESS minus those from the tie); only the rng stream differs",
    ("core/circuit/path.py", "Candidates.weights", "guard-off", "if len(ids) == 1  ->  if False"):
        "a /16 with one relay then takes the general branch, whose scale is min(1, NET_WEIGHT_CAP * w / w) = 1 "
        "(NET_WEIGHT_CAP >= 1): "
        "the same weight, computed the long way",
    ("core/circuit/guards.py", "AvoidFailedGuards.plan", "guard-off", "if not avoid  ->  if False"):
        "with nothing avoided the fallback draws from the very same relays and raises the same error",
    ("core/circuit/guards.py", "_time", "disjunct-off", "not isinstance(value, int | float)  ->  False"):
        "a non-number then fails the range comparison with TypeError, which GuardSet.from_json turns into the "
        "same ValueError",
    ("relay/forwarder.py", "RelayNode.handle_timer", "guard-off", "if now < self._next_sweep  ->  if False"):
        "only how often the timeout sweep runs (every tick instead of once a second); the timeouts it applies are "
        "tested, and PROTOCOL §7.3 lets them fire up to a second late",
    ("core/link/layer.py", "LinkLayer.retarget", "disjunct-off", "link.pending is None  ->  False"): _CONNECTING,
    ("core/link/layer.py", "LinkLayer._receive_response", "disjunct-off", "link.pending is None  ->  False"):
        "an index is in _pending_by_index exactly while its link's handshake is pending: every path that clears "
        "link.pending removes the index first",
    ("core/link/layer.py", "LinkLayer.handle_timer", "guard-off", "if link.state is LinkState.CLOSED  ->  if False"):
        "the loop runs over self.links, which close_link leaves at once, and no link is closed during another "
        "link's turn: a CLOSED link never gets here",
    ("core/link/layer.py", "LinkLayer.handle_timer", "guard-off", "if link.pending is None  ->  if False"):
        "a link with neither a session nor a handshake in flight never reaches this tick: " + _CONNECTING
        + ", and one whose session expires with no handshake in flight is closed right there (tested)",
    ("core/circuit/client.py", "ClientNode._finish", "guard-off", "if circ.state is CircuitState.CLOSED  ->  if False"):
        "every caller finds the circuit where a closed one no longer is (circuits, _by_wire) or checks first "
        "(close, tested twice in a row)",
    ("core/circuit/manager.py", "CircuitManager._ping_answered", "disjunct-off",
     "self.phase is not Phase.OPEN  ->  False"):
        "a ping is outstanding only in OPEN: _ping runs only there, and every way out of OPEN (_fail, disconnect, a "
        "switch, which starts only once the round has ended) clears it",
    ("core/discovery/addresses.py", "usable_address", "guard-off",
     "if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None  ->  if False"):
        "every v4-mapped address is in ::/8, which is_reserved (two lines below) refuses too; the explicit check "
        "names why",
    ("core/discovery/view.py", "NetworkView.offer", "guard-off", "if not isinstance(raw, bytes)  ->  if False"):
        "validate_record below refuses a value that is not bytes with the same reason, 'type'",
    ("core/nat/dialer.py", "peer_nat", "guard-off", "if reach is None  ->  if False"):
        "its one caller (NatDialer.dial) returns earlier for a descriptor without introducers",
    ("core/nat/dialer.py", "NatDialer.dial", "disjunct-off", "link.pending is None  ->  False"): _CONNECTING,
    ("core/nat/dialer.py", "NatDialer.on_intro_answer", "disjunct-off", "dial is None  ->  False"): _REACH,
    ("core/nat/dialer.py", "NatDialer.on_intro_answer", "disjunct-off", "reach is None  ->  False"): _REACH,
    ("core/nat/dialer.py", "NatDialer.on_intro_answer", "disjunct-off", "ans.status != nm.STATUS_OK  ->  False"):
        _ANSWER,
    ("core/nat/dialer.py", "NatDialer.on_intro_answer", "disjunct-off", "ans.peer is None  ->  False"): _ANSWER,
    ("exit/policy.py", "ExitPolicy.builtin_reason", "guard-off", "if dst == ipaddress.IPv4Address('255.255.255.255')"
                                                                 "  ->  if False"):
        "dead code: 255.255.255.255 lies in 240.0.0.0/4, which the built-in table rejects first (as reserved)",
}

_DROP_CALLS = re.compile(r"^(_count|_reject\w*|_destroy|_tear_down|_finish|close_link|_fail|_fall_back|clear)$")
_LIMIT = re.compile(r"len\(|sum\(|max_|MAX_|_MAX|limit|LIMIT|burst|BURST|open_circuits|attempts|tries|TRIES|"
                    r"ATTEMPTS|upgrades|RATE_TABLE")
_BOUNDARY = {ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Lt: ast.LtE, ast.LtE: ast.Lt}


@dataclass(frozen=True)
class Mutant:
    path: str
    line: int  # where the changed expression starts
    col: int
    end: tuple[int, int]
    guard_line: int  # the line of its ``if``: a test that never runs it cannot see the mutant
    kind: str  # guard-off | else-off | disjunct-off | boundary
    function: str
    detail: str  # what changes
    nth: int = 1  # the same change in the same function once more (e.g. two ``if cmd == CMD_RELAY``)

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.path, self.function, self.kind, self.detail if self.nth == 1 else f"{self.detail}  #{self.nth}")

    def where(self) -> str:
        return f"{self.path}:{self.line}"


# ---------------------------------------------------------------------------------------------- finding mutants


def _drops(body: list[ast.stmt]) -> bool:
    """Does this block drop, count, refuse, return or raise (not counting nested functions)?"""
    todo: list[ast.AST] = list(body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef):
            continue
        if isinstance(node, ast.Return | ast.Raise | ast.Continue | ast.Break):
            return True
        if isinstance(node, ast.AugAssign) and "counters" in ast.unparse(node.target):
            return True
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if _DROP_CALLS.match(name):
                return True
        todo.extend(ast.iter_child_nodes(node))
    return False


def _functions(tree: ast.Module) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                yield f"{prefix}{child.name}", child
                yield from walk(child, f"{prefix}{child.name}.")
    yield from walk(tree, "")


def _own_ifs(func: ast.AST) -> Iterator[ast.If]:
    """The ``if`` statements of this function, not of the functions nested in it."""
    todo = list(ast.iter_child_nodes(func))
    while todo:
        node = todo.pop(0)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef):
            continue
        if isinstance(node, ast.If):
            yield node
        todo.extend(ast.iter_child_nodes(node))


def find_mutants(target: Target, source: str) -> list[Mutant]:
    out: list[Mutant] = []
    for qualname, func in _functions(ast.parse(source)):
        if target.functions and qualname not in target.functions:
            continue
        for node in _own_ifs(func):
            test, cond = node.test, ast.unparse(node.test)

            def add(kind: str, sub: ast.AST, detail: str, qualname: str = qualname, line: int = node.lineno) -> None:
                end = (sub.end_lineno or 0, sub.end_col_offset or 0)
                out.append(Mutant(target.path, sub.lineno, sub.col_offset, end, line, kind, qualname, detail))

            if node.orelse and not isinstance(node.orelse[0], ast.If) and _drops(node.orelse):
                add("else-off", test, f"if {cond}  ->  if True  (the else never runs)")
            if not target.all_ifs and not _drops(node.body):
                continue
            add("guard-off", test, f"if {cond}  ->  if False")
            if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.Or):
                for value in test.values:
                    add("disjunct-off", value, f"{ast.unparse(value)}  ->  False")
            for sub in ast.walk(test):
                if isinstance(sub, ast.Compare) and len(sub.ops) == 1 and type(sub.ops[0]) in _BOUNDARY \
                        and _LIMIT.search(ast.unparse(sub)):
                    moved = ast.Compare(sub.left, [_BOUNDARY[type(sub.ops[0])]()], sub.comparators)
                    add("boundary", sub, f"{ast.unparse(sub)}  ->  {ast.unparse(moved)}")
    out.sort(key=lambda m: (m.line, m.col, m.kind, m.detail))
    seen: dict[tuple[str, str, str], int] = {}
    for i, m in enumerate(out):
        nth = seen[m.function, m.kind, m.detail] = seen.get((m.function, m.kind, m.detail), 0) + 1
        if nth > 1:
            out[i] = dataclasses.replace(m, nth=nth)
    return out


def mutate(source: str, mutant: Mutant) -> ast.Module:
    """The module's AST with this one mutant applied."""
    tree = ast.parse(source)
    nodes = {(n.lineno, n.col_offset, (n.end_lineno, n.end_col_offset)): n
             for n in ast.walk(tree) if isinstance(n, ast.expr)}
    node = nodes.get((mutant.line, mutant.col, mutant.end))
    if node is not None:
        for parent in ast.walk(tree):
            if mutant.kind in ("guard-off", "else-off") and isinstance(parent, ast.If) and parent.test is node:
                parent.test = ast.copy_location(ast.Constant(mutant.kind == "else-off"), node)
                return ast.fix_missing_locations(tree)
            if mutant.kind == "disjunct-off" and isinstance(parent, ast.BoolOp) \
                    and any(v is node for v in parent.values):
                parent.values = [ast.copy_location(ast.Constant(False), v) if v is node else v for v in parent.values]
                return ast.fix_missing_locations(tree)
        if mutant.kind == "boundary" and isinstance(node, ast.Compare):
            node.ops = [_BOUNDARY[type(node.ops[0])]()]
            return ast.fix_missing_locations(tree)
    raise LookupError(f"mutant not found in the source: {mutant}")


# ---------------------------------------------------------------------------------------------- which tests


def module_name(path: str) -> str:
    for name, file in modules(ROOT).items():
        if file == ROOT / path:
            return name
    raise LookupError(f"{path} is not a module of the distribution")


def test_files(before: str | None) -> list[Path]:
    files = sorted(p for tier in TEST_TIERS for p in (ROOT / tier).glob("test_*.py"))
    if before is None:
        return files
    kept = []
    for p in files:
        rel = str(p.relative_to(ROOT))
        if subprocess.run(["git", "cat-file", "-e", f"{before}:{rel}"], cwd=ROOT, capture_output=True).returncode:
            continue
        if subprocess.run(["git", "diff", "--quiet", before, "--", rel], cwd=ROOT).returncode:
            print(f"note: {rel} changed since {before}; its current version is used", file=sys.stderr)
        kept.append(p)
    return kept


def reaching_tests(target_module: str, files: list[Path]) -> list[Path]:
    """The test files whose import closure (through test helpers and the product) holds the module."""
    mods = dict(modules(ROOT))
    for path in (ROOT / "tests").rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        mods[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = path
    known = set(mods)
    cache: dict[str, set[str]] = {}

    def direct(name: str) -> set[str]:
        if name not in cache:
            path = mods[name]
            deps = set()
            for imp in imports_of(path.read_text(), name, is_package=path.stem == "__init__", known=known):
                parts = imp.target.split(".")
                deps.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))  # packages run first
            cache[name] = deps & known
        return cache[name]

    def closure(name: str) -> set[str]:
        seen, todo = set(), [name]
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo.extend(direct(n))
        return seen

    return [p for p in files if target_module in closure(".".join(p.relative_to(ROOT).with_suffix("").parts))]


def _order(nodeids: set[str]) -> list[str]:
    """Unit tests before the fuzzers (which take longest), so that ``-x`` stops early."""
    return sorted(nodeids, key=lambda n: ("tests/property" in n, n))


# ---------------------------------------------------------------------------------------------- the forked child


class _TreeFinder(importlib.abc.MetaPathFinder):
    """Loads the distribution from this tree (as pyproject maps its folders), whichever tree the venv's
    editable install points at: the score is always the score of the tree the script is in."""

    def __init__(self, dirs: dict[str, Path]) -> None:
        self.dirs = dirs

    def find_spec(self, fullname: str, path: object, target: object = None) -> importlib.machinery.ModuleSpec | None:
        folder = self.dirs.get(fullname)
        if folder is not None:
            return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                          submodule_search_locations=[str(folder)])
        parent, _, leaf = fullname.rpartition(".")
        folder = self.dirs.get(parent)
        if folder is not None and (folder / f"{leaf}.py").is_file():
            return importlib.util.spec_from_file_location(fullname, folder / f"{leaf}.py")
        return None


class _MutantLoader(importlib.abc.Loader):
    def __init__(self, code: Any) -> None:
        self.code = code
        self.loaded = False

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: Any) -> None:
        self.loaded = True
        exec(self.code, module.__dict__)


class _MutantFinder(importlib.abc.MetaPathFinder):
    def __init__(self, name: str, path: Path, loader: _MutantLoader) -> None:
        self.name, self.path, self.loader = name, path, loader

    def find_spec(self, fullname: str, path: object, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.name:
            return None
        return importlib.util.spec_from_file_location(fullname, self.path, loader=self.loader)


class _Recorder:
    """A pytest plugin for the baseline: seconds per test, and the lines of the target files each test runs
    (collection counts as the test file's own, under its path)."""

    def __init__(self, files: set[str]) -> None:
        self.files = files
        self.current = ""
        self.seconds: dict[str, float] = {}
        self.lines: dict[str, set[tuple[str, int]]] = {}

    def trace(self, frame: Any, event: str, arg: Any) -> Callable[..., Any] | None:
        if frame.f_code.co_filename not in self.files:
            return None
        lines = self.lines.setdefault(self.current, set())
        filename = frame.f_code.co_filename

        def local(frame: Any, event: str, arg: Any) -> Callable[..., Any]:
            if event == "line":
                lines.add((filename, frame.f_lineno))
            return local

        return local

    def pytest_collectstart(self, collector: Any) -> None:
        self.current = str(getattr(collector, "nodeid", "")).split("::")[0]

    def pytest_runtest_logstart(self, nodeid: str, location: object) -> None:
        self.current = nodeid

    def pytest_runtest_logreport(self, report: Any) -> None:
        self.seconds[report.nodeid] = self.seconds.get(report.nodeid, 0.0) + float(report.duration)


NOT_LOADED = 97
CHILD_ERROR = 98


def _child(job: Job, tree: ast.Module | None) -> int:
    """In the forked child: load the mutated module from memory (``tree``; None: the baseline, nothing
    mutated, traced), run pytest on the job's tests, return its exit status."""
    if not job.tests:  # pytest without paths would run its testpaths: every tier, netns and all
        return CHILD_ERROR
    os.setpgid(0, 0)
    os.chdir(ROOT)
    fd = os.open(job.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    import hypothesis
    import pytest

    hypothesis.settings.register_profile("mutation", database=None, derandomize=True, deadline=None,
                                         print_blob=False)
    hypothesis.settings.load_profile("mutation")
    assert not any(m == "shallot" or m.startswith("shallot.") for m in sys.modules), "the parent imported shallot"
    finders: list[importlib.abc.MetaPathFinder] = [_TreeFinder(package_dirs(ROOT))]
    loader = None
    if tree is not None:
        loader = _MutantLoader(compile(tree, str(job.path), "exec", dont_inherit=True))
        finders.insert(0, _MutantFinder(job.name, job.path, loader))
    sys.meta_path[:0] = finders
    args = ["-x", "-q", "-p", "no:cacheprovider", "-o", "timeout=120", "--no-header", *job.tests]
    if tree is not None:
        rc = int(pytest.main(args))
        assert loader is not None
        return rc if loader.loaded else NOT_LOADED
    recorder = _Recorder({str(ROOT / t.path) for t in TARGETS})
    threading.settrace(recorder.trace)
    sys.settrace(recorder.trace)
    try:
        rc = int(pytest.main(args, plugins=[recorder]))
    finally:
        sys.settrace(None)
        threading.settrace(None)  # type: ignore[arg-type]
    hits: dict[str, list[str]] = {}
    for who, lines in recorder.lines.items():
        for filename, line in lines:
            hits.setdefault(f"{filename}:{line}", []).append(who)
    job.log.with_suffix(".json").write_text(json.dumps({"seconds": recorder.seconds, "hits": hits}))
    return rc


# ---------------------------------------------------------------------------------------------- running jobs


@dataclass
class Run:
    mutant: Mutant | None  # None: the baseline
    status: str = ""  # killed | survived | timeout | error | ignored
    rc: int | None = None
    seconds: float = 0.0
    tests: int = 0
    detail: str = ""


@dataclass
class Job:
    run: Run
    name: str
    path: Path
    source: str  # the module as read when the run began (mutants are made from it, never from the disk again)
    tests: list[str]  # test files or node ids
    timeout: float
    pid: int = 0
    started: float = 0.0
    log: Path = field(default_factory=Path)
    record: dict[str, Any] = field(default_factory=dict)  # the baseline's: seconds per test, tests per line


def run_jobs(jobs: list[Job], parallel: int, on_done: Callable[[Job], None] | None = None) -> None:
    pending = list(jobs)
    running: dict[int, Job] = {}
    tmp = Path(tempfile.mkdtemp(prefix="shallot-mutation-"))
    try:
        while pending or running:
            while pending and len(running) < parallel:
                job = pending.pop(0)
                job.log = tmp / f"{len(pending)}-{time.monotonic_ns()}.log"
                tree = None if job.run.mutant is None else mutate(job.source, job.run.mutant)
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    rc = CHILD_ERROR
                    try:
                        rc = _child(job, tree)
                    except BaseException:  # whatever happens, the child must exit here
                        import traceback
                        traceback.print_exc()
                    finally:
                        os._exit(rc)
                job.pid, job.started = pid, time.monotonic()
                running[pid] = job
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                now = time.monotonic()
                for job in [j for j in running.values() if now - j.started > j.timeout]:
                    _kill_group(job.pid)
                    os.waitpid(job.pid, 0)
                    del running[job.pid]
                    _finish(job, None, now)
                    if on_done is not None:
                        on_done(job)
                time.sleep(0.02)
                continue
            job = running.pop(pid)
            _kill_group(pid)  # anything a test left running
            _finish(job, os.waitstatus_to_exitcode(status), time.monotonic())
            if on_done is not None:
                on_done(job)
    finally:
        for job in running.values():
            _kill_group(job.pid)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(job.pid, 0)
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _finish(job: Job, rc: int | None, now: float) -> None:
    run = job.run
    run.seconds, run.rc = now - job.started, rc
    record = job.log.with_suffix(".json")
    if record.exists():
        job.record = json.loads(record.read_text())
    if rc is None:
        run.status = "timeout"  # a hang is a failure a test run would report
    elif rc == 0:
        run.status = "survived"
    elif rc == 1:
        run.status = "killed"
    else:
        run.status = "error"
        tail = job.log.read_text(errors="replace").strip().splitlines()[-15:] if job.log.exists() else []
        run.detail = f"exit status {rc}" + ("\n      " + "\n      ".join(tail) if tail else "")


# ---------------------------------------------------------------------------------------------- main


def clean_tree() -> bool:
    out = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, check=True)
    return not out.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--module", action="append", default=[], help="only this module (repeatable), e.g. exit/policy.py")
    ap.add_argument("--jobs", type=int, default=2, help="mutants run at once (default 2)")
    ap.add_argument("--list", action="store_true", help="list the mutants and the test files that reach each module")
    ap.add_argument("--before", metavar="REV", help="use only the test files that existed at REV")
    ap.add_argument("--tests", action="append", type=Path, default=[],
                    help="only these test files (repeatable): which guards does this file alone catch?")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--dirty-ok", action="store_true",
                    help="run on a tree with changes (the score then describes no commit; for work on the tests)")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the children are killed, the logs removed

    targets = [t for t in TARGETS if not args.module or t.path in args.module]
    if len(targets) != len(set(args.module) or TARGETS):
        print(f"unknown module; the modules are: {', '.join(t.path for t in TARGETS)}", file=sys.stderr)
        return 2
    if not args.list and not args.dirty_ok and not clean_tree():
        print("the tree has uncommitted changes: commit or stash them first (the score must describe a commit)",
              file=sys.stderr)
        return 2
    files = [(ROOT / t).resolve() for t in args.tests] if args.tests else test_files(args.before)
    outside = [t for t in files if not any(t.is_relative_to(ROOT / tier) for tier in TEST_TIERS) or not t.is_file()]
    if outside:  # the live tiers spawn relays, namespaces and windows: never from here
        print(f"not a unit or property test file: {', '.join(map(str, outside))}", file=sys.stderr)
        return 2
    plan = []
    for target in targets:
        name = module_name(target.path)
        source = (ROOT / target.path).read_text()
        plan.append((target, name, source, reaching_tests(name, files), find_mutants(target, source)))
    if args.list:
        for target, name, _, tests, mutants in plan:
            print(f"{target.path}  ({name}): {len(mutants)} mutants, {len(tests)} test files")
            for t in tests:
                print(f"    test  {t.relative_to(ROOT)}")
            for m in mutants:
                flag = "  [equivalent]" if m.key in EQUIVALENT else ""
                print(f"    {m.where():32} {m.kind:13} {m.function}: {m.detail}{flag}")
        return 0
    unused = set(EQUIVALENT) - {m.key for *_, ms in plan for m in ms}
    if unused and not args.module:
        print("stale entries in EQUIVALENT (no such mutant any more):", *sorted(unused), sep="\n  ", file=sys.stderr)
        return 2
    return run(args, plan)


def run(args: argparse.Namespace, plan: list[tuple[Target, str, str, list[Path], list[Mutant]]]) -> int:
    started = time.monotonic()
    try:
        import hypothesis  # noqa: F401  (imported once here, so that every forked child starts warm)
        import pytest  # noqa: F401
    except ImportError:
        print("pytest is missing: run ./scripts/test.sh once (it installs the test extras into .venv)", file=sys.stderr)
        return 2
    for warm in ("cryptography.hazmat.primitives.ciphers.aead", "kademlia.network", "pytest_asyncio",
                 "pytest_timeout", "umsgpack"):
        with contextlib.suppress(ImportError):
            __import__(warm)

    # the unmutated tree must pass every test file used below, or nothing below means anything; the same run
    # records which tests execute which lines and how long each takes
    every = sorted({str(t.relative_to(ROOT)) for *_, tests, _ in plan for t in tests})
    base = Job(Run(None), "", ROOT, "", every, timeout=3600)
    print(f"baseline: {len(every)} test files, nothing mutated, traced ...", flush=True)
    run_jobs([base], 1)
    if base.run.status != "survived" or not base.record:
        print(f"the baseline is not green ({base.run.status} {base.run.detail})", file=sys.stderr)
        return 2
    print(f"baseline green in {base.run.seconds:.0f} s", flush=True)
    seconds: dict[str, float] = base.record["seconds"]
    hits: dict[str, list[str]] = base.record["hits"]

    results: dict[str, list[Run]] = {}
    jobs = []
    for target, name, source, _tests, mutants in plan:
        runs = results.setdefault(target.path, [])
        for m in mutants:
            run = Run(m)
            runs.append(run)
            if m.key in EQUIVALENT:
                run.status, run.detail = "ignored", EQUIVALENT[m.key]
                continue
            # the tests that ran the guard's line; collection-time hits stand for their whole file
            reached = set(hits.get(f"{ROOT / target.path}:{m.guard_line}", []))
            selected = _order({r for r in reached if "::" in r or r.endswith(".py")})
            run.tests = len(selected)
            if not selected:
                run.status, run.detail = "survived", "no test runs this line"
                continue
            budget = sum(seconds.get(n, 0.0) for n in selected)
            jobs.append(Job(run, name, ROOT / target.path, source, selected, timeout=max(60.0, 4 * budget + 30)))
    total, done = len(jobs), [0]

    def progress(job: Job) -> None:
        done[0] += 1
        m = job.run.mutant
        if m is not None and job.run.status != "killed":
            print(f"  [{done[0]}/{total}] {job.run.status:8} {m.where()} {m.kind}: {m.detail}", flush=True)

    print(f"{total} mutants in {len(plan)} modules, {args.jobs} at a time ...", flush=True)
    run_jobs(jobs, args.jobs, progress)
    elapsed = time.monotonic() - started

    ok = report(results)
    print(f"\nwall time {elapsed / 60:.1f} min ({args.jobs} jobs)")
    if args.json:
        args.json.write_text(json.dumps({
            "elapsed_s": round(elapsed, 1), "before": args.before, "tests": [str(t) for t in args.tests],
            "modules": {path: [asdict(r) for r in runs] for path, runs in results.items()}}, indent=1, default=str))
    changed = [t.path for t, _, source, *_ in plan if (ROOT / t.path).read_text() != source]
    if changed or (not args.dirty_ok and not clean_tree()):
        print(f"the tree changed during the run (mutants live in memory only): {changed}", file=sys.stderr)
        return 2
    return 0 if ok else 1


def report(results: dict[str, list[Run]]) -> bool:
    print(f"\n{'module':30} {'mutants':>7} {'killed':>7} {'survived':>8} {'errors':>6} {'ignored':>7} {'score':>7}")
    ok, survivors = True, []
    totals = [0, 0, 0]
    for path, runs in results.items():
        n = {s: sum(r.status == s for r in runs) for s in ("killed", "survived", "timeout", "error", "ignored")}
        killed, counted = n["killed"] + n["timeout"], len(runs) - n["ignored"]
        score = killed / counted if counted else 1.0
        ok &= score >= TARGET_SCORE and not n["error"]
        totals = [totals[0] + counted, totals[1] + killed, totals[2] + n["ignored"]]
        print(f"{path:30} {len(runs):7} {killed:7} {n['survived']:8} {n['error']:6} {n['ignored']:7} "
              f"{100 * score:6.1f}%")
        survivors += [r for r in runs if r.status in ("survived", "error")]
    if totals[0]:
        print(f"{'all':30} {totals[0] + totals[2]:7} {totals[1]:7} {'':8} {'':6} {totals[2]:7} "
              f"{100 * totals[1] / totals[0]:6.1f}%")
    if survivors:
        print("\nsurvivors and errors:")
        for r in survivors:
            m = r.mutant
            assert m is not None
            print(f"  {r.status:8} {m.where():32} {m.kind:13} {m.function}: {m.detail}"
                  + (f"\n      {r.detail}" if r.detail else ""))
    return ok


if __name__ == "__main__":
    sys.exit(main())
