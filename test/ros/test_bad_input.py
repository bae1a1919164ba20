"""Bad input over real DDS: each gets its outcome and reason while a good request is still served,
and every request ends in exactly one outcome (checked after the nodes stopped).

One bring-up, three robots: robot_0 gets hand-made Prompt/VisualFeatures messages (bad ones: every
mismatch of the compact feature header the server refuses, model, codebook, shape, codec, split
point, dtype, payload size; and a good one), robot_1 an unreadable camera frame and an over-long question, robot_2 no camera frame at
all: its prompts wait `frame_wait_s` and beyond `max_pending_prompts` the oldest is dropped.
"""

import collections
import time
import uuid

import numpy as np
from sensor_msgs.msg import Image

from edge_vlm_ros import qos, topics
from edge_vlm_ros.conversions import as_uint8, features_to_msg, ns_to_stamp, prompt_to_msg, restream
from edge_vlm_ros.codecs.registry import codec_class, make_codec
from edge_vlm_ros.core.edge import EdgeEncoder
from edge_vlm_ros.core.split import load_vlm
from edge_vlm_ros.core.types import Outcome, PromptRequest, SplitPoint
from edge_vlm_ros.core.auth import load_key
from edge_vlm_ros.msg import Prompt, VisualFeatures
from edge_vlm_ros.msg_auth import sign_with_key
from edge_vlm_ros.tools.default_model import ensure
from ros_harness import running


def _publish(pub, msg, keys_dir):
    """Every hand-made robot -> server message goes out here, signed with robot_0's key: bad input
    from the robot itself, authenticated."""
    pub.publish(sign_with_key(msg, "robot_0", load_key(keys_dir, "robot_0")))


def _described_as(**fields):
    """A wire edit: the message's stream descriptor says `fields` (and its id is its own again)."""
    def edit(m: VisualFeatures) -> None:
        for name, value in fields.items():
            setattr(m.description[0], name, value)
        restream(m)
    return edit


def _foreign_codebook(m: VisualFeatures) -> None:
    """VQ indices under a codebook digest the server holds no codebook for."""
    _described_as(codec=codec_class("vq").wire_id, codec_params=[12, 1, 0],
                  codebook_digest=as_uint8(bytes.fromhex("5eed5eed5eed5eed")))(m)


def _undescribed_stream(m: VisualFeatures) -> None:
    """A lean message naming a stream this robot never described."""
    m.description, m.stream = [], 0x0badf00d


def _id_not_its_descriptors(m: VisualFeatures) -> None:
    m.description[0].shape = [1, 2, 3]        # edited, id left as it was


