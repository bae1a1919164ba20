"""Run a robot and a server in two network namespaces joined by a rate-limited link.

A thin Python side of scripts/netns_link.sh (which does the `ip`/`tc` work and documents the tbf
parameters): bring a link up, run commands inside either namespace with the environment DDS needs
to discover its peer across the pair, measure the shaped rate, and tear everything down again,
processes started here included. Needs root; `netns_supported()` says why not when it cannot work.

    python -m edge_vlm_ros.bag.netns measure --rate-kbit 1000 --bytes 250000
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from ..processes import child_env, stop_processes

logger = logging.getLogger(__name__)

_NS_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_NET_RE = re.compile(r"^198\.(18|19)\.(\d{1,3})$")

# Bytes tbf counts per TCP segment besides the payload: Ethernet 14 + IPv4 20 + TCP 20 + the
# timestamp option 12 (Linux default). MSS on a 1500-byte MTU with timestamps: 1448.
_TCP_SEGMENT_OVERHEAD = 66
_TCP_MSS = 1448


@dataclass(frozen=True)
class LinkConfig:
    """One shaped link: namespaces, rate and addressing (see scripts/netns_link.sh)."""

    ns_a: str = "evr_robot"
    ns_b: str = "evr_server"
    rate_kbit: int = 1000  # both directions
    net: str = "198.18.0"  # the /24 inside 198.18.0.0/15: ns_a gets <net>.1, ns_b <net>.2
    burst_bytes: int = 0  # 0: the script's default, max(4096, 10 ms at the rate)
    limit_bytes: int = 0  # 0: the script's default, max(400 ms at the rate, 2 x 64 KiB + burst)

    def __post_init__(self) -> None:
        for name in (self.ns_a, self.ns_b):
            if not _NS_RE.match(name):
                raise ValueError(f"bad namespace name {name!r}: use 1-64 of [A-Za-z0-9_.-]")
        if self.ns_a == self.ns_b:
            raise ValueError(f"ns_a and ns_b must differ, both are {self.ns_a!r}")
        if not 8 <= self.rate_kbit <= 10_000_000:
            raise ValueError(f"rate_kbit must be in [8, 10000000], got {self.rate_kbit}")
        m = _NET_RE.match(self.net)
        if m is None or int(m.group(2)) > 255:
            raise ValueError(f"net must be '198.18.N' or '198.19.N' (RFC 2544 benchmark range), got {self.net!r}")
        if self.burst_bytes and self.burst_bytes < 1600:
            raise ValueError(f"burst_bytes must be 0 (default) or >= 1600, got {self.burst_bytes}")
        if self.limit_bytes < 0:
            raise ValueError(f"limit_bytes must be >= 0, got {self.limit_bytes}")

    @property
    def addr_a(self) -> str:
        return f"{self.net}.1"

    @property
    def addr_b(self) -> str:
        return f"{self.net}.2"


def find_link_script() -> Path:
    """scripts/netns_link.sh: $EDGE_VLM_NETNS_LINK, the source tree, or lib/edge_vlm_ros of an install."""
    env = os.environ.get("EDGE_VLM_NETNS_LINK")
    here = Path(__file__).resolve()
    candidates = [Path(env)] if env else []
    candidates.append(here.parents[2] / "scripts" / "netns_link.sh")
    # <prefix>/lib/pythonX.Y/site-packages/edge_vlm_ros/bag/netns.py -> <prefix>/lib/edge_vlm_ros/
    if len(here.parents) > 4:
        candidates.append(here.parents[4] / "edge_vlm_ros" / "netns_link.sh")
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"netns_link.sh not found; looked at {[str(p) for p in candidates]}")


def netns_supported() -> tuple[bool, str]:
    """Whether links can be made here, and if not, why (for pytest.skip)."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return False, "network namespaces need Linux"
    if os.geteuid() != 0:
        return False, "needs root (ip netns requires CAP_SYS_ADMIN)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"'{tool}' (iproute2) is not installed"
    try:
        find_link_script()
    except FileNotFoundError as exc:
        return False, str(exc)
    probe = f"evr_probe_{os.getpid()}"
    add = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if add.returncode != 0:
        return False, f"'ip netns add' fails here: {add.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, text=True)
    return True, ""


