"""Messages <-> core types. Every field received is validated before use; nothing is pickled.

The msg_to_* functions (and the check_* ones for messages used as they are) are total: for any value
of any field they either return or raise. What they raise names the bad value: RequestError
(REJECTED) for the request halves the server answers, ValueError for everything else. Enum fields
are checked against the message's own constants; a value outside them is refused, never guessed.
Stamps must be valid builtin_interfaces/Time (nanosec < 1e9), so a stamp taken from a message can
always be written back into one. Lengths are capped so one message cannot make a node hold
megabytes in an id, a log line or a reason string.
"""

from __future__ import annotations

import math

import numpy as np
from builtin_interfaces.msg import Time
from sensor_msgs.msg import Image

from edge_vlm_ros.msg import (ActionChunk as ActionChunkMsg, Answer, Episode, FeatureStream, FlowControl, Prompt,
                              StageTimings as StageTimingsMsg, VisualFeatures)

from .codecs.registry import codec_by_wire_id, codec_class
from .core import wire
from .core.chunks import ActionChunk
from .core.streams import StreamAnnouncer, StreamCache, unknown_stream_reason
from .core.types import (AnswerResult, EncodedTensor, FeaturePacket, Outcome, PromptRequest, StageTimings,
                         rejected)

MAX_PROPRIO = 4096   # values of proprioception a Prompt may carry

MAX_ID_CHARS = 128
MAX_TEXT_CHARS = 1 << 20    # prompt, answer, reason and instruction text (the servers' own limits are far below)
MAX_TOKENS = 1 << 16        # token ids an Answer may carry
MAX_SHAPE_DIMS = 8          # dimensions a VisualFeatures shape may have

_NS = 1_000_000_000
_INT32 = (-(1 << 31), (1 << 31) - 1)
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_OUTCOMES = {Answer.OUTCOME_OK: Outcome.OK, Answer.OUTCOME_TIMEOUT: Outcome.TIMEOUT,
             Answer.OUTCOME_REJECTED: Outcome.REJECTED, Answer.OUTCOME_ERROR: Outcome.ERROR}
_EPISODE_STATUSES = (Episode.STATUS_RUNNING, Episode.STATUS_SUCCESS, Episode.STATUS_FAILURE, Episode.STATUS_ERROR,
                     Episode.STATUS_DONE)

# Encodings converted here with numpy; anything else goes to cv_bridge when it is installed.
_CHANNELS = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}


def show(value: object, limit: int = 80) -> str:
    """repr(value), cut to `limit` characters: for error messages about values that can be huge."""
    if isinstance(value, (str, bytes)) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} long)"
    if not isinstance(value, (str, bytes)) and hasattr(value, "__len__") and len(value) > 8:
        return f"[{', '.join(repr(x) for x in list(value[:8]))}, ...] ({len(value)} values)"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def stamp_to_ns(t: Time) -> int:
    """Nanoseconds of a builtin_interfaces/Time; ValueError for nanosec outside [0, 1e9)."""
    sec, nanosec = int(t.sec), int(t.nanosec)
    if not 0 <= nanosec < _NS:
        raise ValueError(f"stamp nanosec {nanosec} is not in [0, {_NS}) (sec {sec})")
    return sec * _NS + nanosec


def ns_to_stamp(ns: int) -> Time:
    """builtin_interfaces/Time of nanoseconds; ValueError when its seconds do not fit int32."""
    sec = int(ns) // _NS
    if not _INT32[0] <= sec <= _INT32[1]:
        raise ValueError(f"time {ns} ns does not fit a builtin_interfaces/Time (sec {sec} is not int32)")
    return Time(sec=sec, nanosec=int(ns) % _NS)


def stamp_or_zero(t: Time) -> int:
    """stamp_to_ns, or 0 for an invalid stamp: for echoing a stamp into the reply that refuses a message."""
    try:
        return stamp_to_ns(t)
    except ValueError:
        return 0


def _check_len(name: str, value, limit: int, error=ValueError) -> None:
    if len(value) > limit:
        raise error(f"{name} has {len(value)} {'characters' if isinstance(value, str) else 'values'}, "
                    f"limit {limit}: {show(value, 40)}")


