"""Messages with extreme values in every field, generated from the message definitions.

For a message type, `variants(base)` walks get_fields_and_field_types() recursively (nested messages
such as header.stamp included) and yields copies of `base` with one leaf field set to one extreme
value of its type: integer min/max (and values just past the enums of uint8 fields), NaN/inf/huge/
tiny floats, empty/huge strings and strings of odd code points, empty/huge sequences and sequences
of extreme elements. Last comes one message with every leaf at an extreme at once. `base` should be
a good message, so that every variant differs from something the receiver accepts in one place.

rclpy cannot publish invalid UTF-8 (strings are str), so the odd strings are valid code points the
receiver may not expect: NUL, BOM, non-characters, the last code point, right-to-left override.
"""

from __future__ import annotations

import array
import copy
import math
import re
from typing import Any, Iterator

HUGE = 1 << 15          # elements of a huge string or sequence
ODD_STRINGS = ["", "\u0000", "a\u0000b", "\ufeff\ufffe\uffff", "\U0010ffff\U0001f916", "\u202eevil\u202c",
               "%s%n{0}{}\n\r\t\x1b[2J", "../../etc/passwd", "x" * 129, "y" * HUGE]

_INT_RANGES = {"int8": (-(1 << 7), (1 << 7) - 1), "int16": (-(1 << 15), (1 << 15) - 1),
               "int32": (-(1 << 31), (1 << 31) - 1), "int64": (-(1 << 63), (1 << 63) - 1),
               "uint8": (0, 255), "octet": (0, 255), "byte": (0, 255), "char": (0, 255), "uint16": (0, (1 << 16) - 1),
               "uint32": (0, (1 << 32) - 1), "uint64": (0, (1 << 64) - 1)}
_FLOAT_MAX = {"float": 3.4028234663852886e38, "double": 1.7976931348623157e308}
_FLOAT_TINY = {"float": 1.401298464324817e-45, "double": 5e-324}
_ARRAY_CODES = {"float": "f", "double": "d", "int8": "b", "uint8": "B", "int16": "h", "uint16": "H", "int32": "i",
                "uint32": "I", "int64": "q", "uint64": "Q"}
_SEQ = re.compile(r"^sequence<([a-z0-9_/]+)(?:, \d+)?>$")
_FIXED = re.compile(r"^([a-z0-9_/]+)\[(\d+)\]$")
_BOUNDED_STR = re.compile(r"^w?string<=(\d+)$")


def scalar_extremes(t: str) -> list[Any]:
    if t == "boolean":
        return [True, False]
    if t in _INT_RANGES:
        lo, hi = _INT_RANGES[t]
        vals = [lo, hi, 1 if lo == 0 else -1]
        if t in ("uint8", "octet", "byte", "char"):
            vals += [4, 5, 99, 254]        # one past every enum of this package's messages, and far past
        return vals
    if t in _FLOAT_MAX:
        m = _FLOAT_MAX[t]
        return [math.nan, math.inf, -math.inf, m, -m, _FLOAT_TINY[t], -0.0]
    if t in ("string", "wstring"):
        return list(ODD_STRINGS)
    if m := _BOUNDED_STR.match(t):
        n = int(m.group(1))
        return ["", "\U0010ffff" * n, "\u0000" * min(n, 4)]
    raise KeyError(t)


def _huge_sequence(t: str) -> Any:
    if t in ("uint8", "octet", "byte", "char"):
        return bytes(HUGE * 4)
    if t in _ARRAY_CODES:
        return array.array(_ARRAY_CODES[t], bytes(HUGE * array.array(_ARRAY_CODES[t]).itemsize))
    if t == "boolean":
        return [False] * HUGE
    if t in ("string", "wstring"):
        return ["s"] * (HUGE // 16)
    return None


def _sequence_values(t: str, fixed: int | None) -> list[Any]:
    """Whole-sequence values for a field of element type t (fixed: the length of a fixed array)."""
    try:
        ex = scalar_extremes(t)
    except KeyError:
        return []                               # a sequence of messages: left alone
    if fixed is not None:
        return [[e] * fixed for e in ex]
    out: list[Any] = [[], ex, [ex[0]], [ex[1]] * 64]
    huge = _huge_sequence(t)
    if huge is not None:
        out.append(huge)
    return out


def leaf_values(field_type: str) -> list[Any] | None:
    """Extreme values for one field, or None when the field is a nested message."""
    if m := _SEQ.match(field_type):
        return _sequence_values(m.group(1), None)
    if m := _FIXED.match(field_type):
        return _sequence_values(m.group(1), int(m.group(2)))
    try:
        return scalar_extremes(field_type)
    except KeyError:
        return None


def leaves(msg: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], list[Any]]]:
    """(path, extreme values) for every leaf field of msg, nested messages walked."""
    for name, ftype in msg.get_fields_and_field_types().items():
        vals = leaf_values(ftype)
        value = getattr(msg, name)
        if isinstance(value, list) and value and hasattr(value[0], "get_fields_and_field_types"):
            for i, elem in enumerate(value):          # a sequence of messages: each element walked
                yield from leaves(elem, prefix + (name, i))
        elif vals is None:
            yield from leaves(value, prefix + (name,))
        elif vals:
            yield prefix + (name,), vals


def _set(msg: Any, path: tuple[str, ...], value: Any) -> None:
    for name in path[:-1]:
        msg = msg[name] if isinstance(name, int) else getattr(msg, name)
    setattr(msg, path[-1], value)


def variants(base: Any) -> Iterator[tuple[str, Any]]:
    """(description, message): one extreme value in one field per message, then all at once."""
    all_at_once = copy.deepcopy(base)
    for path, vals in leaves(base):
        for i, v in enumerate(vals):
            m = copy.deepcopy(base)
            _set(m, path, v)
            yield f"{'.'.join(map(str, path))}[{i}]", m
        _set(all_at_once, path, vals[min(1, len(vals) - 1)])
    yield "all fields extreme", all_at_once


def count_variants(base: Any) -> int:
    return sum(len(v) for _, v in leaves(base)) + 1


def largest_field(msg: Any) -> int:
    """Length of the longest string or sequence field of msg, nested messages included."""
    best = 0
    for name, ftype in msg.get_fields_and_field_types().items():
        v = getattr(msg, name)
        if isinstance(v, list) and v and hasattr(v[0], "get_fields_and_field_types"):
            best = max([best, len(v)] + [largest_field(e) for e in v])
        elif leaf_values(ftype) is None:
            best = max(best, largest_field(v))
        elif hasattr(v, "__len__"):
            best = max(best, len(v))
    return best