def dds_env(
    peer_address: str,
    *,
    base: Mapping[str, str] | None = None,
    domain_id: int | None = None,
    udp_only: bool = True,
) -> dict[str, str]:
    """The environment a ROS 2 process inside one namespace needs to find its peer in the other.

    Discovery range SUBNET (the default, LOCALHOST, would never leave the namespace) plus the peer
    as a static unicast peer. udp_only forces Fast DDS onto UDPv4: both namespaces share /dev/shm,
    and Fast DDS uses its shared-memory transport for peers it takes to be on the same host, which
    would bypass the shaped link. With the Kilted wheels it did not (5 x 300 kB went over the veth
    with and without it), but UDPv4 only removes the dependency on how that host check is made.
    FASTDDS_BUILTIN_TRANSPORTS exists from Fast DDS 2.13 (Jazzy); Humble needs an XML profile with
    useBuiltinTransports=false for the same effect.
    """
    env = dict(os.environ if base is None else base)
    env.pop("ROS_LOCALHOST_ONLY", None)  # Humble's switch; an inherited 1 would override the range
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "SUBNET"
    env["ROS_STATIC_PEERS"] = peer_address
    if udp_only:
        env["FASTDDS_BUILTIN_TRANSPORTS"] = "UDPv4"
    if domain_id is not None:
        if not 0 <= domain_id <= 232:
            raise ValueError(f"domain_id must be in [0, 232], got {domain_id}")
        env["ROS_DOMAIN_ID"] = str(domain_id)
    return env


def expected_tcp_transfer_s(nbytes: int, rate_kbit: int) -> float:
    """Time for nbytes of TCP payload through a shaper of rate_kbit, counting per-segment headers."""
    if nbytes < 0 or rate_kbit <= 0:
        raise ValueError(f"need nbytes >= 0 and rate_kbit > 0, got {nbytes}, {rate_kbit}")
    wire = nbytes + math.ceil(nbytes / _TCP_MSS) * _TCP_SEGMENT_OVERHEAD
    return wire * 8 / (rate_kbit * 1000)