def _check_outcome(value: int, error=ValueError) -> Outcome:
    outcome = _OUTCOMES.get(int(value))
    if outcome is None:
        raise error(f"outcome {int(value)} is not one of {sorted(_OUTCOMES)} (OK, TIMEOUT, REJECTED, ERROR)")
    return outcome


def _rejected_stamp(t: Time, name: str = "header.stamp") -> int:
    try:
        return stamp_to_ns(t)
    except ValueError as e:
        raise rejected(f"{name}: {e}") from None


def flow_paused(m: FlowControl) -> bool:
    """True for PAUSE, False for RESUME; ValueError for any other state."""
    if m.state == FlowControl.PAUSE:
        return True
    if m.state == FlowControl.RESUME:
        return False
    raise ValueError(f"flow control state {int(m.state)} is neither RESUME ({FlowControl.RESUME}) nor PAUSE "
                     f"({FlowControl.PAUSE}) (server_id {show(m.server_id, 40)})")


def check_episode(m: Episode) -> Episode:
    """The Episode itself, once its status, ids, instruction and stamp are valid; ValueError otherwise."""
    if m.status not in _EPISODE_STATUSES:
        raise ValueError(f"episode status {int(m.status)} is not one of {list(_EPISODE_STATUSES)}")
    _check_len("episode_id", m.episode_id, MAX_ID_CHARS)
    _check_len("suite", m.suite, MAX_ID_CHARS)
    _check_len("instruction", m.instruction, MAX_TEXT_CHARS)
    _check_len("reason", m.reason, MAX_TEXT_CHARS)
    stamp_to_ns(m.header.stamp)
    return m


def check_proprio_state(m, limit: int = MAX_PROPRIO):
    """A sensor_msgs/JointState whose position can go out as a Prompt's proprio (float32[]): at most
    `limit` finite values within float32's range, and a valid stamp; ValueError otherwise."""
    stamp_to_ns(m.header.stamp)
    _check_len("robot state position", m.position, limit)
    pos = np.asarray(m.position, dtype=np.float64)
    bad = ~np.isfinite(pos) | (np.abs(pos) > _FLOAT32_MAX)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"robot state position[{i}] = {pos[i]} is not a finite float32 ({int(bad.sum())} such)")
    return m


def image_to_rgb(msg: Image) -> np.ndarray:
    """sensor_msgs/Image -> (H, W, 3) uint8 RGB. Raises ValueError naming the encoding it cannot read."""
    enc = msg.encoding.lower()
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    if h <= 0 or w <= 0:
        raise ValueError(f"image has size {w}x{h}")
    if len(enc) > MAX_ID_CHARS:
        raise ValueError(f"image encoding {show(msg.encoding, 40)} is not supported")
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
        raise rejected(f"{name} must be 1..{MAX_ID_CHARS} characters, got {len(value)}: {show(value, 40)}")


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
    """RequestError (REJECTED) naming the bad value for a Prompt that cannot be a request."""
    _check_id("request_id", m.request_id)
    _check_id("robot_id", m.robot_id)
    if len(m.proprio) > MAX_PROPRIO:
        raise rejected(f"proprio has {len(m.proprio)} values, limit {MAX_PROPRIO}")
    if len(m.episode_id) > MAX_ID_CHARS:
        raise rejected(f"episode_id must be at most {MAX_ID_CHARS} characters, got {len(m.episode_id)}")
    _check_len("task", m.task, MAX_ID_CHARS, rejected)
    _check_len("prompt text", m.text, MAX_TEXT_CHARS, rejected)
    proprio = tuple(float(x) for x in m.proprio)
    for i, x in enumerate(proprio):
        if not math.isfinite(x):
            raise rejected(f"proprio[{i}] = {x} is not finite")
    return PromptRequest(request_id=m.request_id, robot_id=m.robot_id, text=m.text, task=m.task,
                         max_new_tokens=int(m.max_new_tokens), stamp_ns=_rejected_stamp(m.header.stamp),
                         episode_id=m.episode_id, proprio=proprio,
                         deadline_ns=_rejected_stamp(m.deadline, "deadline"))


