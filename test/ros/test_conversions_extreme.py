"""Conversions are total: for every extreme value of every field they return or raise ValueError /
RequestError naming the bad value, never anything else; and the guard keeps a callback's exception
from leaving it. In-process (real rclpy messages and a real rclpy node, no DDS graph needed)."""

import math
import time

import numpy as np
import pytest
import rclpy
from rclpy.node import Node
from sensor_msgs.msg import Image, JointState

from edge_vlm_ros.conversions import (MAX_ID_CHARS, answer_to_msg, check_episode, check_proprio_state, chunk_to_msg,
                                      features_to_msg, flow_paused, image_to_rgb, msg_to_answer, msg_to_chunk,
                                      msg_to_features, msg_to_prompt, ns_to_stamp, prompt_to_msg, rgb_to_image,
                                      stamp_to_ns)
from edge_vlm_ros.core.chunks import ActionChunk
from edge_vlm_ros.core.types import (AnswerResult, EncodedTensor, FeaturePacket, Outcome, PromptRequest,
                                     RequestError)
from edge_vlm_ros.guard import CallbackGuard
from edge_vlm_ros.msg import Answer, Episode, FlowControl

from fuzz_messages import count_variants, variants


def good_prompt():
    return prompt_to_msg(PromptRequest("a" * 32, "robot_0", "what is it ?", time.time_ns(), "action", 4, "ep-1",
                                       (0.1, -0.2)))


def good_features():
    enc = EncodedTensor("vq", "float32", (2, 3), np.arange(6, dtype=np.float32).tobytes(), b"\x01\x02",
                        codebook_hash="c" * 64, params={"bits": "8", "entropy": "static"})
    return features_to_msg(FeaturePacket("a" * 32, "robot_0", "projector", "f" * 16, enc, time.time_ns()),
                           time.time_ns())


def msg_to_features_of_robot_0(m):
    return msg_to_features(m, "robot_0")


def good_answer():
    return answer_to_msg(AnswerResult("a" * 32, "robot_0", Outcome.OK, "", "a red square", [1, 2, 3],
                                      stamp_ns=time.time_ns()))


def good_chunk():
    return chunk_to_msg(ActionChunk("a" * 32, "robot_0", "ep-1", time.time_ns(), 2, 3,
                                    np.zeros(6, np.float32), 0.1))


def good_episode():
    m = Episode()
    m.header.stamp = ns_to_stamp(time.time_ns())
    m.episode_id, m.suite, m.task_id, m.instruction = "ep-1", "libero_spatial", 0, "pick up the bowl"
    return m


def good_flow():
    m = FlowControl()
    m.header.stamp = ns_to_stamp(time.time_ns())
    m.server_id, m.state, m.queue_depth, m.pause_threshold, m.resume_threshold = "server", 1, 3, 8, 4
    return m


def good_state():
    m = JointState()
    m.header.stamp = ns_to_stamp(time.time_ns())
    m.position = [0.1] * 8
    return m


CASES = [  # (good message, conversion, the exceptions it may raise)
    (good_prompt, msg_to_prompt, (RequestError,)),
    (good_features, msg_to_features_of_robot_0, (RequestError,)),
    (good_answer, msg_to_answer, (ValueError,)),
    (good_chunk, msg_to_chunk, (ValueError,)),
    (good_episode, check_episode, (ValueError,)),
    (good_flow, flow_paused, (ValueError,)),
    (good_state, check_proprio_state, (ValueError,)),
    (lambda: rgb_to_image(np.zeros((4, 5, 3), np.uint8), time.time_ns()), image_to_rgb, (ValueError,)),
]


@pytest.mark.parametrize("make,convert,allowed", CASES, ids=lambda x: getattr(x, "__name__", ""))
def test_conversion_is_total_over_extreme_values(make, convert, allowed):
    base = make()
    convert(base)                                        # the good message converts
    n = refused = 0
    for desc, msg in variants(base):
        n += 1
        try:
            convert(msg)
        except allowed as e:
            refused += 1
            text = e.reason if isinstance(e, RequestError) else str(e)
            assert text and len(text) < 2000, (desc, text[:200])    # names the value, never dumps it
        # anything else propagates and fails the test, naming the variant through the traceback
    assert n == count_variants(base) and n > 10
    assert refused > 0, f"{convert.__name__}: no variant refused out of {n}"


def test_out_of_range_enums_are_refused_with_the_value():
    a = good_answer()
    a.outcome = 99
    with pytest.raises(ValueError, match="outcome 99"):
        msg_to_answer(a)
    c = good_chunk()
    c.outcome = 4
    with pytest.raises(ValueError, match="outcome 4"):
        msg_to_chunk(c)
    f = good_flow()
    f.state = 2
    with pytest.raises(ValueError, match="state 2"):
        flow_paused(f)
    e = good_episode()
    e.status = 5
    with pytest.raises(ValueError, match="status 5"):
        check_episode(e)
    for outcome in Outcome:                               # every defined value still maps
        a.outcome = int(outcome)
        assert msg_to_answer(a).outcome is outcome