class NetnsLink:
    """A shaped veth link between two namespaces; a context manager that always tears down."""

    def __init__(self, config: LinkConfig, *, script: Path | None = None) -> None:
        self.config = config
        self.script = script if script is not None else find_link_script()
        self._procs: list[subprocess.Popen[bytes]] = []

    # -- the link ----------------------------------------------------------------------------
    def _script(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", str(self.script), *args], capture_output=True, text=True)

    def up(self) -> None:
        c = self.config
        args = ["up", c.ns_a, c.ns_b, str(c.rate_kbit), "--net", c.net]
        if c.burst_bytes:
            args += ["--burst-bytes", str(c.burst_bytes)]
        if c.limit_bytes:
            args += ["--limit-bytes", str(c.limit_bytes)]
        res = self._script(*args)
        if res.returncode != 0:
            raise RuntimeError(f"netns_link.sh {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
        logger.info("%s", res.stderr.strip())

    def down(self) -> None:
        """Stop the processes started through this object (SIGINT, SIGTERM, SIGKILL), then delete
        both namespaces."""
        stop_processes(self._procs)
        self._procs.clear()
        res = self._script("down", self.config.ns_a, self.config.ns_b)
        if res.returncode != 0:
            raise RuntimeError(f"netns_link.sh down failed ({res.returncode}): {res.stderr.strip()}")

    def status(self) -> tuple[bool, str]:
        res = self._script("status", self.config.ns_a, self.config.ns_b)
        if res.returncode not in (0, 3):
            raise RuntimeError(f"netns_link.sh status failed ({res.returncode}): {res.stderr.strip()}")
        return res.returncode == 0, res.stdout

    def __enter__(self) -> NetnsLink:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.down()

    # -- running things inside ---------------------------------------------------------------
    def _check_ns(self, ns: str) -> None:
        if ns not in (self.config.ns_a, self.config.ns_b):
            raise ValueError(f"namespace {ns!r} is not part of this link ({self.config.ns_a}, {self.config.ns_b})")

    def address(self, ns: str) -> str:
        self._check_ns(ns)
        return self.config.addr_a if ns == self.config.ns_a else self.config.addr_b

    def peer_address(self, ns: str) -> str:
        self._check_ns(ns)
        return self.config.addr_b if ns == self.config.ns_a else self.config.addr_a

    def env(self, ns: str, *, base: Mapping[str, str] | None = None, domain_id: int | None = None) -> dict[str, str]:
        return dds_env(self.peer_address(ns), base=base, domain_id=domain_id)

    def command(self, ns: str, argv: Sequence[str]) -> list[str]:
        self._check_ns(ns)
        return ["ip", "netns", "exec", ns, *argv]

    def run(
        self, ns: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None, **kwargs: object
    ) -> subprocess.CompletedProcess[bytes]:
        """subprocess.run inside ns; env defaults to this side's DDS environment."""
        full_env = dict(env) if env is not None else self.env(ns)
        cmd = self.command(ns, argv)
        return subprocess.run(cmd, env=full_env, **kwargs)  # type: ignore[call-overload, no-any-return]

    def popen(
        self, ns: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None, **kwargs: object
    ) -> subprocess.Popen[bytes]:
        """subprocess.Popen inside ns, stopped again by down(); env as in run(). In its own session,
        with this process registered as its parent (processes.child_env; `ip netns exec` execs the
        command, so a child calling die_with_parent stops when this process dies)."""
        proc: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
            self.command(ns, argv), env=child_env(dict(env) if env is not None else self.env(ns)),
            start_new_session=True, **kwargs
        )
        self._procs.append(proc)
        return proc


# Stdlib only and run with `python -S`: these start in well under a second even in a venv whose
# site hooks re-execute the interpreter.
_SINK = r"""
import socket, sys
host, n = sys.argv[1], int(sys.argv[2])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, 0)); srv.listen(1)
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
got = 0
while got < n:
    chunk = conn.recv(1 << 16)
    if not chunk:
        sys.exit("sink: connection closed after %d of %d bytes" % (got, n))
    got += len(chunk)
conn.sendall(b"k"); conn.close()
"""

_SOURCE = r"""
import socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection((host, port), timeout=120)
payload = bytes(n)
t0 = time.perf_counter()
s.sendall(payload)
if s.recv(1) != b"k":
    sys.exit("source: no acknowledgement")
print(time.perf_counter() - t0, flush=True)
"""


def measure_tcp_transfer(link: NetnsLink, nbytes: int, *, reverse: bool = False, timeout_s: float = 120.0) -> float:
    """Seconds from the first byte sent in ns_a (ns_b if reverse) to the sink on the other side
    confirming all nbytes."""
    c = link.config
    src, dst = (c.ns_b, c.ns_a) if reverse else (c.ns_a, c.ns_b)
    dst_addr = link.address(dst)
    py = [sys.executable, "-S", "-c"]
    sink = link.popen(dst, [*py, _SINK, dst_addr, str(nbytes)], env=dict(os.environ), stdout=subprocess.PIPE)
    try:
        assert sink.stdout is not None
        port_line = sink.stdout.readline().decode().strip()
        if not port_line.isdigit():
            raise RuntimeError(f"sink in {dst} did not start (printed {port_line!r})")
        res = link.run(
            src,
            [*py, _SOURCE, dst_addr, port_line, str(nbytes)],
            env=dict(os.environ),
            capture_output=True,
            timeout=timeout_s,
        )
        if res.returncode != 0:
            raise RuntimeError(f"transfer failed: {res.stderr.decode().strip()}")
        sink.wait(timeout=10.0)
        return float(res.stdout.decode().strip())
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait()


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge_vlm_ros.bag.netns", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure", help="bring a link up, time a TCP transfer across it, tear it down")
    m.add_argument("--rate-kbit", type=int, default=1000)
    m.add_argument("--bytes", type=int, default=250_000)
    m.add_argument("--repeat", type=int, default=3)
    m.add_argument("--ns-a", default=f"evr_meas_a_{os.getpid()}")
    m.add_argument("--ns-b", default=f"evr_meas_b_{os.getpid()}")
    m.add_argument("--net", default="198.19.250")
    args = parser.parse_args(argv)

    ok, why = netns_supported()
    if not ok:
        print(f"cannot make links here: {why}", file=sys.stderr)
        return 2
    cfg = LinkConfig(ns_a=args.ns_a, ns_b=args.ns_b, rate_kbit=args.rate_kbit, net=args.net)
    expected = expected_tcp_transfer_s(args.bytes, args.rate_kbit)
    with NetnsLink(cfg) as link:
        runs = [measure_tcp_transfer(link, args.bytes) for _ in range(args.repeat)]
        back = measure_tcp_transfer(link, args.bytes, reverse=True)
        time.sleep(0.1)  # let the last acknowledgements through before reading the counters
        _, status = link.status()
    print(status, file=sys.stderr)
    print(json.dumps({
        "rate_kbit": args.rate_kbit,
        "bytes": args.bytes,
        "expected_s": round(expected, 4),
        "payload_only_s": round(args.bytes * 8 / (args.rate_kbit * 1000), 4),
        "measured_s": [round(t, 4) for t in runs],
        "measured_over_expected": [round(t / expected, 3) for t in runs],
        "reverse_measured_s": round(back, 4),
    }))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(_main())
