"""Messages <-> core types. Every field received is validated before use; nothing is pickled."""

from __future__ import annotations

import numpy as np
from builtin_interfaces.msg import Time
from sensor_msgs.msg import Image

from edge_vlm_ros.msg import ActionChunk as ActionChunkMsg, Answer, Prompt, StageTimings as StageTimingsMsg, VisualFeatures

from .core.chunks import ActionChunk
from .core.types import (AnswerResult, EncodedTensor, FeaturePacket, Outcome, PromptRequest, StageTimings,
                         rejected)

MAX_PROPRIO = 4096   # values of proprioception a Prompt may carry

MAX_ID_CHARS = 128

# Encodings converted here with numpy; anything else goes to cv_bridge when it is installed.
_CHANNELS = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}


def stamp_to_ns(t: Time) -> int:
    return int(t.sec) * 1_000_000_000 + int(t.nanosec)


def ns_to_stamp(ns: int) -> Time:
    return Time(sec=int(ns // 1_000_000_000), nanosec=int(ns % 1_000_000_000))


def image_to_rgb(msg: Image) -> np.ndarray:
    """sensor_msgs/Image -> (H, W, 3) uint8 RGB. Raises ValueError naming the encoding it cannot read."""
    enc = msg.encoding.lower()
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    if h <= 0 or w <= 0:
        raise ValueError(f"image has size {w}x{h}")
    if enc not in _CHANNELS:
        try:
            from cv_bridge import CvBridge  # ROS 2's cv_bridge, where the distribution has it
        except ImportError:
            raise ValueError(f"image encoding {msg.encoding!r} is not supported (supported: "
                             f"{sorted(_CHANNELS)}; cv_bridge not installed)") from None
        try:
            return np.ascontiguousarray(CvBridge().imgmsg_to_cv2(msg, desired_encoding="rgb8"))
        except Exception as e:
            raise ValueError(f"image encoding {msg.encoding!r}: cv_bridge failed: {e}") from None
    c = _CHANNELS[enc]
    if step < w * c or len(msg.data) < step * h:
        raise ValueError(f"image {w}x{h} {enc}: step {step} / data {len(msg.data)} bytes too small")
    buf = np.frombuffer(msg.data, np.uint8, count=step * h)  # bytes or array('B'): no copy
    arr = buf.reshape(h, step)[:, : w * c].reshape(h, w, c)
    if enc == "rgb8":
        return np.ascontiguousarray(arr)
    if enc == "bgr8":
        return np.ascontiguousarray(arr[:, :, ::-1])
    if enc == "rgba8":
        return np.ascontiguousarray(arr[:, :, :3])
    if enc == "bgra8":
        return np.ascontiguousarray(arr[:, :, 2::-1])
    return np.ascontiguousarray(np.repeat(arr, 3, axis=2))            # mono8


def rgb_to_image(rgb: np.ndarray, stamp_ns: int, frame_id: str = "camera") -> Image:
    msg = Image()
    msg.header.stamp = ns_to_stamp(stamp_ns)
    msg.header.frame_id = frame_id
    msg.height, msg.width = int(rgb.shape[0]), int(rgb.shape[1])
    msg.encoding = "rgb8"
    msg.is_bigendian = 0
    msg.step = msg.width * 3
    msg.data = np.ascontiguousarray(rgb, dtype=np.uint8).tobytes()
    return msg


def _check_id(name: str, value: str) -> None:
    if not value or len(value) > MAX_ID_CHARS:
        raise rejected(f"{name} must be 1..{MAX_ID_CHARS} characters, got {len(value)}")


def prompt_to_msg(p: PromptRequest) -> Prompt:
    m = Prompt()
    m.header.stamp = ns_to_stamp(p.stamp_ns)
    m.request_id, m.robot_id, m.text, m.task = p.request_id, p.robot_id, p.text, p.task
    m.max_new_tokens = int(p.max_new_tokens)
    m.episode_id = p.episode_id
    m.proprio = [float(x) for x in p.proprio]
    m.deadline = ns_to_stamp(p.deadline_ns)
    return m


def msg_to_prompt(m: Prompt) -> PromptRequest:
    _check_id("request_id", m.request_id)
    _check_id("robot_id", m.robot_id)
    if len(m.proprio) > MAX_PROPRIO:
        raise rejected(f"proprio has {len(m.proprio)} values, limit {MAX_PROPRIO}")
    if len(m.episode_id) > MAX_ID_CHARS:
        raise rejected(f"episode_id must be at most {MAX_ID_CHARS} characters, got {len(m.episode_id)}")
    return PromptRequest(request_id=m.request_id, robot_id=m.robot_id, text=m.text, task=m.task,
                         max_new_tokens=int(m.max_new_tokens), stamp_ns=stamp_to_ns(m.header.stamp),
                         episode_id=m.episode_id, proprio=tuple(float(x) for x in m.proprio),
                         deadline_ns=stamp_to_ns(m.deadline))


def features_to_msg(f: FeaturePacket, sent_at_ns: int) -> VisualFeatures:
    m = VisualFeatures()
    m.header.stamp = ns_to_stamp(f.stamp_ns)
    m.request_id, m.robot_id = f.request_id, f.robot_id
    m.split_point, m.model_fingerprint = f.split_point, f.model_fingerprint
    e = f.encoded
    m.codec, m.dtype, m.shape = e.codec, e.dtype, [int(s) for s in e.shape]
    m.codebook_hash, m.codec_params = e.codebook_hash, e.params_text()
    m.payload = e.payload          # bytes -> uint8[] without a Python-level loop
    m.side_info = e.side_info
    m.sent_at = ns_to_stamp(sent_at_ns)
    m.edge_preprocess_ms, m.edge_encode_ms = float(f.edge_preprocess_ms), float(f.edge_encode_ms)
    m.deadline = ns_to_stamp(f.deadline_ns)
    return m


def _as_bytes(data) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, np.ndarray):
        return data.tobytes()
    return bytes(data)


def msg_to_features(m: VisualFeatures) -> FeaturePacket:
    _check_id("request_id", m.request_id)
    _check_id("robot_id", m.robot_id)
    try:
        params = EncodedTensor.parse_params(m.codec_params)
    except ValueError as e:
        raise rejected(str(e)) from None
    enc = EncodedTensor(codec=m.codec, dtype=m.dtype, shape=tuple(int(s) for s in m.shape),
                        payload=_as_bytes(m.payload), side_info=_as_bytes(m.side_info),
                        codebook_hash=m.codebook_hash, params=params)
    return FeaturePacket(request_id=m.request_id, robot_id=m.robot_id, split_point=m.split_point,
                         model_fingerprint=m.model_fingerprint, encoded=enc, stamp_ns=stamp_to_ns(m.header.stamp),
                         sent_at_ns=stamp_to_ns(m.sent_at), edge_preprocess_ms=float(m.edge_preprocess_ms),
                         edge_encode_ms=float(m.edge_encode_ms), deadline_ns=stamp_to_ns(m.deadline))


def timings_to_msg(t: StageTimings) -> StageTimingsMsg:
    m = StageTimingsMsg()
    for name in ("edge_preprocess_ms", "edge_encode_ms", "transport_ms", "server_decode_ms", "queue_wait_ms",
                 "batch_ms", "generate_ms", "server_total_ms"):
        setattr(m, name, float(getattr(t, name)))
    m.batch_size = int(t.batch_size)
    return m


def msg_to_timings(m: StageTimingsMsg) -> StageTimings:
    return StageTimings(**{k: getattr(m, k) for k in StageTimings.__dataclass_fields__})


def answer_to_msg(a: AnswerResult) -> Answer:
    m = Answer()
    m.header.stamp = ns_to_stamp(a.stamp_ns)
    m.request_id, m.robot_id = a.request_id, a.robot_id
    m.outcome, m.reason, m.text = int(a.outcome), a.reason, a.text
    m.token_ids = [int(t) for t in a.token_ids]
    m.timings = timings_to_msg(a.timings)
    return m


def msg_to_answer(m: Answer) -> AnswerResult:
    return AnswerResult(request_id=m.request_id, robot_id=m.robot_id, outcome=Outcome(int(m.outcome)),
                        reason=m.reason, text=m.text, token_ids=[int(t) for t in m.token_ids],
                        stamp_ns=stamp_to_ns(m.header.stamp), timings=msg_to_timings(m.timings))


def chunk_to_msg(c: ActionChunk) -> ActionChunkMsg:
    m = ActionChunkMsg()
    m.header.stamp = ns_to_stamp(c.stamp_ns)
    m.request_id, m.robot_id, m.episode_id = c.request_id, c.robot_id, c.episode_id
    m.outcome, m.reason = int(c.outcome), c.reason
    m.chunk_size, m.action_dim = int(c.chunk_size), int(c.action_dim)
    m.actions = np.ascontiguousarray(c.actions, dtype=np.float32)   # float32[] from an array: no loop
    m.control_period_s = float(c.control_period_s)
    m.timings = timings_to_msg(c.timings)
    return m


def msg_to_chunk(m: ActionChunkMsg) -> ActionChunk:
    """As received: shape and values are judged by the ChunkExecutor (a counted verdict, no exception)."""
    try:
        outcome = Outcome(int(m.outcome))
    except ValueError:
        outcome = Outcome.ERROR
    return ActionChunk(request_id=m.request_id[:MAX_ID_CHARS], robot_id=m.robot_id[:MAX_ID_CHARS],
                       episode_id=m.episode_id[:MAX_ID_CHARS], stamp_ns=stamp_to_ns(m.header.stamp),
                       chunk_size=int(m.chunk_size), action_dim=int(m.action_dim),
                       actions=np.asarray(m.actions, dtype=np.float32), control_period_s=float(m.control_period_s),
                       outcome=outcome, reason=m.reason, timings=msg_to_timings(m.timings))
