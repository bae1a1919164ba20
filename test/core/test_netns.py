"""The shaped veth link between two namespaces: configuration, DDS environment, and (as root) a
real transfer through a 1 Mbit/s link that must take about as long as the rate says."""

from __future__ import annotations

import os
import subprocess

import pytest

from edge_vlm_ros.bag.netns import (
    LinkConfig,
    NetnsLink,
    dds_env,
    expected_tcp_transfer_s,
    find_link_script,
    measure_tcp_transfer,
    netns_supported,
)


def test_link_config_validation() -> None:
    cfg = LinkConfig(ns_a="robot", ns_b="server", rate_kbit=250, net="198.19.7")
    assert (cfg.addr_a, cfg.addr_b) == ("198.19.7.1", "198.19.7.2")
    with pytest.raises(ValueError, match="'10.0.0'"):
        LinkConfig(net="10.0.0")  # never a range a real network might use
    with pytest.raises(ValueError, match="198.18.N.*'198.18.300'"):
        LinkConfig(net="198.18.300")
    with pytest.raises(ValueError, match="rate_kbit.*0"):
        LinkConfig(rate_kbit=0)
    with pytest.raises(ValueError, match="'a b'"):
        LinkConfig(ns_a="a b")
    with pytest.raises(ValueError, match="differ"):
        LinkConfig(ns_a="x", ns_b="x")


def test_dds_env() -> None:
    env = dds_env("198.18.0.2", base={"ROS_LOCALHOST_ONLY": "1", "PATH": "/bin"}, domain_id=42)
    assert env["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "SUBNET"
    assert env["ROS_STATIC_PEERS"] == "198.18.0.2"
    assert env["ROS_DOMAIN_ID"] == "42" and env["PATH"] == "/bin"
    assert env["FASTDDS_BUILTIN_TRANSPORTS"] == "UDPv4"
    assert "ROS_LOCALHOST_ONLY" not in env
    with pytest.raises(ValueError, match="300"):
        dds_env("198.18.0.2", domain_id=300)
    link = NetnsLink(LinkConfig(ns_a="r", ns_b="s"))
    assert link.env("r", base={})["ROS_STATIC_PEERS"] == "198.18.0.2"
    assert link.env("s", base={})["ROS_STATIC_PEERS"] == "198.18.0.1"
    assert link.command("s", ["true"]) == ["ip", "netns", "exec", "s", "true"]
    with pytest.raises(ValueError, match="'other'"):
        link.command("other", ["true"])


def test_expected_transfer_time() -> None:
    # 250 kB at 1 Mbit/s: 2.0 s of payload, plus 66 header bytes per 1448-byte segment.
    assert expected_tcp_transfer_s(250_000, 1000) == pytest.approx(2.0 + 173 * 66 * 8 / 1e6)


def test_script_parses() -> None:
    assert subprocess.run(["bash", "-n", str(find_link_script())]).returncode == 0


def _host_links() -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return sorted(line.split(":")[1].strip() for line in out.splitlines())


def test_shaped_link_transfer() -> None:
    ok, why = netns_supported()
    if not ok:
        pytest.skip(why)
    pid = os.getpid()
    cfg = LinkConfig(ns_a=f"evrt_a_{pid}", ns_b=f"evrt_b_{pid}", rate_kbit=1000, net="198.19.200")
    link = NetnsLink(cfg)
    host_before = _host_links()
    try:
        link.up()
        link.up()  # idempotent
        assert _host_links() == host_before, "the host's interfaces must not change"
        up, status = link.status()
        assert up, status
        assert "rate 1Mbit" in status

        nbytes = 250_000
        took = measure_tcp_transfer(link, nbytes, timeout_s=30.0)
        expected = expected_tcp_transfer_s(nbytes, cfg.rate_kbit)  # ~2.09 s
        # Generous: the first 4 kB burst goes at once, and a busy machine only ever adds time.
        assert 0.85 * expected < took < 2.0 * expected, f"{nbytes} B took {took:.3f} s, expected ~{expected:.3f} s"
        # the other direction is shaped too
        back = measure_tcp_transfer(link, nbytes // 2, reverse=True, timeout_s=30.0)
        expected = expected_tcp_transfer_s(nbytes // 2, cfg.rate_kbit)
        assert 0.8 * expected < back < 2.0 * expected, f"back took {back:.3f} s, expected ~{expected:.3f} s"
    finally:
        link.down()
    up, status = link.status()
    assert not up and "namespace missing" in status
    assert _host_links() == host_before
