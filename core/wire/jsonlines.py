"""JSON lines from a peer we do not fully trust (pure): the framing of the control API (docs/PROTOCOL.md §9.2)
and of the privileged helper (§9.6).

``LineFramer`` cuts a byte stream into lines of at most ``max_line`` bytes.  A longer line is reported once,
as TOO_LONG, and everything up to its newline is thrown away: its tail is never read as a request of its
own, and the framer never holds more than ``max_line`` bytes.

``loads`` decodes one line: strict UTF-8, at most ``MAX_DEPTH`` nested arrays/objects (counted before the
parser runs, so a 30 000-deep line is refused in linear time instead of exhausting the parser's
recursion), then ``json.loads``.  Every failure is a ValueError.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any, Final

MAX_DEPTH = 32  # our deepest message (a snapshot) nests 5 levels


class TooLong:
    """The marker of a line that was longer than the limit (and was thrown away)."""

    def __repr__(self) -> str:
        return "TOO_LONG"


TOO_LONG: Final = TooLong()


class LineFramer:
    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._buf = bytearray()
        self._discarding = False  # inside a line that was already reported TOO_LONG

    def feed(self, data: bytes) -> list[bytes | TooLong]:
        """The complete lines in ``data`` (without their newline), in order; TOO_LONG for each over-long one."""
        out: list[bytes | TooLong] = []
        start = 0
        while start < len(data):
            end = data.find(b"\n", start)
            piece = data[start:] if end < 0 else data[start:end]
            start = len(data) if end < 0 else end + 1
            if self._discarding:
                if end >= 0:
                    self._discarding = False
                continue
            if len(self._buf) + len(piece) > self.max_line:
                out.append(TOO_LONG)
                self._buf.clear()
                self._discarding = end < 0  # the rest of this line is still to come: throw it away too
                continue
            self._buf += piece
            if end >= 0:
                out.append(bytes(self._buf))
                self._buf.clear()
        return out

    @property
    def pending(self) -> int:
        """Bytes of an unfinished line held (at most max_line)."""
        return len(self._buf)


# a string runs to its closing quote or to the end of the line, so this never backtracks (linear time)
_STRING_OR_BRACKET = re.compile(r'"(?:[^"\\]|\\.?)*(?:"|\Z)|[^\[\]{}"]+', re.DOTALL)
_DELTA = {"[": 1, "{": 1, "]": -1, "}": -1}


def depth(text: str) -> int:
    """The deepest nesting of arrays/objects in ``text``; brackets inside strings do not count (nor those
    after an unterminated string: the parser stops at that string before it reaches them)."""
    brackets = _STRING_OR_BRACKET.sub("", text)
    return max(accumulate(_DELTA[c] for c in brackets), default=0)


def loads(line: bytes, max_depth: int = MAX_DEPTH) -> Any:
    """One JSON value from a line; ValueError when it is not UTF-8, nested deeper than ``max_depth`` or not JSON."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None
    if depth(text) > max_depth:
        raise ValueError(f"nested deeper than {max_depth}")
    try:
        return json.loads(text)
    except RecursionError:  # cannot happen below max_depth; never a crash if it does
        raise ValueError("nested too deep") from None
