"""Live configuration changes without ROS: which fields are live, the edge encoder rebuilt on the
loaded model, the server engine's limits and flow thresholds, the chunk executor's merge policy and
limits. Every refusal leaves the running object as it was."""

import dataclasses
import threading
import time

import numpy as np
import pytest
import torch

from edge_vlm_ros.codecs.codebook import Codebook
from edge_vlm_ros.codecs.registry import make_codec
from edge_vlm_ros.core.chunks import ActionChunk, ChunkExecutor, ChunkExecutorConfig, MergePolicy
from edge_vlm_ros.core.config import (ControllerConfig, EdgeConfig, LiberoBridgeConfig, ReplayNodeConfig,
                                      ServerConfig, live_fields)
from edge_vlm_ros.core.edge import EdgeEncoder
from edge_vlm_ros.core.flow import FlowController, FlowState
from edge_vlm_ros.core.server import ServerEngine
from edge_vlm_ros.core.split import load_vlm
from edge_vlm_ros.core.types import Outcome, PromptRequest, SplitPoint
from edge_vlm_ros.fixtures.tiny_models import build_tiny_llava

RGB = np.random.RandomState(3).randint(0, 256, (32, 32, 3), np.uint8)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("llava"))


def test_live_fields_are_the_ones_the_nodes_apply():
    assert live_fields(EdgeConfig) == {"split_point", "codec", "codec_dtype", "jpeg_quality", "codebook_path",
                                       "token_stats_dtype", "standing_prompt", "max_rate_hz", "max_prompt_chars",
                                       "max_new_tokens", "frame_wait_s", "send_proprio", "request_timeout_s"}
    assert {"max_batch_size", "max_batch_wait_ms", "pause_threshold", "resume_threshold"} <= live_fields(ServerConfig)
    assert not {"robots", "model_path", "queue_capacity", "codebook_paths", "auth"} & live_fields(ServerConfig)
    assert {"merge_policy", "low", "high", "max_chunks"} <= live_fields(ChunkExecutorConfig)
    assert not {"action_dim", "control_period_s", "robot_id", "jump_reference"} & live_fields(ChunkExecutorConfig)
    # Nodes with nothing to apply changes declare everything read-only.
    for cls in (ControllerConfig, ReplayNodeConfig, LiberoBridgeConfig):
        assert live_fields(cls) == frozenset()


def test_reconfigured_encoder_reuses_the_model_and_changes_what_goes_on_the_wire(model):
    cfg = EdgeConfig(model_path=str(model), split_point="projector", codec="raw")
    enc = EdgeEncoder.from_config(cfg, str(model))
    before = enc.encode(RGB, "a", 1)
    new = enc.reconfigured(dataclasses.replace(cfg, split_point="vision_block:1", codec_dtype="float16"))
    assert new.adapter is enc.adapter                     # the loaded model, not a second copy
    after = new.encode(RGB, "b", 2)
    assert (before.split_point, after.split_point) == ("projector", "vision_block:1")
    assert after.encoded.dtype == "float16" and before.encoded.dtype == "float32"
    assert enc.encode(RGB, "c", 3).split_point == "projector"     # the old encoder is untouched
    # Cloud-only and back, on the same model.
    img = new.reconfigured(dataclasses.replace(cfg, split_point="none", codec="jpeg", jpeg_quality=30))
    pkt = img.encode(RGB, "d", 4)
    assert pkt.split_point == "none" and pkt.encoded.codec == "jpeg"
    back = img.reconfigured(cfg)
    assert back.encode(RGB, "e", 5).split_point == "projector" and back.adapter is enc.adapter


def test_reconfigured_refuses_what_the_model_cannot_serve(model, tmp_path):
    cfg = EdgeConfig(model_path=str(model), split_point="projector", codec="raw")
    enc = EdgeEncoder.from_config(cfg, str(model))
    n = enc.adapter.num_vision_blocks
    with pytest.raises(ValueError, match=f"vision_block:{n + 5}.*0..{n}"):
        enc.reconfigured(dataclasses.replace(cfg, split_point=f"vision_block:{n + 5}"))
    # A codebook trained at another placement, and one of another model.
    rows = enc.adapter.edge_forward(enc.adapter.preprocess(RGB), SplitPoint.parse("vision_block:0")).float()
    other_place = Codebook.from_codewords(torch.unique(rows, dim=0)[:8], enc.adapter.fingerprint, "vision_block:0")
    path = other_place.save(tmp_path / "cb0.safetensors")
    with pytest.raises(ValueError, match="placement"):
        enc.reconfigured(dataclasses.replace(cfg, codec="vq", codebook_path=str(path)))
    other_model = Codebook.from_codewords(torch.unique(rows, dim=0)[:8], "another-model", "vision_block:0")
    path = other_model.save(tmp_path / "cb1.safetensors")
    with pytest.raises(ValueError, match="model"):
        enc.reconfigured(dataclasses.replace(cfg, split_point="vision_block:0", codec="vq", codebook_path=str(path)))
    # The one that fits is taken.
    good = enc.reconfigured(dataclasses.replace(cfg, split_point="vision_block:0", codec="vq",
                                                codebook_path=str(tmp_path / "cb0.safetensors")))
    assert good.encode(RGB, "f", 1).encoded.codec == "vq"
    # An edge started cloud-only holds no model: a model split cannot be switched on.
    cloud = EdgeEncoder.from_config(EdgeConfig(split_point="none", codec="jpeg"), "")
    with pytest.raises(ValueError, match="no model loaded"):
        cloud.reconfigured(cfg)