def test_each_bad_input_gets_its_outcome_while_good_requests_are_served(ros_env, tmp_path):
    model = ensure()
    adapter = load_vlm(model)
    enc = EdgeEncoder("robot_0", SplitPoint.parse("projector"), make_codec("raw", dtype="float32"), adapter)
    img = np.random.RandomState(0).randint(0, 256, (64, 64, 3), np.uint8)
    overrides = {"edge": {"max_prompt_chars": 200, "frame_wait_s": 1.0},
                 "server": {"match_ttl_s": 2.0, "max_prompt_chars": 300, "default_max_new_tokens": 4}}
    per_robot = {"robot_2": {"frame_wait_s": 3.0, "max_pending_prompts": 2}}
    ids = collections.defaultdict(list)        # robot -> request ids sent by hand (robot_0)
    with running(ros_env, tmp_path, 3, overrides, per_robot, probe=["robot_0", "robot_1"]) as (_, client):
        node = client.node
        pub_f = node.create_publisher(VisualFeatures, topics.for_robot("robot_0", topics.FEATURES), qos.FEATURES)
        pub_p = node.create_publisher(Prompt, topics.for_robot("robot_0", topics.PROMPT), qos.REQUEST)

        def send(rid, mutate=None, prompt=True, features=True, text="what is it ?", wire=None):
            """mutate: changes the packet; wire: changes the VisualFeatures message itself (numbers
            that no packet converts to: an unknown codec, a foreign codebook digest)."""
            ids["robot_0"].append(rid)
            pkt = enc.encode(img, rid, time.time_ns())   # first: on a loaded machine it can take a while
            if mutate:
                mutate(pkt)
            if prompt:
                _publish(pub_p, prompt_to_msg(PromptRequest(rid, "robot_0", text, time.time_ns())), tmp_path / "keys")
            if features:
                msg = features_to_msg(pkt, time.time_ns())
                if wire:
                    wire(msg)
                _publish(pub_f, msg, tmp_path / "keys")

        def answered(rid):
            return any(a.request_id == rid for _, a in client.answers["robot_0"])

        # The server must hear these new writers before the cases go out: a round trip with a request
        # it rejects at once (an unknown codec), repeated until one is answered.
        assert client.wait_for(lambda: pub_f.get_subscription_count() and pub_p.get_subscription_count(), 20)
        deadline = time.monotonic() + 60
        while True:
            probe = uuid.uuid4().hex
            send(probe, wire=_described_as(codec=250))
            if client.wait_for(lambda probe=probe: answered(probe), 2.0):
                break
            assert time.monotonic() < deadline, "the server never answered a hand-made request"

        # robot_2 has had no frame: three prompts, a queue of two. The oldest is dropped at once; the
        # other two wait 3 s for a frame that never comes.
        for i in range(3):
            client.send_prompt("robot_2", f"question {i} for a robot without a camera")
        cases = {
            "bad-size": (dict(mutate=lambda p: setattr(p.encoded, "payload", p.encoded.payload[:-6])),
                         Outcome.REJECTED, "payload is"),
            "bad-codec": (dict(wire=_described_as(codec=200)), Outcome.REJECTED, "unknown codec 200"),
            "bad-model": (dict(mutate=lambda p: setattr(p, "model_fingerprint", "ffffffffffffffff")),
                          Outcome.REJECTED, "fingerprint"),
            # The compact header's other mismatches: a codebook this server does not hold, a shape
            # its model does not ship at the split, enum values that name nothing.
            "bad-codebook": (dict(wire=_foreign_codebook), Outcome.REJECTED, "codebook hash '5eed5eed5eed5eed' is not held"),
            "bad-shape": (dict(mutate=lambda p: setattr(p.encoded, "shape", (p.encoded.shape[0] + 1, p.encoded.shape[1]))),
                          Outcome.REJECTED, "features declare shape"),
            "bad-split": (dict(wire=_described_as(split_kind=9)), Outcome.REJECTED, "unknown split_kind 9"),
            "bad-dtype": (dict(wire=_described_as(dtype=77)), Outcome.REJECTED, "unknown dtype 77"),
            # Feature streams: a stream never described, a descriptor whose id is another's.
            "unknown-stream": (dict(wire=_undescribed_stream), Outcome.REJECTED,
                               "stream 0badf00d, which robot_0 has not described"),
            "stream-id": (dict(wire=_id_not_its_descriptors), Outcome.REJECTED, "is not its descriptor's"),
            "long-prompt": (dict(text="y" * 400), Outcome.REJECTED, "characters, limit"),
            "no-prompt": (dict(prompt=False), Outcome.TIMEOUT, "features waited"),
            "no-features": (dict(features=False), Outcome.TIMEOUT, "prompt waited"),
        }
        rid_of = {name: uuid.uuid4().hex for name in cases}
        for name, (kw, _, _) in cases.items():
            send(rid_of[name], **kw)
        # An image the edge cannot read, and a prompt over the robot's own limit, through the edge.
        bad = Image()
        bad.header.stamp = ns_to_stamp(time.time_ns())
        bad.height, bad.width, bad.encoding, bad.step = 4, 4, "32FC1", 16
        bad.data = bytes(64)
        client.send_raw_image("robot_1", bad)
        time.sleep(0.1)    # ordering across two topics: the bad frame first
        client.send_prompt("robot_1", "what is this ?")
        client.send_prompt("robot_1", "z" * 500)
        # Meanwhile a good request on the other robot is answered.
        good = client.ask("robot_0", img, "what color is the shape ?", timeout=30)
        assert good is not None and good.outcome is Outcome.OK, good

        assert client.wait_for(lambda: all(answered(rid) for rid in rid_of.values()), 30)
        got = {a.request_id: a for _, a in client.answers["robot_0"]}
        for name, (_, outcome, reason) in cases.items():
            a = got[rid_of[name]]
            assert a.outcome is outcome and reason in a.reason, (name, a.outcome, a.reason)
        assert client.wait_for(lambda: len(client.answers["robot_1"]) >= 2, 20)
        r1 = [a for _, a in client.answers["robot_1"]]
        reasons = " | ".join(a.reason for a in r1)
        assert "encoding '32FC1' is not supported" in reasons and "characters, limit 200" in reasons, reasons
        # The edge keeps serving after the bad frame.
        later = client.ask("robot_1", img, "how many shapes are there ?", timeout=30)
        assert later is not None and later.outcome is Outcome.OK, later
        # robot_2: one drop for the full queue, then two "no camera frame" after frame_wait_s.
        assert client.wait_for(lambda: len(client.answers["robot_2"]) >= 3, 30), client.answers["robot_2"]
        r2 = sorted(client.answers["robot_2"], key=lambda x: x[0])
        assert r2[0][1].outcome is Outcome.REJECTED, r2
        assert r2[0][1].reason == "robot prompt queue full (2); dropped: 'question 0 for a robot without a camera'"
        for _, a in r2[1:]:
            assert a.outcome is Outcome.ERROR and a.reason == \
                "no camera frame on /robot_2/camera/image_raw within 3 s", a.reason
        # the two waited their frame_wait_s (the first answer came at once)
        assert (r2[1][0] - r2[0][0]) / 1e9 > 2.0, r2
    # After the nodes stopped: one outcome per request, none twice, none for a request never made.
    # (robot_1 and robot_2 also have outcomes the edge gave without announcing a request.)
    for robot, n_local in (("robot_0", 0), ("robot_1", 2), ("robot_2", 3)):
        counts = collections.Counter(a.request_id for _, a in client.answers[robot])
        assert all(v == 1 for v in counts.values()), (robot, counts)
        made = set(client.sent[robot]) | set(ids[robot])
        assert made <= set(counts) and len(counts) == len(made) + n_local, (robot, sorted(counts), sorted(made))
