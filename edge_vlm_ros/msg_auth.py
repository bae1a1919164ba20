"""Signing and verifying the package's messages (the ROS side of edge_vlm_ros.core.auth).

Canonical bytes: the message type's name, then every field in definition order, each encoded by its
declared type (fixed-width little-endian numbers, length-prefixed strings and sequences, nested
messages recursively), with `auth.mac` left out and, in its place, the name of the robot whose key
signs it (the topic's robot: every receiver knows it, so it is covered, not sent). They are computed from the field values, not from
the middleware's serialization, so a robot on Fast DDS and a server on Cyclone DDS (or another
distribution) agree on them.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import struct
import time
from typing import Any

import numpy as np

from .core.auth import MAC_BYTES, Authenticator, Verdict, is_unsigned, new_stamp

LOG = logging.getLogger(__name__)

_SCALARS = {
    "boolean": "<?", "octet": "<B", "byte": "<B", "char": "<B", "uint8": "<B", "int8": "<b",
    "uint16": "<H", "int16": "<h", "uint32": "<I", "int32": "<i", "uint64": "<Q", "int64": "<q",
    "float": "<f", "double": "<d", "float32": "<f", "float64": "<d",
}
_NP = {"boolean": "<u1", "octet": "<u1", "byte": "<u1", "char": "<u1", "uint8": "<u1", "int8": "<i1",
       "uint16": "<u2", "int16": "<i2", "uint32": "<u4", "int32": "<i4", "uint64": "<u8", "int64": "<i8",
       "float": "<f4", "double": "<f8", "float32": "<f4", "float64": "<f8"}


def _u32(n: int) -> bytes:
    return struct.pack("<I", n)


class _Sink:
    """Where canonical bytes go: small fields are gathered, large arrays are passed on without a
    copy (a megabyte of features goes straight from the message's buffer into the MAC)."""

    def __init__(self, update) -> None:
        self._update = update
        self._buf = bytearray()

    def write(self, data) -> None:
        if len(data) >= 4096:
            self.flush()
            self._update(data)
        else:
            self._buf += data

    def flush(self) -> None:
        if self._buf:
            self._update(bytes(self._buf))
            self._buf.clear()


def _element_type(ftype: str) -> str | None:
    """'sequence<float>' / 'sequence<uint8, 10>' / 'float[3]' -> 'float'; None for a non-array."""
    if ftype.startswith("sequence<") and ftype.endswith(">"):
        return ftype[len("sequence<"):-1].split(",")[0].strip()
    if ftype.endswith("]") and "[" in ftype:
        return ftype[: ftype.index("[")]
    return None


def _encode_str(value: str, out: _Sink) -> None:
    b = value.encode("utf-8", "surrogatepass")
    out.write(_u32(len(b)))
    out.write(b)


def _encode_value(value: Any, ftype: str, out: _Sink) -> None:
    if ftype in _SCALARS:
        out.write(struct.pack(_SCALARS[ftype], value))
        return
    if ftype.startswith(("string", "wstring")):
        _encode_str(value, out)
        return
    elem = _element_type(ftype)
    if elem is not None:
        if elem in _NP:
            if isinstance(value, (bytes, bytearray, memoryview)) or (hasattr(value, "typecode") and value.typecode == "B"):
                arr = np.frombuffer(value, np.uint8)
            else:
                arr = np.asarray(value)
            arr = np.ascontiguousarray(arr.astype(_NP[elem], copy=False))
            out.write(_u32(len(arr)))
            out.write(memoryview(arr).cast("B"))
            return
        items = list(value)
        out.write(_u32(len(items)))
        for v in items:
            _encode_value(v, elem, out)
        return
    _encode_msg(value, out, None)               # a nested message type, e.g. std_msgs/Header


def _encode_msg(msg: Any, out: _Sink, key_id: str | None) -> None:
    for name, ftype in msg.get_fields_and_field_types().items():
        value = getattr(msg, name)
        if key_id is not None and name == "auth":
            _encode_str(key_id, out)
            out.write(struct.pack("<q", value.stamp_ns))
            continue
        _encode_value(value, ftype, out)


def _feed(msg: Any, key_id: str, update) -> None:
    cls = type(msg)
    sink = _Sink(update)
    sink.write(f"{cls.__module__.split('.')[0]}/msg/{cls.__name__}".encode() + b"\0")
    _encode_msg(msg, sink, key_id)
    sink.flush()


def canonical_bytes(msg: Any, key_id: str) -> bytes:
    """The bytes a MAC covers: the type name, every field except auth.mac, and in auth's place the
    signing robot's name and the stamp."""
    parts: list[bytes] = []
    _feed(msg, key_id, lambda b: parts.append(bytes(b)))
    return b"".join(parts)


def message_mac(key: bytes, msg: Any, key_id: str) -> bytes:
    """HMAC-SHA256 of msg's canonical bytes, streamed (no copy of large arrays), truncated to
    MAC_BYTES (core/auth.py says why)."""
    h = hmac.new(key, digestmod=hashlib.sha256)
    _feed(msg, key_id, h.update)
    return h.digest()[:MAC_BYTES]


def sign_with_key(msg: Any, key_id: str, key: bytes, stamp_ns: int | None = None) -> Any:
    """Fill msg.auth (fresh stamp, MAC) with robot `key_id`'s `key`; returns msg. Publish it on
    that robot's topics: receivers verify under the topic's robot. `stamp_ns`: a stamp the message
    already counts from (VisualFeatures.deadline_ms), taken from new_stamp() by the caller."""
    msg.auth.stamp_ns = new_stamp() if stamp_ns is None else int(stamp_ns)
    msg.auth.mac = np.frombuffer(message_mac(key, msg, key_id), np.uint8)   # uint8[16]: an array, not bytes
    return msg


_WHY = {
    Verdict.UNSIGNED: " (no MAC: the sender runs with auth off?)",
    Verdict.BAD_MAC: " (forged, altered, or signed with another robot's key: is the right key file on "
                     "both hosts?)",
    Verdict.STALE: " (stamp outside the freshness window: are both hosts' clocks synchronized?)",
    Verdict.REPLAY: " (a copy of a message already accepted)",
}


class MessageAuth:
    """One per node: signs what it publishes, verifies what it receives, counts what it drops.

    With `enabled` false nothing is signed or checked (an explicit choice the node logs loudly).
    """

    def __init__(self, auth: Authenticator | None, log_period_s: float = 5.0) -> None:
        self.auth = auth
        self.enabled = auth is not None
        self.dropped: collections.Counter[tuple[str, str]] = collections.Counter()   # (robot, reason) -> n
        self.accepted = 0
        self._log_period_s = log_period_s
        self._last_log: dict[tuple[str, str], float] = {}

    def sign(self, msg: Any, key_id: str, stamp_ns: int | None = None) -> Any:
        if self.enabled:
            assert self.auth is not None
            sign_with_key(msg, key_id, self.auth.keys[key_id], stamp_ns)
        return msg

    def verify(self, msg: Any, expected_key_id: str) -> Verdict:
        if not self.enabled:
            return Verdict.OK
        assert self.auth is not None
        a = msg.auth
        key = self.auth.keys.get(expected_key_id)
        mac = bytes(a.mac)
        if is_unsigned(mac) or key is None:
            return self.auth.verify(expected_key_id, int(a.stamp_ns), b"", mac)
        try:
            expected = message_mac(key, msg, expected_key_id)
        except Exception as e:   # a field value the encoder cannot take: not a message we signed
            LOG.debug("canonical bytes failed: %s", e)
            return Verdict.BAD_MAC
        return self.auth.verify_mac(expected_key_id, int(a.stamp_ns), expected, mac)

    def check(self, msg: Any, expected_key_id: str, what: str, logger: Any = None) -> bool:
        """True if `msg` may be used. Otherwise counts and (throttled) logs the drop."""
        verdict = self.verify(msg, expected_key_id)
        if verdict.accepted:
            self.accepted += 1
            return True
        key = (expected_key_id, verdict.value)
        self.dropped[key] += 1
        now = time.monotonic()
        if now - self._last_log.get(key, -1e9) >= self._log_period_s:
            self._last_log[key] = now
            text = (f"dropped {what} on robot {expected_key_id!r}'s topic: {verdict.value}"
                    f"{_WHY.get(verdict, '')}; {self.dropped[key]} such drops so far")
            (logger.warning if logger is not None else LOG.warning)(text)
        return False

    def dropped_by_robot(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (robot, reason), n in sorted(self.dropped.items()):
            out.setdefault(robot, {})[reason] = n
        return out


def make_message_auth(enabled: bool, keys_dir: str, robots: list[str], max_age_s: float,
                      logger: Any = None) -> MessageAuth:
    """Load the robots' keys (FileNotFoundError/PermissionError with the fix if missing) or, when
    disabled, say loudly what that means."""
    if not enabled:
        text = ("message authentication is OFF (auth: false): any process on this DDS domain can forge "
                "requests, answers, flow control and action chunks")
        (logger.warning if logger is not None else LOG.warning)(text)
        return MessageAuth(None)
    return MessageAuth(Authenticator.load(keys_dir, robots, max_age_s))