def test_stamps_and_values_that_cannot_round_trip_are_refused():
    p = good_prompt()
    p.header.stamp.nanosec = (1 << 32) - 1
    with pytest.raises(RequestError, match="nanosec 4294967295"):
        msg_to_prompt(p)
    with pytest.raises(ValueError, match="int32"):
        ns_to_stamp(1 << 63)
    t = ns_to_stamp(-1)
    assert (t.sec, t.nanosec) == (-1, 999_999_999) and stamp_to_ns(t) == -1
    p = good_prompt()
    p.proprio = [0.0, math.nan]
    with pytest.raises(RequestError, match=r"proprio\[1\] = nan"):
        msg_to_prompt(p)
    s = good_state()
    s.position = [0.0, 1e300]
    with pytest.raises(ValueError, match=r"position\[1\]"):
        check_proprio_state(s)
    a = good_answer()
    a.request_id = "r" * (MAX_ID_CHARS + 1)
    with pytest.raises(ValueError, match="request_id has 129 characters"):
        msg_to_answer(a)
    img = Image()
    img.height, img.width, img.step, img.encoding = (1 << 32) - 1, (1 << 32) - 1, (1 << 32) - 1, "rgb8"
    with pytest.raises(ValueError, match="too small"):
        image_to_rgb(img)


@pytest.fixture
def rcl_node():
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    node = Node("guard_test", context=ctx)
    yield node
    node.destroy_node()
    ctx.try_shutdown()


def test_guard_counts_logs_and_keeps_the_callback_alive(rcl_node):
    guard = CallbackGuard(rcl_node, throttle_s=60.0, report_period_s=0)
    seen = []

    def on_answer(msg):
        seen.append(msg_to_answer(msg).request_id)

    cb = guard.wrap(on_answer, "/robot_0/edge_vlm/answer")
    bad = good_answer()
    bad.outcome = 99
    for _ in range(3):
        cb(bad)                                   # raises inside; the guard counts it
    cb(good_answer())
    cb(None)                                      # an AttributeError: a bug, counted the same way
    assert seen == ["a" * 32]
    assert guard.counts() == {"/robot_0/edge_vlm/answer": {"AttributeError": 1, "ValueError": 3}}
    assert guard.total() == 4


def test_guarded_subscription_survives_a_bad_message_in_spin(rcl_node):
    """Through a real rclpy executor: an unguarded exception would leave spin_once."""
    guard = CallbackGuard(rcl_node, report_period_s=0)
    got = []
    guard.subscribe(Answer, "fuzz_answer", lambda m: got.append(msg_to_answer(m).outcome), 10)
    pub = rcl_node.create_publisher(Answer, "fuzz_answer", 10)
    bad = good_answer()
    bad.outcome = 99
    ex = rclpy.executors.SingleThreadedExecutor(context=rcl_node.context)
    ex.add_node(rcl_node)
    pub.publish(bad)
    pub.publish(good_answer())
    deadline = time.monotonic() + 20
    while not got and time.monotonic() < deadline:
        ex.spin_once(timeout_sec=0.1)
    ex.shutdown()
    assert got == [Outcome.OK]
    assert guard.counts() == {rcl_node.resolve_topic_name("fuzz_answer"): {"ValueError": 1}}


def test_a_nul_in_generated_text_survives_the_wire_and_the_mac(tmp_path):
    """A model may generate NUL; a ROS string ends at NUL on the wire. The Answer must arrive whole
    (NUL shown as U+FFFD, token ids intact) and its MAC must verify after a real CDR round trip."""
    from rclpy.serialization import deserialize_message, serialize_message

    from edge_vlm_ros.core.auth import create_key
    from edge_vlm_ros.msg_auth import make_message_auth

    create_key(tmp_path, "robot_0")
    auth = make_message_auth(True, str(tmp_path), ["robot_0"], 10.0, None)
    a = AnswerResult("a" * 32, "robot_0", Outcome.OK, "", "left\x00right", [5, 0, 7], stamp_ns=time.time_ns())
    msg = auth.sign(answer_to_msg(a), "robot_0")
    got = deserialize_message(serialize_message(msg), Answer)
    assert got.text == "left\ufffdright"
    assert list(got.token_ids) == [5, 0, 7]
    assert auth.check(got, "robot_0", "Answer", None)
    c = ActionChunk.failure(Outcome.ERROR, "bad\x00reason", request_id="b" * 32, robot_id="robot_0", episode_id="",
                            stamp_ns=time.time_ns())
    got_c = deserialize_message(serialize_message(auth.sign(chunk_to_msg(c), "robot_0")), type(chunk_to_msg(c)))
    assert got_c.reason == "bad\ufffdreason" and auth.check(got_c, "robot_0", "ActionChunk", None)
