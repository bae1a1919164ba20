"""Message authentication between robots and the server, free of ROS.

Any process on a DDS domain can publish on any topic. Without authentication a stranger could
answer a robot's question with its own image, reject a genuine request, pause every robot, or make
a controller execute its actions. Each robot therefore shares one secret key with the server
(a file per robot, readable only by its owner). Every message between them carries

    stamp_ns  the sender's wall clock (a freshness window bounds replays in time),
    mac       HMAC-SHA256 over the message's canonical bytes (the stamp included, and the name of
              the robot whose key signed it), truncated to its first 16 bytes.

Which key: always the robot's whose topic the message travels on. Every receiver knows that robot
from the topic it subscribed to, so the key's name is not sent; it is part of the bytes the MAC
covers (a message signed for one robot never verifies as another's, whatever keys they hold).

Replays: a replayed message is an exact copy, MAC included. The receiver remembers the MACs it
accepted while their stamps are inside the window and refuses a second copy. Two different genuine
messages never share a MAC (2^-128), even with equal stamps, so no nonce is needed to tell them
apart; a changed stamp is a changed MAC, which a replayer without the key cannot make.

Why 16 bytes: a MAC is checked online, so a forger must guess: each guess is one message the
receiver drops and counts, and a 128-bit tag leaves 2^-128 per guess. NIST SP 800-107 (Rev. 1,
section 5.3.4) allows truncating an HMAC tag to as few as 64 bits for such uses; the other 16
bytes of SHA-256 are 16 bytes more on every message for no security anyone could use.

The receiver verifies before it looks at anything else and drops what fails, counted per robot and
reason. Only standard primitives are used (hmac, hashlib, secrets); comparison is constant-time.
Clocks of robot and server must agree to within the window (NTP/chrony keep hosts within
milliseconds; the default window is 10 s).

How a ROS message becomes canonical bytes lives beside the nodes (edge_vlm_ros.msg_auth); this
module holds keys, the MAC, freshness and replay state.
"""

from __future__ import annotations

import collections
import enum
import hashlib
import hmac
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Mapping
from pathlib import Path

KEY_BYTES = 32
MAC_BYTES = 16          # HMAC-SHA256 truncated (see above)
_ID_RE = re.compile(r"^[A-Za-z0-9_]{1,128}$")   # a ROS namespace component: safe as a file name too


class Verdict(str, enum.Enum):
    """What the receiver concluded about a message."""

    OK = "ok"
    UNSIGNED = "unsigned"            # no MAC at all
    UNKNOWN_KEY = "unknown_key"      # this receiver holds no key for the topic's robot
    BAD_MAC = "bad_mac"              # forged, altered, or signed with another robot's key
    STALE = "stale"                  # stamp outside the freshness window
    REPLAY = "replay"                # this MAC was accepted once already inside the window

    @property
    def accepted(self) -> bool:
        return self is Verdict.OK


def default_keys_dir(environ: Mapping[str, str] | None = None) -> Path:
    """$EDGE_VLM_KEYS_DIR, else $XDG_CONFIG_HOME/edge_vlm_ros/keys (~/.config/edge_vlm_ros/keys), read
    from `environ` (default: this process's environment; a launcher passes the one its children get)."""
    environ = os.environ if environ is None else environ
    env = environ.get("EDGE_VLM_KEYS_DIR")
    if env:
        return Path(env)
    home = environ.get("HOME") or os.path.expanduser("~")
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    return Path(base) / "edge_vlm_ros" / "keys"


def resolve_keys_dir(keys_dir: str | os.PathLike | None) -> Path:
    return Path(keys_dir) if keys_dir else default_keys_dir()


def _check_id(robot_id: str) -> None:
    if not _ID_RE.match(robot_id):
        raise ValueError(f"robot id {robot_id!r} cannot name a key: use 1..128 of [A-Za-z0-9_]")


def key_path(keys_dir: str | os.PathLike | None, robot_id: str) -> Path:
    _check_id(robot_id)
    return resolve_keys_dir(keys_dir) / f"{robot_id}.key"


def create_key(keys_dir: str | os.PathLike | None, robot_id: str, overwrite: bool = False) -> Path:
    """Write a new random key for `robot_id` (mode 0600 in a 0700 directory). Returns its path.

    An existing key is kept unless `overwrite` (rotating a key means copying the new file to the
    robot and the server)."""
    path = key_path(keys_dir, robot_id)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.exists() and not overwrite:
        return path
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, (secrets.token_hex(KEY_BYTES) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    if overwrite:
        os.replace(tmp, path)
        return path
    # Two processes creating the same robot's key at once (a launcher and a node it started, two
    # launchers) must end with one key both use: link() publishes only if nothing is there yet,
    # and the loser keeps the winner's key instead of replacing the key the winner already loaded.
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    except OSError:
        # a file system without hard links: publish by rename unless a key appeared meanwhile
        if not path.exists():
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def ensure_keys(keys_dir: str | os.PathLike | None, robot_ids: list[str]) -> list[Path]:
    """Create the keys that are missing (never replaces one); returns the paths created."""
    created = []
    for r in robot_ids:
        if not key_path(keys_dir, r).exists():
            created.append(create_key(keys_dir, r))
    return created


def load_key(keys_dir: str | os.PathLike | None, robot_id: str) -> bytes:
    """The key of `robot_id`. Refuses a missing, malformed, or group/world-accessible key file."""
    path = key_path(keys_dir, robot_id)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no key for robot {robot_id!r} at {path}: create one with "
            f"`python -m edge_vlm_ros.tools.keys create --robots {robot_id} --dir {path.parent}` and copy it "
            f"to the robot and the server (or run with auth:=false, which lets any process on the DDS "
            f"domain forge messages)") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PermissionError(f"key file {path} is accessible by group or others (mode "
                              f"{stat.S_IMODE(st.st_mode):o}): run `chmod 600 {path}`")
    text = path.read_text().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"key file {path} does not hold hex digits") from None
    if len(key) < 16:
        raise ValueError(f"key file {path} holds {len(key)} bytes; at least 16 are needed")
    return key