def test_flow_thresholds_change_and_the_depth_is_judged_by_the_new_ones():
    events = []
    flow = FlowController(8, 2, events.append)
    assert flow.update(5) is None
    with pytest.raises(ValueError):
        flow.set_thresholds(3, 3)
    assert (flow.pause_threshold, flow.resume_threshold) == (8, 2)
    flow.set_thresholds(4, 1)
    assert flow.update(5).state is FlowState.PAUSE
    assert flow.update(2) is None and flow.update(1).state is FlowState.RESUME


class _Engine:
    def __init__(self, adapter, **cfg):
        self.answers = {}
        self.flow = []
        self.cond = threading.Condition()
        self.cfg = ServerConfig(robots=["r0"], default_max_new_tokens=2, ignore_eos=True, **cfg)
        self.engine = ServerEngine(adapter, self.cfg, self._answer, self.flow.append)
        self.edge = EdgeEncoder("r0", SplitPoint.parse("projector"), make_codec("raw", dtype="float32"), adapter)

    def _answer(self, route, a):
        with self.cond:
            self.answers[a.request_id] = a
            self.cond.notify_all()

    def ask_many(self, n, text="what is it ?"):
        ids = [f"q{time.monotonic_ns()}_{i}" for i in range(n)]
        pkts = [self.edge.encode(RGB, rid, 1) for rid in ids]
        for rid, pkt in zip(ids, pkts):
            self.engine.submit_prompt(PromptRequest(rid, "r0", text), "r0")
            pkt.sent_at_ns = time.time_ns()
            self.engine.submit_features(pkt, "r0")
        with self.cond:
            assert self.cond.wait_for(lambda: all(r in self.answers for r in ids), 60)
            return [self.answers[r] for r in ids]


def test_engine_takes_new_batch_limits_and_thresholds_and_refuses_fixed_fields(model):
    h = _Engine(load_vlm(model), max_batch_size=1, max_batch_wait_ms=50.0)
    h.engine.start()
    try:
        assert {a.timings.batch_size for a in h.ask_many(4)} == {1}
        h.engine.update_limits(dataclasses.replace(h.cfg, max_batch_size=4, max_batch_wait_ms=200.0,
                                                   pause_threshold=2, resume_threshold=1))
        assert (h.engine.flow.pause_threshold, h.engine.flow.resume_threshold) == (2, 1)
        answers = h.ask_many(4)
        assert all(a.outcome is Outcome.OK for a in answers)
        assert max(a.timings.batch_size for a in answers) > 1
        cfg = h.engine.cfg
        for bad in (dict(queue_capacity=32), dict(robots=["r0", "r9"]), dict(match_ttl_s=1.0)):
            with pytest.raises(ValueError, match="cannot change"):
                h.engine.update_limits(dataclasses.replace(cfg, **bad))
            assert h.engine.cfg is cfg
        # A request limit: the next prompt is judged by it.
        h.engine.update_limits(dataclasses.replace(cfg, max_prompt_chars=5))
        a = h.ask_many(1, "a question longer than five")[0]
        assert a.outcome is Outcome.REJECTED and "limit 5" in a.reason
    finally:
        h.engine.stop()


def _chunk(value, stamp_ns, n=100, a=2, rid="c"):
    return ActionChunk.from_array(np.full((n, a), value, np.float32), request_id=rid, robot_id="r0",
                                  episode_id="", stamp_ns=stamp_ns, control_period_s=0.05)


def test_executor_reconfigure_changes_the_merge_and_drops_chunks_outside_new_limits():
    cfg = ChunkExecutorConfig(action_dim=2, robot_id="r0", max_future_s=1.0)
    ex = ChunkExecutor(cfg)
    t = 10 * 10**9
    assert ex.submit(_chunk(0.1, t, rid="a"), t).accepted
    assert ex.submit(_chunk(0.3, t, rid="b"), t).accepted
    assert np.allclose(ex.tick(t).action, 0.3)                       # latest_only
    ex.reconfigure(dataclasses.replace(cfg, merge_policy=MergePolicy.AVERAGE))
    assert np.allclose(ex.tick(t + 50_000_000).action, 0.2)          # average
    dropped = ex.reconfigure(dataclasses.replace(cfg, merge_policy=MergePolicy.AVERAGE, low=[-0.2, -0.2],
                                                 high=[0.2, 0.2]))
    assert dropped == 1 and ex.counters()["chunks_dropped_reconfigured"] == 1
    assert np.allclose(ex.tick(t + 100_000_000).action, 0.1)         # the 0.3 chunk is gone
    assert ex.submit(_chunk(0.3, t + 100_000_000, rid="c"), t + 100_000_000).verdict.value == "rejected_out_of_limits"
    with pytest.raises(ValueError, match="action_dim"):
        ex.reconfigure(dataclasses.replace(cfg, action_dim=3))
    with pytest.raises(ValueError, match="jump_reference"):
        ex.reconfigure(dataclasses.replace(cfg, jump_reference="state"))
    assert ex.config.merge_policy is MergePolicy.AVERAGE               # refusals changed nothing
    ex.reconfigure(dataclasses.replace(ex.config, max_chunks=1))
    assert ex.live_chunks == 1
