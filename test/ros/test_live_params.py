"""Live and read-only parameters on running nodes, through their real parameter services over DDS.

Every live parameter is set on a running node and its effect is looked for on the wire (the next
VisualFeatures, Prompt, Answer, FlowControl or RobotAction), every read-only parameter is refused
with the reason, and invalid live values are refused while the node keeps serving with its previous
configuration.
"""

import threading
import types
import time

import numpy as np
import pytest
import torch
from rcl_interfaces.msg import Parameter as ParameterMsg, ParameterType, ParameterValue
from rcl_interfaces.srv import DescribeParameters, GetParameters, SetParameters, SetParametersAtomically
from rclpy.parameter import Parameter

from edge_vlm_ros import qos, topics
from edge_vlm_ros.bringup import NodeSet, NodeSpec, PARAM_FILES, config_dir
from edge_vlm_ros.client import RobotClient
from edge_vlm_ros.codecs.codebook import Codebook
from edge_vlm_ros.conversions import chunk_to_msg, features_request_id, learn_stream, msg_to_features, stamp_to_ns
from edge_vlm_ros.core.streams import StreamCache
from edge_vlm_ros.core.chunks import ActionChunk, ChunkExecutorConfig
from edge_vlm_ros.core.config import ControllerConfig, EdgeConfig, ServerConfig, field_descriptions, live_fields
from edge_vlm_ros.core.split import load_vlm
from edge_vlm_ros.core.types import Outcome, SplitPoint
from edge_vlm_ros.fixtures.tiny_models import build_tiny_llava
from edge_vlm_ros.msg import ActionChunk as ActionChunkMsg, FlowControl, Prompt, VisualFeatures

from ros_harness import running

RGB = np.random.RandomState(5).randint(0, 256, (32, 32, 3), np.uint8)
EDGE, SERVER, CONTROLLER = "/robot_0/edge_vlm_edge", "/edge_vlm_server", "/edge_vlm_controller"


class Params:
    """One node's parameter services, called from the test client's node (spun by its own thread)."""

    def __init__(self, node, name: str) -> None:
        self.name = name
        self._set = node.create_client(SetParameters, f"{name}/set_parameters")
        self._atomic = node.create_client(SetParametersAtomically, f"{name}/set_parameters_atomically")
        self._get = node.create_client(GetParameters, f"{name}/get_parameters")
        self._describe = node.create_client(DescribeParameters, f"{name}/describe_parameters")
        for c in (self._set, self._atomic, self._get, self._describe):
            assert c.wait_for_service(timeout_sec=60.0), f"{name}: {c.srv_name} not available"

    @staticmethod
    def _call(client, request, timeout=60.0):
        done = threading.Event()
        future = client.call_async(request)
        future.add_done_callback(lambda _: done.set())
        assert done.wait(timeout), f"{client.srv_name}: no reply within {timeout} s"
        return future.result()

    def set(self, name, value):
        """(successful, reason) of setting one parameter."""
        r = self._call(self._set, SetParameters.Request(parameters=[Parameter(name, value=value).to_parameter_msg()]))
        return r.results[0].successful, r.results[0].reason

    def set_msg(self, msg: ParameterMsg):
        r = self._call(self._set, SetParameters.Request(parameters=[msg]))
        return r.results[0].successful, r.results[0].reason

    def set_together(self, **values):
        msgs = [Parameter(n, value=v).to_parameter_msg() for n, v in values.items()]
        r = self._call(self._atomic, SetParametersAtomically.Request(parameters=msgs)).result
        return r.successful, r.reason

    def get(self, name):
        v = self._call(self._get, GetParameters.Request(names=[name])).values[0]
        value = Parameter.from_parameter_msg(ParameterMsg(name=name, value=v)).value if v.type else None
        return value if isinstance(value, (str, bool, int, float)) or value is None else list(value)

    def current_as_messages(self, names):
        """Each parameter with its current value, typed as declared (an unset array as an empty one)."""
        values = self._call(self._get, GetParameters.Request(names=list(names))).values
        descs = self._call(self._describe, DescribeParameters.Request(names=list(names))).descriptors
        out = []
        for n, v, d in zip(names, values, descs):
            if v.type == ParameterType.PARAMETER_NOT_SET:
                v = ParameterValue(type=d.type)
            out.append(ParameterMsg(name=n, value=v))
        return out

    def describe(self, names):
        return self._call(self._describe, DescribeParameters.Request(names=list(names))).descriptors

    def assert_read_only_refused(self, cls):
        names = sorted(set(field_descriptions(cls)) - live_fields(cls))
        assert names
        for d, n in zip(self.describe(names), names):
            assert "read-only" in d.additional_constraints, (n, d.additional_constraints)
        for msg in self.current_as_messages(names):
            ok, reason = self.set_msg(msg)
            assert not ok, f"{self.name}: read-only {msg.name} was accepted"
            assert msg.name in reason and "read-only" in reason and "restart" in reason, reason

    def assert_live_described(self, cls):
        names = sorted(live_fields(cls))
        for d, n in zip(self.describe(names), names):
            assert d.additional_constraints.startswith("live"), (n, d.additional_constraints)