def compute_mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()[:MAC_BYTES]


def is_unsigned(mac: bytes) -> bool:
    """True for an absent MAC: empty, or the all-zero value of a fixed-size field left unset."""
    return not any(mac)


_stamp_lock = threading.Lock()
_last_stamp = 0


def new_stamp() -> int:
    """The wall clock in ns, strictly increasing within this process: two messages signed here never
    share a stamp, so even two identical messages (a repeated Cancel) have different MACs."""
    global _last_stamp
    with _stamp_lock:
        _last_stamp = max(time.time_ns(), _last_stamp + 1)
        return _last_stamp


class ReplayGuard:
    """Freshness window plus a bounded cache of the MACs accepted recently, per key.

    A MAC is remembered while its stamp is inside the window. When a key's cache is full, the
    oldest entry is dropped and its stamp becomes a floor: anything not newer than the floor is
    refused, so a forgotten MAC can never be replayed (the cost is refusing reordered messages
    older than the floor, which only a flood of more than `capacity` messages per window causes).
    """

    def __init__(self, max_age_s: float, capacity: int = 4096,
                 clock=time.time_ns) -> None:
        if max_age_s <= 0 or capacity < 1:
            raise ValueError(f"max_age_s={max_age_s}, capacity={capacity}")
        self.max_age_ns = int(max_age_s * 1e9)
        self.capacity = capacity
        self.clock = clock
        self._seen: dict[str, collections.OrderedDict[bytes, int]] = {}
        self._floor: dict[str, int] = {}

    def check(self, key_id: str, stamp_ns: int, tag: bytes) -> Verdict:
        """`tag`: the message's (verified) MAC, which identifies it."""
        now = self.clock()
        if abs(now - stamp_ns) > self.max_age_ns:
            return Verdict.STALE
        seen = self._seen.setdefault(key_id, collections.OrderedDict())
        tag = bytes(tag)
        if tag in seen or stamp_ns <= self._floor.get(key_id, -1):
            return Verdict.REPLAY
        horizon = now - self.max_age_ns
        while seen and next(iter(seen.values())) < horizon:
            seen.popitem(last=False)
        while len(seen) >= self.capacity:
            _, old = seen.popitem(last=False)
            self._floor[key_id] = max(self._floor.get(key_id, -1), old)
        seen[tag] = stamp_ns
        return Verdict.OK


class Authenticator:
    """Signs and verifies for a set of robot keys. Thread-safe for concurrent callbacks."""

    def __init__(self, keys: dict[str, bytes], max_age_s: float = 10.0, replay_capacity: int = 4096) -> None:
        self.keys = dict(keys)
        self.guard = ReplayGuard(max_age_s, replay_capacity)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, keys_dir: str | os.PathLike | None, robots: list[str], max_age_s: float = 10.0) -> "Authenticator":
        return cls({r: load_key(keys_dir, r) for r in robots}, max_age_s)

    def mac(self, key_id: str, data: bytes) -> bytes:
        key = self.keys.get(key_id)
        if key is None:
            raise KeyError(f"no key for {key_id!r} (holding {sorted(self.keys)})")
        return compute_mac(key, data)

    def verify(self, key_id: str, stamp_ns: int, data: bytes, mac: bytes) -> Verdict:
        """`key_id`: the robot whose topic the message came on; `data` its canonical bytes, which
        cover key_id and the stamp."""
        if is_unsigned(mac):
            return Verdict.UNSIGNED
        key = self.keys.get(key_id)
        if key is None:
            return Verdict.UNKNOWN_KEY
        return self.verify_mac(key_id, stamp_ns, compute_mac(key, data), mac)

    def verify_mac(self, key_id: str, stamp_ns: int, expected_mac: bytes, mac: bytes) -> Verdict:
        """As verify, with the MAC of the canonical bytes already computed (streamed) by the caller."""
        if is_unsigned(mac):
            return Verdict.UNSIGNED
        if key_id not in self.keys:
            return Verdict.UNKNOWN_KEY
        if len(mac) != MAC_BYTES or not hmac.compare_digest(expected_mac, bytes(mac)):
            return Verdict.BAD_MAC
        # Only a message with a valid MAC may enter the replay cache: forgeries cannot fill it.
        with self._lock:
            return self.guard.check(key_id, stamp_ns, mac)
