"""Bad input over real DDS: each gets its outcome and reason while a good request is still served."""

import time

import numpy as np
from sensor_msgs.msg import Image

from edge_vlm_ros import qos, topics
from edge_vlm_ros.conversions import features_to_msg, ns_to_stamp, prompt_to_msg
from edge_vlm_ros.core.codec import make_codec
from edge_vlm_ros.core.edge import EdgeEncoder
from edge_vlm_ros.core.split import load_vlm
from edge_vlm_ros.core.types import Outcome, PromptRequest, SplitPoint
from edge_vlm_ros.core.auth import load_key
from edge_vlm_ros.msg import Prompt, VisualFeatures
from edge_vlm_ros.msg_auth import sign_with_key
from edge_vlm_ros.tools.default_model import ensure
from ros_harness import running


def test_each_bad_input_gets_its_outcome_while_good_requests_are_served(ros_env, tmp_path):
    model = ensure()
    adapter = load_vlm(model)
    enc = EdgeEncoder("robot_0", SplitPoint.parse("projector"), make_codec("raw", dtype="float32"), adapter)
    img = np.random.RandomState(0).randint(0, 256, (64, 64, 3), np.uint8)
    overrides = {"edge": {"max_prompt_chars": 200, "frame_wait_s": 1.0},
                 "server": {"match_ttl_s": 2.0, "max_prompt_chars": 300, "default_max_new_tokens": 4}}
    with running(ros_env, tmp_path, 2, overrides) as (_, client):
        node = client.node
        pub_f = node.create_publisher(VisualFeatures, topics.for_robot("robot_0", topics.FEATURES), qos.FEATURES)
        pub_p = node.create_publisher(Prompt, topics.for_robot("robot_0", topics.PROMPT), qos.REQUEST)
        assert client.wait_for(lambda: pub_f.get_subscription_count() and pub_p.get_subscription_count(), 20)
        time.sleep(1.5)   # the server's readers must also match these new writers (see RobotClient.wait_ready)

        key = load_key(tmp_path / "keys", "robot_0")   # bad input from the robot itself: authenticated

        def sign(msg):
            return sign_with_key(msg, "robot_0", key)

        def send(rid, mutate=None, prompt=True, features=True, text="what is it ?"):
            if prompt:
                pub_p.publish(sign(prompt_to_msg(PromptRequest(rid, "robot_0", text, time.time_ns()))))
            if features:
                pkt = enc.encode(img, rid, time.time_ns())
                if mutate:
                    mutate(pkt)
                pub_f.publish(sign(features_to_msg(pkt, time.time_ns())))

        cases = {
            "bad-size": (dict(mutate=lambda p: setattr(p.encoded, "payload", p.encoded.payload[:-6])),
                         Outcome.REJECTED, "payload is"),
            "bad-codec": (dict(mutate=lambda p: setattr(p.encoded, "codec", "h265")), Outcome.REJECTED, "unknown codec"),
            "bad-model": (dict(mutate=lambda p: setattr(p, "model_fingerprint", "ffffffffffffffff")),
                          Outcome.REJECTED, "fingerprint"),
            "long-prompt": (dict(text="y" * 400), Outcome.REJECTED, "characters, limit"),
            "no-prompt": (dict(prompt=False), Outcome.TIMEOUT, "features waited"),
            "no-features": (dict(features=False), Outcome.TIMEOUT, "prompt waited"),
        }
        for rid, (kw, _, _) in cases.items():
            send(f"robot_0-{rid}", **kw)
        # An image the edge cannot read, and a prompt over the robot's own limit, through the edge.
        bad = Image()
        bad.header.stamp = ns_to_stamp(time.time_ns())
        bad.height, bad.width, bad.encoding, bad.step = 4, 4, "32FC1", 16
        bad.data = bytes(64)
        client.send_raw_image("robot_1", bad)
        time.sleep(0.1)
        client.send_prompt("robot_1", "what is this ?")
        client.send_prompt("robot_1", "z" * 500)
        # Meanwhile a good request on the other robot is answered.
        good = client.ask("robot_0", img, "what color is the shape ?", timeout=30)
        assert good is not None and good.outcome is Outcome.OK, good

        def by_id():
            return {a.request_id: a for _, a in client.answers["robot_0"]}
        assert client.wait_for(lambda: all(f"robot_0-{rid}" in by_id() for rid in cases), 30), sorted(by_id())
        got = by_id()
        for rid, (_, outcome, reason) in cases.items():
            a = got[f"robot_0-{rid}"]
            assert a.outcome is outcome and reason in a.reason, (rid, a.outcome, a.reason)
        assert client.wait_for(lambda: len(client.answers["robot_1"]) >= 2, 20)
        r1 = [a for _, a in client.answers["robot_1"]]
        reasons = " | ".join(a.reason for a in r1)
        assert "encoding '32FC1' is not supported" in reasons and "characters, limit 200" in reasons, reasons
        # The edge keeps serving after the bad frame.
        later = client.ask("robot_1", img, "how many shapes are there ?", timeout=30)
        assert later is not None and later.outcome is Outcome.OK, later
        time.sleep(2.5)   # past the TTL: no request above gets a second outcome
        ids = [a.request_id for _, a in client.answers["robot_0"]]
        assert len(ids) == len(set(ids)), "a request was answered twice"