class Wire:
    """What the client hears of robot_0 besides answers: features, prompts and flow control."""

    def __init__(self, client: RobotClient) -> None:
        self.features: list[VisualFeatures] = []
        self.prompts: list[tuple[int, Prompt]] = []
        self.flow: list[FlowControl] = []
        self._cond = threading.Condition()
        node = client.node
        node.create_subscription(VisualFeatures, topics.for_robot("robot_0", topics.FEATURES),
                                 lambda m: self._add(self.features, m), qos.FEATURES)
        node.create_subscription(Prompt, topics.for_robot("robot_0", topics.PROMPT),
                                 lambda m: self._add(self.prompts, (time.time_ns(), m)), qos.REQUEST)
        node.create_subscription(FlowControl, topics.for_robot("robot_0", topics.FLOW),
                                 lambda m: self._add(self.flow, m), qos.FLOW)

    def _add(self, target, item):
        with self._cond:
            target.append(item)
            self._cond.notify_all()

    def wait_for(self, predicate, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def features_of(self, request_id, timeout=30.0) -> types.SimpleNamespace:
        """robot_0's VisualFeatures for request_id as the server reads it: split point, codec and
        dtype by name, the codebook's digest as hex, payload, side_info, shape."""
        found = []

        def seen():
            found[:] = [f for f in self.features if features_request_id(f) == request_id]
            return bool(found)
        assert self.wait_for(seen, timeout), f"no VisualFeatures for {request_id}"
        # read as the server reads it: its stream may have been described by an earlier message
        streams = StreamCache()
        with self._cond:
            heard = list(self.features)
        for f in heard:
            learn_stream(f, "robot_0", streams)
        p = msg_to_features(found[0], "robot_0", streams)
        return types.SimpleNamespace(split_point=p.split_point, **vars(p.encoded))

    def prompt_of(self, request_id, timeout=30.0) -> tuple[int, Prompt]:
        """(when it was heard here, the Prompt) of a request."""
        assert self.wait_for(lambda: any(p.request_id == request_id for _, p in self.prompts), timeout)
        with self._cond:
            return next((t, p) for t, p in self.prompts if p.request_id == request_id)


def _ok(client, text="what is it ?", timeout=60.0):
    a = client.ask("robot_0", RGB, text, timeout=timeout)
    assert a is not None, "no answer"
    assert a.outcome is Outcome.OK, a.reason
    return a


def _lossless_codebook(adapter, placement, path):
    rows = adapter.edge_forward(adapter.preprocess(RGB), SplitPoint.parse(placement)).float()    # (T, D)
    return str(Codebook.from_codewords(torch.unique(rows, dim=0), adapter.fingerprint, placement).save(path))


@pytest.fixture
def edge_and_server(ros_env, tmp_path):
    model = build_tiny_llava(tmp_path / "llava")
    adapter = load_vlm(model)
    cb_proj = _lossless_codebook(adapter, "projector", tmp_path / "cb_projector.safetensors")
    cb_block = _lossless_codebook(adapter, "vision_block:0", tmp_path / "cb_block0.safetensors")
    # stream_announce_s 0: every VisualFeatures describes its stream, so this test's own listener
    # (subscribed after the edge's first messages) reads each one on its own
    overrides = {"edge": {"model_path": str(model), "codec_dtype": "float32", "max_new_tokens": 4,
                          "stream_announce_s": 0.0},
                 "server": {"model_path": str(model), "ignore_eos": True, "max_batch_size": 1,
                            "codebook_paths": [cb_proj]}}
    with running(ros_env, tmp_path, 1, overrides) as (nodes, client):
        yield nodes, client, adapter, cb_proj, cb_block


def test_edge_live_parameters_change_the_wire_and_read_only_ones_are_refused(edge_and_server):
    nodes, client, adapter, cb_proj, cb_block = edge_and_server
    wire = Wire(client)
    edge = Params(client.node, EDGE)
    edge.assert_live_described(EdgeConfig)

    a = _ok(client)
    f = wire.features_of(a.request_id)
    assert (f.split_point, f.codec, f.dtype) == ("projector", "raw", "float32")
    raw32 = len(f.payload)

    # The issue: a split point set on the running edge is what the next request sends.
    assert edge.set("split_point", "vision_block:1") == (True, "")
    assert edge.get("split_point") == "vision_block:1"
    f = wire.features_of(_ok(client).request_id)
    assert f.split_point == "vision_block:1"

    assert edge.set("codec_dtype", "float16") == (True, "")
    assert edge.set("split_point", "projector") == (True, "")
    f = wire.features_of(_ok(client).request_id)
    assert (f.split_point, f.dtype, len(f.payload)) == ("projector", "float16", raw32 // 2)

    assert edge.set("split_point", "vision_block:0/ln1") == (True, "")
    f = wire.features_of(_ok(client).request_id)
    n_tokens, side16 = f.shape[0], len(f.side_info)
    assert edge.set("token_stats_dtype", "float32") == (True, "")
    f = wire.features_of(_ok(client).request_id)
    assert (side16, len(f.side_info)) == (4 * n_tokens, 8 * n_tokens)

    # Codec and codebook together (one atomic call): vq indices instead of tensor bytes.
    assert edge.set_together(split_point="projector", codec="vq", codebook_path=cb_proj) == (True, "")
    f = wire.features_of(_ok(client).request_id)
    assert f.codec == "vq" and f.codebook_hash and len(f.payload) < raw32 // 8

    # Cloud-only and the JPEG quality: the image goes, smaller at a lower quality.
    assert edge.set_together(split_point="none", codec="jpeg", jpeg_quality=95) == (True, "")
    f95 = wire.features_of(_ok(client).request_id)
    assert edge.set("jpeg_quality", 10) == (True, "")
    f10 = wire.features_of(_ok(client).request_id)
    assert (f95.split_point, f95.codec, f10.codec) == ("none", "jpeg", "jpeg")
    assert len(f10.payload) < len(f95.payload)

    # Request settings: tokens asked for, prompt length limit, deadline.
    assert edge.set("max_new_tokens", 6) == (True, "")
    assert len(_ok(client).token_ids) == 6
    assert edge.set("request_timeout_s", 17.0) == (True, "")
    a = _ok(client)
    t, p = wire.prompt_of(a.request_id)
    assert abs((stamp_to_ns(p.deadline) - t) / 1e9 - 17.0) < 3.0
    assert edge.set("max_prompt_chars", 12) == (True, "")
    a = client.ask("robot_0", RGB, "a question longer than twelve")
    assert a.outcome is Outcome.REJECTED and "limit 12" in a.reason
    assert edge.set("max_prompt_chars", 2000) == (True, "")
    # The rest apply to continuous mode and the action task; set, they are what the node runs with.
    for name, value in (("standing_prompt", "What now?"), ("max_rate_hz", 2.0), ("frame_wait_s", 5.0),
                        ("send_proprio", True)):
        assert edge.set(name, value) == (True, ""), name
        assert edge.get(name) == value

    # Invalid values are refused with the reason; the edge keeps its configuration and serves.
    before = {n: edge.get(n) for n in ("split_point", "codec", "codebook_path")}
    n = adapter.num_vision_blocks
    for values, why in (({"split_point": f"vision_block:{n + 7}", "codec": "raw"}, f"0..{n}"),
                        ({"split_point": "projector", "codec": "bogus"}, "unknown codec 'bogus'"),
                        ({"codec": "vq"}, "codec must be jpeg or image"),
                        ({"jpeg_quality": 0}, "outside 1..100"),
                        ({"split_point": "elsewhere"}, "'elsewhere'"),
                        ({"split_point": "projector", "codec": "vq", "codebook_path": cb_block}, "placement"),
                        ({"split_point": "projector", "codec": "vq", "codebook_path": cb_block + ".missing"},
                         "FileNotFoundError")):
        ok, reason = edge.set_together(**values)
        assert not ok and why in reason, (values, reason)
    assert {n: edge.get(n) for n in before} == before
    f = wire.features_of(_ok(client).request_id)
    assert (f.split_point, f.codec) == ("none", "jpeg")

    edge.assert_read_only_refused(EdgeConfig)
    assert nodes.poll() == []


def test_server_live_parameters_change_the_wire_and_read_only_ones_are_refused(edge_and_server):
    nodes, client, _, _, _ = edge_and_server
    wire = Wire(client)
    server, edge = Params(client.node, SERVER), Params(client.node, EDGE)
    server.assert_live_described(ServerConfig)

    def burst(n):
        """n prompts on one frame at once: they queue at the server behind the first."""
        i = len(client.sent["robot_0"])
        client.send_image("robot_0", RGB)
        time.sleep(0.2)
        for k in range(n):
            client.send_prompt("robot_0", f"what is it ? {k}")
        assert client.wait_for(lambda: len(client.sent["robot_0"]) >= i + n, 60)
        ids = set(client.sent["robot_0"][i:i + n])
        assert client.wait_for(lambda: ids <= {a.request_id for _, a in client.answers["robot_0"]}, 120)
        return [a for _, a in client.answers["robot_0"] if a.request_id in ids]

    assert edge.set("max_new_tokens", 48) == (True, "")     # a batch lasts long enough for others to queue
    assert {a.timings.batch_size for a in burst(4)} == {1}
    # The batch worker now waits up to 1 s for the requests whose prompts it has seen.
    assert server.set_together(max_batch_size=4, max_batch_wait_ms=1000.0) == (True, "")
    answers = burst(6)
    assert all(a.outcome is Outcome.OK for a in answers)
    assert max(a.timings.batch_size for a in answers) > 1

    # Flow-control thresholds and lease go out in FlowControl at once.
    assert server.set_together(pause_threshold=9, resume_threshold=3, lease_s=5.0) == (True, "")
    assert wire.wait_for(lambda: any((m.pause_threshold, m.resume_threshold, round(m.lease_s, 3)) == (9, 3, 5.0)
                                     for m in wire.flow), 30)

    # Request limits: the next request is judged by them (the reason names the new limit).
    assert edge.set("max_new_tokens", 0) == (True, "")
    assert server.set("default_max_new_tokens", 3) == (True, "")
    assert len(_ok(client).token_ids) == 3
    for name, value, text, why in (("max_prompt_chars", 10, "a question of many characters", "limit 10"),
                                   ("max_prompt_tokens", 2, "what is in the picture ?", "limit 2"),
                                   ("max_payload_bytes", 100, "what is it ?", "limit 100"),
                                   ("max_bytes_per_robot", 100, "what is it ?", "max_bytes_per_robot=100")):
        default = server.get(name)
        assert server.set(name, value) == (True, ""), name
        a = client.ask("robot_0", RGB, text)
        assert a is not None and a.outcome is Outcome.REJECTED and why in a.reason, (name, a and a.reason)
        assert server.set(name, default) == (True, "")
    assert edge.set("max_new_tokens", 6) == (True, "")
    assert server.set("max_new_tokens_limit", 5) == (True, "")
    a = client.ask("robot_0", RGB, "what is it ?")
    assert a.outcome is Outcome.REJECTED and "limit 5" in a.reason, a.reason
    assert server.set("max_new_tokens_limit", 256) == (True, "")
    for name, value in (("max_image_side", 2048), ("max_image_pixels", 1920 * 1080), ("ignore_eos", False)):
        assert server.set(name, value) == (True, ""), name
        assert server.get(name) == value

    # Invalid: refused with the reason, the server keeps serving as configured.
    for values, why in (({"pause_threshold": 1000}, "queue_capacity"), ({"resume_threshold": 9}, "resume_threshold"),
                        ({"max_batch_size": 0}, "max_batch_size=0"), ({"lease_s": 0.5}, "lease_s")):
        ok, reason = server.set_together(**values)
        assert not ok and why in reason, (values, reason)
    assert (server.get("pause_threshold"), server.get("max_batch_size")) == (9, 4)
    _ok(client)

    server.assert_read_only_refused(ServerConfig)
    assert nodes.poll() == []


def test_controller_merge_policy_and_limits_change_live_and_read_only_ones_are_refused(ros_env, tmp_path):
    params = {"robots": ["robot_0"], "actions": True, "auth": False, "action_dim": 2, "max_future_s": 1.0,
              "max_chunk_age_s": 5.0, "low_water_steps": 0, "low": [-1.0, -1.0], "high": [1.0, 1.0],
              "safe_action": [0.0, 0.0], "max_jump": [0.0, 0.0], "max_rate": [0.0, 0.0]}
    spec = NodeSpec("controller", "/", params, config_dir() / PARAM_FILES["controller"], "controller")
    nodes = NodeSet([spec], env=ros_env, log_dir=tmp_path / "logs").start()
    client = RobotClient(["robot_0"], "test_live_controller", actions=True)
    try:
        pub = client.node.create_publisher(ActionChunkMsg, topics.for_robot("robot_0", topics.ACTION_CHUNK),
                                           qos.ACTION_CHUNK)
        assert client.wait_for(lambda: len(client.actions["robot_0"]) > 0 and pub.get_subscription_count() > 0, 120), \
            nodes.poll()
        ctl = Params(client.node, CONTROLLER)
        ctl.assert_live_described(ChunkExecutorConfig)

        def send(value, rid):
            now = time.time_ns()
            pub.publish(chunk_to_msg(ActionChunk.from_array(np.full((1000, 2), value, np.float32), request_id=rid,
                                                            robot_id="robot_0", episode_id="", stamp_ns=now,
                                                            control_period_s=0.05)))

        def acting(value, merged, timeout=30.0):
            i = len(client.actions["robot_0"])
            return client.wait_for(lambda: any(
                m.merged_chunks == merged and np.allclose(m.action, value, atol=1e-5)
                for _, m in client.actions["robot_0"][i:]), timeout)

        send(0.1, "a")
        send(0.3, "b")
        assert acting([0.3, 0.3], 2), "latest_only"
        assert ctl.set("merge_policy", "average") == (True, "")
        assert acting([0.2, 0.2], 2), "average"
        assert ctl.set_together(merge_policy="weighted", newer_weight=0.75) == (True, "")
        assert acting([0.25, 0.25], 2), "weighted"
        assert ctl.set("max_chunks", 1) == (True, "")
        assert acting([0.3, 0.3], 1), "max_chunks 1 evicts the older chunk"
        assert ctl.set("max_chunks", 16) == (True, "")
        send(0.1, "c")
        assert acting([0.15, 0.15], 2), "weighted: 0.75 * newer + 0.25 * older"
        # Limits: the chunk outside them is dropped at once, and so is a new one.
        assert ctl.set_together(low=[-0.2, -0.2], high=[0.2, 0.2]) == (True, "")
        assert acting([0.1, 0.1], 1), "limits"
        send(0.3, "d")
        assert acting([0.1, 0.1], 1)
        # Nothing left inside tighter limits: the safe action, which is live too.
        assert ctl.set_together(low=[-0.05, -0.05], high=[0.05, 0.05], safe_action=[0.02, -0.03]) == (True, "")
        assert acting([0.02, -0.03], 0), "safe action"
        for name, value in (("ensemble_m", 0.5), ("low_water_steps", 2), ("max_chunk_age_s", 2.0),
                            ("max_future_s", 0.5), ("silence_timeout_s", 3.0), ("request_timeout_s", 4.0),
                            ("retry_interval_s", 0.5), ("max_chunk_size", 512), ("limit_tolerance", 1e-4),
                            ("max_jump", [1.0, 1.0]), ("max_jump_norm", 2.0), ("max_rate", [0.5, 0.5]),
                            ("rate_limit_mode", "reject")):
            assert ctl.set(name, value) == (True, ""), name
            assert ctl.get(name) == value
        # Invalid values: refused with the reason; the controller keeps acting as configured.
        for name, value, why in (("merge_policy", "bogus", "bogus"), ("newer_weight", 1.5, "(0, 1)"),
                                 ("low", [-1.0], "action_dim"), ("safe_action", [0.5, 0.5], "outside the limits")):
            ok, reason = ctl.set(name, value)
            assert not ok and why in reason, (name, reason)
        assert ctl.get("merge_policy") == "weighted"
        assert acting([0.02, -0.03], 0)

        ctl.assert_read_only_refused(ChunkExecutorConfig)
        ctl.assert_read_only_refused(ControllerConfig)
        assert nodes.poll() == []
    finally:
        client.close()
        nodes.stop()