def packet_stream(f: FeaturePacket) -> wire.StreamDescriptor:
    """The stream a packet belongs to (core/wire.py says what each field becomes). ValueError naming
    the value that has no wire form: a split point, codec, dtype or codec parameter without a number."""
    e = f.encoded
    cls = codec_class(e.codec)
    kind, block = wire.split_to_wire(f.split_point)
    shape = tuple(int(s) for s in e.shape)
    if len(shape) > MAX_SHAPE_DIMS:
        raise ValueError(f"shape {list(shape)} has more than {MAX_SHAPE_DIMS} dimensions")
    desc = wire.StreamDescriptor(kind, block, cls.wire_id, wire.dtype_to_wire(e.dtype),
                                 wire.digest_to_wire(f.model_fingerprint), wire.digest_to_wire(e.codebook_hash),
                                 tuple(cls.params_to_wire(e.params)), shape)
    desc.check()
    return desc


def stream_to_msg(d: wire.StreamDescriptor) -> FeatureStream:
    m = FeatureStream()
    m.split_kind, m.split_block, m.codec, m.dtype = d.split_kind, d.split_block, d.codec, d.dtype
    m.model_fingerprint = as_uint8(d.model_fingerprint)
    m.codebook_digest = as_uint8(d.codebook_digest)
    m.codec_params = list(d.codec_params)
    m.shape = list(d.shape)
    return m


def msg_to_stream(m: FeatureStream) -> wire.StreamDescriptor:
    """A FeatureStream's values as they travel (interpreted per request by msg_to_features);
    ValueError for a shape over MAX_SHAPE_DIMS."""
    _check_len("shape", m.shape, MAX_SHAPE_DIMS)
    return wire.StreamDescriptor(int(m.split_kind), int(m.split_block), int(m.codec), int(m.dtype),
                                 _as_bytes(m.model_fingerprint), _as_bytes(m.codebook_digest),
                                 tuple(int(v) for v in m.codec_params), tuple(int(v) for v in m.shape))


def features_to_msg(f: FeaturePacket, sent_at_ns: int, announcer: StreamAnnouncer | None = None,
                    describe: bool | None = None) -> VisualFeatures:
    """The lean VisualFeatures of a packet: its stream id, and the stream's descriptor inline when
    `announcer` says this message must carry it (always without an announcer: a self-describing
    message, what tools and one-off senders publish); `describe` True/False decides it outright
    (byte counts of either form). ValueError naming the value that has no wire
    form (a request id that is not 32 lowercase hex digits, a split point, codec, dtype or codec
    parameter without a number). `sent_at_ns` goes into auth.stamp_ns:
    the clock the deadline is counted from: sign it with that stamp (MessageAuth.sign(stamp_ns=)).
    The edge's stage timings stay on the robot (the edge adds them to the relayed outcome)."""
    desc = packet_stream(f)
    m = VisualFeatures()
    m.stamp = ns_to_stamp(f.stamp_ns)
    m.stream = desc.stream_id
    if describe if describe is not None else (announcer is None or announcer.due(m.stream)):
        m.description = [stream_to_msg(desc)]
    e = f.encoded
    m.request_id = as_uint8(wire.request_id_to_bytes(f.request_id))
    m.side_info = e.side_info
    m.payload = e.payload          # bytes -> uint8[] without a Python-level loop
    m.deadline_ms = deadline_to_wire(f.deadline_ns, int(sent_at_ns))
    m.auth.stamp_ns = int(sent_at_ns)
    return m


