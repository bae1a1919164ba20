"""Decompression bombs and oversize messages over real DDS, against a cloud-only (split none, jpeg) server.

robot_0's feature topic gets a stream of hostile VisualFeatures: a ~670-byte JPEG whose frame header
declares 16000 x 16000 (768 MB if decoded), a 6000 x 6000 PNG sent as codec jpeg, a raw image
declaring 16000 x 16000, and payloads beyond the server's max_payload_bytes. Each must be REJECTED
with its reason before anything is decoded: the server process's peak RSS (VmHWM) stays within a
stated bound, and robot_1, asking questions meanwhile, keeps getting OK answers with a median
latency like the one it had before the attack.
"""

import statistics
import threading
import time
import uuid

import cv2
import numpy as np

from edge_vlm_ros import qos, topics
from edge_vlm_ros.conversions import features_to_msg
from edge_vlm_ros.core.auth import load_key
from edge_vlm_ros.core.types import EncodedTensor, FeaturePacket, Outcome
from edge_vlm_ros.msg import VisualFeatures
from edge_vlm_ros.msg_auth import sign_with_key
from ros_harness import running

MB = 1024 * 1024
RSS_BOUND_MB = 150          # peak RSS growth allowed during the attack (one decoded bomb: 768 MB)
MAX_PAYLOAD = 2 * MB


def bomb_jpeg(height: int = 16000, width: int = 16000) -> bytes:
    img = np.random.RandomState(0).randint(0, 256, (8, 8, 3), np.uint8)
    b = bytearray(cv2.imencode(".jpg", img, [int(cv2.IMWRITE_JPEG_QUALITY), 50])[1].tobytes())
    i = b.index(b"\xff\xc0")
    b[i + 5:i + 7] = height.to_bytes(2, "big")
    b[i + 7:i + 9] = width.to_bytes(2, "big")
    return bytes(b)


def proc_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def publish(pub, msg, robot: str, keys_dir) -> None:
    """Every hostile message goes out here, signed with the robot's own key: what is tested is what
    the server does with authenticated but malformed messages (a robot's bug or a stolen key)."""
    pub.publish(sign_with_key(msg, robot, load_key(keys_dir, robot)))


def test_bombs_and_oversize_messages_are_rejected_without_hurting_another_robot(ros_env, tmp_path):
    overrides = {"edge": {"split_point": "none", "codec": "jpeg", "frame_wait_s": 2.0},
                 "server": {"default_max_new_tokens": 4, "max_payload_bytes": MAX_PAYLOAD, "match_ttl_s": 5.0}}
    img = np.random.RandomState(1).randint(0, 256, (64, 64, 3), np.uint8)
    png = cv2.imencode(".png", np.zeros((6000, 6000, 3), np.uint8))[1].tobytes()
    kinds = {   # name -> (encoded tensor, what the rejection reason must say)
        "bomb": (EncodedTensor("jpeg", "uint8", (64, 64, 3), bomb_jpeg()), "16000 x 16000"),
        "png": (EncodedTensor("jpeg", "uint8", (64, 64, 3), png), "not a JPEG"),
        "png-declared": (EncodedTensor("jpeg", "uint8", (6000, 6000, 3), png), "6000 x 6000"),
        "raw-declared": (EncodedTensor("image", "uint8", (16000, 16000, 3), bytes(1000)), "16000 x 16000"),
        "oversize": (EncodedTensor("jpeg", "uint8", (64, 64, 3), bytes(3 * MB)), f"limit {MAX_PAYLOAD}"),
    }
    with running(ros_env, tmp_path, 2, overrides) as (nodes, client):
        server_pid = next(p.pid for s, p in nodes.procs if s.role == "server")
        pub = client.node.create_publisher(VisualFeatures, topics.for_robot("robot_0", topics.FEATURES), qos.FEATURES)
        assert client.wait_for(lambda: pub.get_subscription_count() > 0, 30)
        time.sleep(1.5)   # the server's reader must also match this new writer (see RobotClient.wait_ready)

        def ask_latencies(n: int) -> list[float]:
            out = []
            for i in range(n):
                t0 = time.monotonic()
                a = client.ask("robot_1", img, f"what is in picture {i} ?", timeout=60)
                assert a is not None and a.outcome is Outcome.OK, a
                out.append(time.monotonic() - t0)
            return out

        warm = [client.ask("robot_1", img, "warm-up ?", timeout=60) for _ in range(2)]   # lazy loads, matching
        if not any(a is not None and a.outcome is Outcome.OK for a in warm):
            warm.append(client.ask("robot_1", img, "warm-up ?", timeout=60))
            assert warm[-1] is not None and warm[-1].outcome is Outcome.OK, warm
        before = ask_latencies(8)
        hwm_before_kb = proc_kb(server_pid, "VmHWM")
        rss_before_kb = proc_kb(server_pid, "VmRSS")

        sent: dict[str, str] = {}                          # request id -> kind
        stop = threading.Event()

        def attack() -> None:
            names = list(kinds)
            k = 0
            while not stop.is_set():
                name = names[k % len(names)]
                k += 1
                rid = uuid.uuid4().hex
                enc, _ = kinds[name]
                pkt = FeaturePacket(rid, "robot_0", "none", "", enc, time.time_ns())
                sent[rid] = name
                publish(pub, features_to_msg(pkt, time.time_ns()), "robot_0", tmp_path / "keys")
                stop.wait(0.25 if name == "oversize" else 0.03)

        attacker = threading.Thread(target=attack, daemon=True)
        attacker.start()
        try:
            time.sleep(0.5)
            during = ask_latencies(8)
        finally:
            stop.set()
            attacker.join(10)
        hwm_after_kb = proc_kb(server_pid, "VmHWM")
        rss_after_kb = proc_kb(server_pid, "VmRSS")

        def answered():
            return {a.request_id: a for _, a in list(client.answers["robot_0"])}
        assert client.wait_for(lambda: set(sent) <= set(answered()), 60), \
            f"{len(set(sent) - set(answered()))} of {len(sent)} hostile messages got no outcome"
        got = answered()
        per_kind = {name: 0 for name in kinds}
        wrong = []
        for rid, name in sent.items():
            a = got[rid]
            per_kind[name] += 1
            if not (a.outcome is Outcome.REJECTED and kinds[name][1] in a.reason):
                wrong.append((name, a.outcome.name, a.reason))

        med_before, med_during = statistics.median(before), statistics.median(during)
        growth_mb = (hwm_after_kb - hwm_before_kb) / 1024
        print(f"\nhostile messages sent: {len(sent)} {per_kind}; not rejected as expected: {len(wrong)}")
        print(f"server VmHWM {hwm_before_kb / 1024:.0f} -> {hwm_after_kb / 1024:.0f} MB (growth {growth_mb:.1f} MB, "
              f"bound {RSS_BOUND_MB}); VmRSS {rss_before_kb / 1024:.0f} -> {rss_after_kb / 1024:.0f} MB")
        print(f"robot_1 latency  before: median {med_before * 1e3:.0f} ms  {[round(x * 1e3) for x in before]}")
        print(f"robot_1 latency  during: median {med_during * 1e3:.0f} ms  {[round(x * 1e3) for x in during]}")
        assert not wrong, wrong[:5]
        assert min(per_kind.values()) >= 1, per_kind
        assert growth_mb < RSS_BOUND_MB, growth_mb
        # The machine is shared and loaded: allow noise, but not the seconds a decoded bomb costs.
        assert med_during < 2.0 * med_before + 0.25, (med_before, med_during)
        assert not nodes.poll(), nodes.poll()
