"""The vectors against an implementation that shares no code with the product: tests/vectors/independent.py,
written from docs/PROTOCOL.md with only ``cryptography`` and the standard library, run in a fresh interpreter.

tests/vectors/circuit_build_v1.json is written by the product code (a change detector); this is what makes it
a correctness check: the same 3-hop build, layers and keys derived from the specification text alone.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
SCRIPT = VECTORS / "independent.py"
ALLOWED_IMPORTS = {"__future__", "ipaddress", "json", "sys", "pathlib", "typing", "cryptography"}


def _run(*args: Path) -> subprocess.CompletedProcess[str]:
    # -I: no PYTHONPATH, no script or working directory on sys.path, so nothing of the repository leaks in
    return subprocess.run([sys.executable, "-I", str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd="/")


def test_the_script_imports_nothing_of_shallot() -> None:
    tree = ast.parse(SCRIPT.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0 and node.module is not None
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "__import__":
            pytest.fail("dynamic import in the independent script")
    assert roots <= ALLOWED_IMPORTS, roots - ALLOWED_IMPORTS
    assert "importlib" not in SCRIPT.read_text()


def test_independent_implementation_reproduces_every_vector() -> None:
    res = _run()
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert lines[-1] == "all vectors reproduced"
    checked = {line.split(" ", 1)[1] for line in lines if line.startswith("ok ")}
    # every value of both files, by name
    protocol = json.loads((VECTORS / "protocol_v1.json").read_text())
    build = json.loads((VECTORS / "circuit_build_v1.json").read_text())
    for section in ("keys", "descriptor", "transport_packet", "cookie_reply", "first_relay_cell"):
        for name in protocol[section]["expected"]:
            assert f"{section}.{name}" in checked, name
    assert {f"nk.{n}" for n in protocol["nk_handshake"]["expected"]} <= checked
    assert {"one_hop.slot0", "one_hop.reply"} | {f"one_hop.{n}" for n in
                                                 protocol["one_hop_build"]["expected"]["hop_keys"]} <= checked
    for name, values in build["expected"].items():
        for k in range(len(values)):
            assert f"build.{name}[{k}]" in checked, (name, k)


@pytest.mark.parametrize(("which", "path"), [
    ("circuit_build_v1.json", ("expected", "hop_keys", 1, "fwd_body")),
    ("circuit_build_v1.json", ("expected", "create_slots", 2)),
    ("circuit_build_v1.json", ("expected", "backward_cells", 0)),
    ("protocol_v1.json", ("nk_handshake", "expected", "k2")),
    ("protocol_v1.json", ("cookie_reply", "expected", "cookie_reply")),
    ("protocol_v1.json", ("descriptor", "expected", "encoded")),
])
def test_the_script_fails_on_a_vector_one_byte_off(tmp_path: Path, which: str, path: tuple) -> None:
    """Control: the comparison is real; one changed byte anywhere makes the script say where and fail."""
    files = {name: json.loads((VECTORS / name).read_text()) for name in ("protocol_v1.json", "circuit_build_v1.json")}
    node = files[which]
    for key in path[:-1]:
        node = node[key]
    value = node[path[-1]]
    node[path[-1]] = value[:-2] + format(int(value[-2:], 16) ^ 0x01, "02x")
    for name, content in files.items():
        (tmp_path / name).write_text(json.dumps(content))
    res = _run(tmp_path / "protocol_v1.json", tmp_path / "circuit_build_v1.json")
    assert res.returncode == 1, res.stdout
    assert res.stdout.splitlines()[-1].startswith("MISMATCH"), res.stdout[-500:]