def deadline_to_wire(deadline_ns: int, sent_at_ns: int) -> int:
    """VisualFeatures.deadline_ms: whole ms from the signing stamp to the deadline, rounded down (the
    server may only think it earlier); 0 for none, 1 for one already due, at most 2^32 - 1 (49 days)."""
    if not deadline_ns:
        return 0
    return min(max(1, (int(deadline_ns) - int(sent_at_ns)) // 1_000_000), 0xFFFFFFFF)


def deadline_from_wire(deadline_ms: int, sent_at_ns: int) -> int:
    """The absolute deadline (ns) of a VisualFeatures; 0: none."""
    return int(sent_at_ns) + int(deadline_ms) * 1_000_000 if deadline_ms else 0


def restream(m: VisualFeatures) -> VisualFeatures:
    """Set `stream` to the id of the inline descriptor (after editing it: tests and tools that build
    deliberately odd streams). The message must carry its descriptor."""
    if len(m.description) != 1:
        raise ValueError("restream: the message carries no descriptor")
    m.stream = msg_to_stream(m.description[0]).stream_id
    return m


def learn_stream(m: VisualFeatures, robot_id: str, streams: StreamCache) -> None:
    """Remember the inline descriptor of `m` (if any) for `robot_id`; RequestError (REJECTED) when it
    cannot be (its id is not the descriptor's, a shape over the limit)."""
    if len(m.description) == 0:
        return
    try:
        streams.learn(robot_id, int(m.stream), msg_to_stream(m.description[0]))
    except ValueError as e:
        raise rejected(str(e)) from None


def as_uint8(data: bytes) -> np.ndarray:
    """bytes as a fixed-size uint8[N] field takes them (rclpy wants a sequence of ints or an array)."""
    return np.frombuffer(data, np.uint8)


def _as_bytes(data) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, np.ndarray):
        return data.tobytes()
    return bytes(data)


def features_request_id(m: VisualFeatures) -> str:
    """The request id of a VisualFeatures as text (32 hex digits), as Prompt and Answer carry it."""
    return wire.request_id_from_bytes(_as_bytes(m.request_id))


def msg_to_features(m: VisualFeatures, robot_id: str, streams: StreamCache | None = None) -> FeaturePacket:
    """RequestError (REJECTED) naming the bad value for features that cannot be a request's half:
    a stream neither described inline nor known to `streams`, an inline descriptor whose id is not
    the one beside it, an enum value that names nothing (split kind, codec, dtype), a codec parameter
    out of range. `robot_id`: the robot namespace the message came in on (the message does not
    repeat it). `streams`: the descriptors this receiver was given (the inline one is learned into
    it); None: the message must describe itself. Whether payload, shape, dtype and codec agree is
    the codec's check, on the server's worker; the digests are compared with the server's model and
    codebooks there too."""
    stamp_ns = _rejected_stamp(m.stamp, "stamp")
    if len(m.description) == 1:
        try:
            desc = msg_to_stream(m.description[0])
            desc.check()
        except ValueError as e:
            raise rejected(str(e)) from None
        if desc.stream_id != int(m.stream):
            raise rejected(f"stream id {int(m.stream):08x} is not its descriptor's ({desc.stream_id:08x}): "
                           "the descriptor and the id beside it disagree")
        if streams is not None:
            streams.learn(robot_id, desc.stream_id, desc)
    else:
        desc = None if streams is None else streams.get(robot_id, int(m.stream))
        if desc is None:
            raise rejected(unknown_stream_reason(robot_id, int(m.stream)) if streams is None
                           else streams.unknown_reason(robot_id, int(m.stream)))
    try:
        split = wire.split_from_wire(desc.split_kind, desc.split_block)
        cls = codec_by_wire_id(desc.codec)
        dtype = wire.dtype_from_wire(desc.dtype)
        params = cls.params_from_wire(desc.codec_params)
        request_id = features_request_id(m)
        fingerprint = wire.digest_from_wire(desc.model_fingerprint)
        codebook = wire.digest_from_wire(desc.codebook_digest)
    except ValueError as e:
        raise rejected(str(e)) from None
    sent_ns = int(m.auth.stamp_ns)
    if m.deadline_ms and sent_ns <= 0:
        raise rejected(f"deadline_ms {int(m.deadline_ms)} without auth.stamp_ns to count it from")
    enc = EncodedTensor(codec=cls.name, dtype=dtype, shape=desc.shape,
                        payload=_as_bytes(m.payload), side_info=_as_bytes(m.side_info),
                        codebook_hash=codebook, params=params)
    return FeaturePacket(request_id=request_id, robot_id=robot_id, split_point=str(split),
                         model_fingerprint=fingerprint, encoded=enc, stamp_ns=stamp_ns,
                         sent_at_ns=sent_ns if sent_ns > 0 else 0,
                         deadline_ns=deadline_from_wire(m.deadline_ms, sent_ns))


def timings_to_msg(t: StageTimings) -> StageTimingsMsg:
    m = StageTimingsMsg()
    for name in ("edge_preprocess_ms", "edge_encode_ms", "transport_ms", "server_decode_ms", "queue_wait_ms",
                 "batch_ms", "generate_ms", "server_total_ms"):
        setattr(m, name, float(getattr(t, name)))
    m.batch_size = int(t.batch_size)
    return m


def msg_to_timings(m: StageTimingsMsg) -> StageTimings:
    return StageTimings(**{k: getattr(m, k) for k in StageTimings.__dataclass_fields__})


def ros_string(s: str) -> str:
    """A str as a ROS string field can carry it. ROS strings end at the first NUL on the wire, so
    a NUL (a model can generate one) would cut the text short in transit, and the receiver's MAC,
    computed over what arrived, would no longer match the sender's: NUL becomes U+FFFD. The token
    ids travel beside the text unchanged."""
    return s.replace("\x00", "\ufffd") if "\x00" in s else s


def answer_to_msg(a: AnswerResult) -> Answer:
    m = Answer()
    m.header.stamp = ns_to_stamp(a.stamp_ns)
    m.request_id, m.robot_id = a.request_id, a.robot_id
    m.outcome, m.reason, m.text = int(a.outcome), ros_string(a.reason), ros_string(a.text)
    m.token_ids = [int(t) for t in a.token_ids]
    m.timings = timings_to_msg(a.timings)
    return m


def msg_to_answer(m: Answer) -> AnswerResult:
    """ValueError naming the bad value for an Answer that cannot be a request's outcome."""
    outcome = _check_outcome(m.outcome)
    _check_len("request_id", m.request_id, MAX_ID_CHARS)
    _check_len("robot_id", m.robot_id, MAX_ID_CHARS)
    _check_len("reason", m.reason, MAX_TEXT_CHARS)
    _check_len("text", m.text, MAX_TEXT_CHARS)
    _check_len("token_ids", m.token_ids, MAX_TOKENS)
    return AnswerResult(request_id=m.request_id, robot_id=m.robot_id, outcome=outcome,
                        reason=m.reason, text=m.text, token_ids=[int(t) for t in m.token_ids],
                        stamp_ns=stamp_to_ns(m.header.stamp), timings=msg_to_timings(m.timings))


def chunk_to_msg(c: ActionChunk) -> ActionChunkMsg:
    m = ActionChunkMsg()
    m.header.stamp = ns_to_stamp(c.stamp_ns)
    m.request_id, m.robot_id, m.episode_id = c.request_id, c.robot_id, c.episode_id
    m.outcome, m.reason = int(c.outcome), ros_string(c.reason)
    m.chunk_size, m.action_dim = int(c.chunk_size), int(c.action_dim)
    m.actions = np.ascontiguousarray(c.actions, dtype=np.float32)   # float32[] from an array: no loop
    m.control_period_s = float(c.control_period_s)
    m.timings = timings_to_msg(c.timings)
    return m


def msg_to_chunk(m: ActionChunkMsg) -> ActionChunk:
    """Shape, period and action values as received: the ChunkExecutor judges them (a counted verdict).
    ValueError naming the bad value for what is no chunk at all: an unknown outcome, ids over
    MAX_ID_CHARS, an invalid stamp."""
    outcome = _check_outcome(m.outcome)
    _check_len("request_id", m.request_id, MAX_ID_CHARS)
    _check_len("robot_id", m.robot_id, MAX_ID_CHARS)
    _check_len("episode_id", m.episode_id, MAX_ID_CHARS)
    _check_len("reason", m.reason, MAX_TEXT_CHARS)
    return ActionChunk(request_id=m.request_id, robot_id=m.robot_id,
                       episode_id=m.episode_id, stamp_ns=stamp_to_ns(m.header.stamp),
                       chunk_size=int(m.chunk_size), action_dim=int(m.action_dim),
                       actions=np.asarray(m.actions, dtype=np.float32), control_period_s=float(m.control_period_s),
                       outcome=outcome, reason=m.reason, timings=msg_to_timings(m.timings))
