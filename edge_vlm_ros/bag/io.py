"""Rosbag2 files without ROS: write sample bags, read any bag into plain records, replay them on time.

Three parts, all built on the pure-Python `rosbags` library (no rclpy, so they run and are tested
without a ROS graph; the replay node only converts records to messages and publishes them):

- `write_sample_bag`: sensor_msgs/Image (and optionally CompressedImage) streams at a given rate
  and resolution from any frame source, plus prompts as std_msgs/String, in sqlite3 or mcap.
- `read_bag`: any rosbag2 (sqlite3 or mcap, from any writer: `ros2 bag record` on a robot, rosbags,
  ours) as `BagRecord`s whose images are (H, W, 3) RGB uint8 arrays with their header stamp and
  whose strings are str. Bags without embedded message definitions (Humble's sqlite3) are read
  with the standard definitions.
- `BagReplayer` / `ReplayClock`: yields the records at bag time scaled by a rate (0: as fast as
  possible), looped, remapped, held while `should_pause()` is true (the server's PAUSE), with
  /clock times for sim time and an option to buffer the whole bag in memory first, as NVIDIA's
  ros2_benchmark does, so disk reads never disturb the timing.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import cv2
import numpy as np
from rosbags.highlevel import AnyReader, AnyReaderError
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore
from rosbags.typesys.store import Typestore

logger = logging.getLogger(__name__)

IMAGE_TYPE = "sensor_msgs/msg/Image"
COMPRESSED_IMAGE_TYPE = "sensor_msgs/msg/CompressedImage"
STRING_TYPE = "std_msgs/msg/String"
DECODED_TYPES = (IMAGE_TYPE, COMPRESSED_IMAGE_TYPE, STRING_TYPE)

# Channels per encoding; the byte order of each pixel is the name's letter order.
_READ_CHANNELS = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}
READ_ENCODINGS = tuple(_READ_CHANNELS)
WRITE_ENCODINGS = ("rgb8", "bgr8", "mono8")

# Message definitions for types a bag does not embed (Humble's sqlite3 bags embed none). Image,
# CompressedImage and String are the same in every ROS 2 distribution.
DEFAULT_STORE = Stores.ROS2_HUMBLE


class Storage(enum.Enum):
    """rosbag2 storage plugins."""

    SQLITE3 = "sqlite3"
    MCAP = "mcap"


_PLUGINS = {Storage.SQLITE3: StoragePlugin.SQLITE3, Storage.MCAP: StoragePlugin.MCAP}


def split_ns(ns: int) -> tuple[int, int]:
    """Nanoseconds to (sec, nanosec) as builtin_interfaces/Time holds them."""
    return ns // 1_000_000_000, ns % 1_000_000_000


# --------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class ImageFrame:
    """A decoded camera frame, whatever its encoding in the bag."""

    rgb: np.ndarray  # (H, W, 3) uint8, RGB order, C-contiguous, owned (not a view of the bag)
    stamp_ns: int  # header.stamp
    frame_id: str
    encoding: str  # as recorded: Image.encoding, or "jpeg"/"png" for a CompressedImage
    compressed: bool


@dataclass(frozen=True)
class CompressedFrame:
    """A sensor_msgs/CompressedImage as recorded, not decoded (read_bag(decode_compressed=False)):
    what a replay republishes byte for byte."""

    format: str  # e.g. "rgb8; jpeg compressed bgr8", "jpeg", "png"
    data: bytes
    stamp_ns: int  # header.stamp
    frame_id: str


Content = Union[ImageFrame, CompressedFrame, str, Any]


@dataclass(frozen=True)
class BagRecord:
    """One message of a bag, ROS-free. content: ImageFrame for images, str for std_msgs/String;
    with read_bag(include_other=True) the rosbags message object of other types (or the raw CDR
    bytes when the bag has no definition for the type)."""

    topic: str
    msgtype: str
    log_time_ns: int  # when the recorder received it (the bag's timestamp), not header.stamp
    content: Content


@dataclass(frozen=True)
class TopicInfo:
    name: str
    msgtype: str
    count: int


@dataclass(frozen=True)
class BagInfo:
    path: Path
    start_ns: int  # log time of the first message
    end_ns: int  # log time of the last message
    message_count: int
    topics: dict[str, TopicInfo]

    @property
    def duration_s(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9


# --------------------------------------------------------------------------------------------
# Pixel conversions


def image_to_rgb(encoding: str, height: int, width: int, step: int, data: bytes | np.ndarray) -> np.ndarray:
    """sensor_msgs/Image fields to an owned (H, W, 3) RGB uint8 array; rows may be padded (step)."""
    channels = _READ_CHANNELS.get(encoding)
    if channels is None:
        raise ValueError(f"unsupported image encoding {encoding!r}: expected one of {', '.join(READ_ENCODINGS)}")
    if height <= 0 or width <= 0:
        raise ValueError(f"bad image size {width}x{height}")
    row = width * channels
    if step < row:
        raise ValueError(f"image step {step} is shorter than a row of {width} {encoding} pixels ({row} bytes)")
    buf = _as_bytes(data)
    needed = (height - 1) * step + row  # the last row need not be padded
    if buf.size < needed:
        raise ValueError(
            f"image data has {buf.size} bytes, {width}x{height} {encoding} with step {step} needs {needed}"
        )
    rows = np.lib.stride_tricks.as_strided(buf, shape=(height, row), strides=(step, 1), writeable=False)
    img = rows.reshape(height, width, channels)  # (H, W, C)
    if encoding == "rgb8":
        out = img
    elif encoding == "bgr8":
        out = img[..., ::-1]
    elif encoding == "rgba8":
        out = img[..., :3]
    elif encoding == "bgra8":
        out = img[..., 2::-1]
    else:  # mono8
        out = np.repeat(img, 3, axis=2)
    return np.array(out, dtype=np.uint8, order="C", copy=True)


def compressed_to_rgb(fmt: str, data: bytes | np.ndarray) -> tuple[np.ndarray, str]:
    """sensor_msgs/CompressedImage to ((H, W, 3) RGB uint8, "jpeg" | "png").

    fmt is either a bare "jpeg"/"png" or image_transport's "<raw encoding>; <jpeg|png> compressed
    <encoding of the compressed pixels>" (e.g. "rgb8; jpeg compressed bgr8"). Depth
    ("compressedDepth") and 16-bit images are rejected, and so is a frame whose header declares more
    than a camera frame's size (core.camera, the edge's own check, runs before decoding).
    """
    from ..core.camera import decode_compressed   # imports torch (codecs): only where a bag holds one

    return decode_compressed(fmt, data)


def rgb_to_image_data(rgb: np.ndarray, encoding: str) -> tuple[np.ndarray, int]:
    """(H, W, 3) RGB uint8 to (flat Image.data, step) in encoding (rgb8, bgr8 or mono8)."""
    _check_rgb(rgb)
    if encoding == "rgb8":
        px = rgb
    elif encoding == "bgr8":
        px = rgb[..., ::-1]
    elif encoding == "mono8":
        px = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    else:
        raise ValueError(f"unsupported encoding for writing {encoding!r}: expected one of {', '.join(WRITE_ENCODINGS)}")
    flat = np.ascontiguousarray(px).reshape(-1)
    return flat, flat.size // rgb.shape[0]


def encode_jpeg(rgb: np.ndarray, quality: int, *, mono: bool = False) -> bytes:
    _check_rgb(rgb)
    if not 1 <= quality <= 100:
        raise ValueError(f"jpeg quality must be in [1, 100], got {quality}")
    px = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY if mono else cv2.COLOR_RGB2BGR)
    ok, enc = cv2.imencode(".jpg", px, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError(f"JPEG encoding of a {rgb.shape} frame failed")
    return enc.tobytes()


def _as_bytes(data: bytes | np.ndarray) -> np.ndarray:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return np.frombuffer(data, dtype=np.uint8)
    return np.asarray(data, dtype=np.uint8).reshape(-1)


def _check_rgb(rgb: np.ndarray) -> None:
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        got = f"{rgb.dtype} {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
        raise ValueError(f"expected an (H, W, 3) uint8 RGB frame, got {got}")


# --------------------------------------------------------------------------------------------
# Writing sample bags


@dataclass(frozen=True)
class SampleBagConfig:
    """What write_sample_bag puts in a bag. Topic names are absolute, as `ros2 bag record` stores them."""

    storage: Storage = Storage.SQLITE3
    width: int = 336
    height: int = 336
    rate_hz: float = 10.0
    n_frames: int = 20
    encoding: str = "rgb8"  # of the sensor_msgs/Image messages: rgb8, bgr8 or mono8
    # Defaults are the edge node's input topics (edge_vlm_ros.topics CAMERA and PROMPT_TEXT) made
    # absolute, so a replay into a robot's namespace only strips the leading "/".
    image_topic: str = "/camera/image_raw"  # "" for no raw images
    compressed_topic: str = ""  # e.g. "/camera/image_raw/compressed"; "" for none
    jpeg_quality: int = 90
    frame_id: str = "camera"
    prompt_topic: str = "/edge_vlm/prompt_text"  # std_msgs/String; "" for no prompts
    prompts: tuple[str, ...] = ("Describe the scene.",)
    # 0: the first prompt once, before the first frame; N: the next prompt (cycling) before every
    # N-th frame. A prompt's log time is just before its frame's, so a player delivers it first.
    prompt_every_n_frames: int = 0
    start_time_ns: int = 1_700_000_000_000_000_000
    resize: bool = False  # frames of another size: resize (INTER_AREA) instead of raising
    # rosbags writes metadata version 8 (Iron) or 9 (Jazzy and later) only.
    bag_version: int = 9

    def __post_init__(self) -> None:
        if not isinstance(self.storage, Storage):
            try:
                object.__setattr__(self, "storage", Storage(self.storage))
            except ValueError:
                raise ValueError(f"storage must be one of {[s.value for s in Storage]}, got {self.storage!r}") from None
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"width and height must be > 0, got {self.width}x{self.height}")
        if not 0 < self.rate_hz <= 1000:
            raise ValueError(f"rate_hz must be in (0, 1000], got {self.rate_hz}")
        if self.n_frames < 1:
            raise ValueError(f"n_frames must be >= 1, got {self.n_frames}")
        if self.encoding not in WRITE_ENCODINGS:
            raise ValueError(f"encoding must be one of {WRITE_ENCODINGS}, got {self.encoding!r}")
        if not self.image_topic and not self.compressed_topic:
            raise ValueError("image_topic and compressed_topic are both empty: the bag would hold no frames")
        topics = [t for t in (self.image_topic, self.compressed_topic, self.prompt_topic) if t]
        for t in topics:
            if not t.startswith("/"):
                raise ValueError(f"bag topic names are absolute, got {t!r}")
        if len(set(topics)) != len(topics):
            raise ValueError(f"topics must differ, got {topics}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        if self.prompt_topic and not self.prompts:
            raise ValueError("prompt_topic is set but prompts is empty")
        if self.prompt_every_n_frames < 0:
            raise ValueError(f"prompt_every_n_frames must be >= 0, got {self.prompt_every_n_frames}")
        if self.start_time_ns < 0:
            raise ValueError(f"start_time_ns must be >= 0, got {self.start_time_ns}")
        if self.bag_version not in (8, 9):
            raise ValueError(f"bag_version must be 8 or 9, got {self.bag_version}")


FrameSource = Union[Callable[[int], np.ndarray], Iterable[np.ndarray]]


def synthetic_frame(index: int, height: int, width: int) -> np.ndarray:
    """A cheap deterministic frame that changes visibly with index: gradients and a moving square."""
    y = np.arange(height, dtype=np.int64)[:, None]
    x = np.arange(width, dtype=np.int64)[None, :]
    frame = np.empty((height, width, 3), dtype=np.uint8)  # (H, W, 3)
    frame[..., 0] = (x * 255 // max(width - 1, 1) + 8 * index) % 256
    frame[..., 1] = y * 255 // max(height - 1, 1)
    frame[..., 2] = ((x // 16 + y // 16 + index) % 2) * 200
    side = max(min(height, width) // 6, 1)
    top = (index * 7) % max(height - side, 1)
    left = (index * 11) % max(width - side, 1)
    frame[top : top + side, left : left + side] = (255, 255, 0)
    return frame


def _frames(source: FrameSource | None, cfg: SampleBagConfig) -> Iterator[np.ndarray]:
    if source is None:
        for i in range(cfg.n_frames):
            yield synthetic_frame(i, cfg.height, cfg.width)
        return
    if callable(source):
        gen: Iterator[np.ndarray] = (source(i) for i in range(cfg.n_frames))
    else:
        gen = iter(source)
    for i in range(cfg.n_frames):
        try:
            frame = next(gen)
        except StopIteration:
            raise ValueError(f"frame source ended after {i} frames, n_frames is {cfg.n_frames}") from None
        _check_rgb(frame)
        if frame.shape[:2] != (cfg.height, cfg.width):
            if not cfg.resize:
                raise ValueError(
                    f"frame {i} is {frame.shape[1]}x{frame.shape[0]}, the bag is {cfg.width}x{cfg.height}"
                    " (set resize=True to resize)"
                )
            frame = cv2.resize(frame, (cfg.width, cfg.height), interpolation=cv2.INTER_AREA)
        yield frame


def write_sample_bag(
    path: str | Path, config: SampleBagConfig = SampleBagConfig(),  # noqa: B008  frozen dataclass: immutable
    frames: FrameSource | None = None
) -> BagInfo:
    """Write a new bag at path (a directory that must not exist). frames: a callable index -> frame,
    an iterable of frames ((H, W, 3) uint8 RGB), or None for synthetic_frame. Returns its summary."""
    cfg = config
    path = Path(path)
    ts = get_typestore(DEFAULT_STORE)
    T = ts.types
    period_ns = round(1e9 / cfg.rate_hz)
    lead_ns = min(1_000_000, period_ns // 2)  # prompt before its frame
    counts: dict[str, int] = {}
    types: dict[str, str] = {}

    def header(stamp_ns: int) -> Any:
        sec, nsec = split_ns(stamp_ns)
        stamp = T["builtin_interfaces/msg/Time"](sec=sec, nanosec=nsec)
        return T["std_msgs/msg/Header"](stamp=stamp, frame_id=cfg.frame_id)

    with Writer(path, version=cfg.bag_version, storage_plugin=_PLUGINS[cfg.storage]) as writer:
        conns = {}
        for topic, msgtype in (
            (cfg.prompt_topic, STRING_TYPE),
            (cfg.image_topic, IMAGE_TYPE),
            (cfg.compressed_topic, COMPRESSED_IMAGE_TYPE),
        ):
            if topic:
                conns[topic] = writer.add_connection(topic, msgtype, typestore=ts)
                counts[topic] = 0
                types[topic] = msgtype

        def put(topic: str, t_ns: int, msg: Any) -> None:
            writer.write(conns[topic], t_ns, ts.serialize_cdr(msg, types[topic]))
            counts[topic] += 1

        t_first = cfg.start_time_ns + lead_ns
        t_last = t_first
        n_prompt = 0
        for i, rgb in enumerate(_frames(frames, cfg)):
            t = t_first + i * period_ns
            t_last = t
            every = cfg.prompt_every_n_frames
            if cfg.prompt_topic and ((every == 0 and i == 0) or (every > 0 and i % every == 0)):
                put(cfg.prompt_topic, t - lead_ns, T[STRING_TYPE](data=cfg.prompts[n_prompt % len(cfg.prompts)]))
                n_prompt += 1
            if cfg.image_topic:
                data, step = rgb_to_image_data(rgb, cfg.encoding)
                put(cfg.image_topic, t, T[IMAGE_TYPE](
                    header=header(t), height=cfg.height, width=cfg.width, encoding=cfg.encoding,
                    is_bigendian=0, step=step, data=data,
                ))
            if cfg.compressed_topic:
                mono = cfg.encoding == "mono8"
                fmt = "mono8; jpeg compressed mono8" if mono else f"{cfg.encoding}; jpeg compressed bgr8"
                jpeg = np.frombuffer(encode_jpeg(rgb, cfg.jpeg_quality, mono=mono), dtype=np.uint8)
                put(cfg.compressed_topic, t, T[COMPRESSED_IMAGE_TYPE](header=header(t), format=fmt, data=jpeg))
    start = cfg.start_time_ns if cfg.prompt_topic else t_first
    return BagInfo(
        path=path, start_ns=start, end_ns=t_last, message_count=sum(counts.values()),
        topics={t: TopicInfo(t, types[t], n) for t, n in counts.items()},
    )


# --------------------------------------------------------------------------------------------
# Reading any bag


def _open_reader(path: Path) -> AnyReader:
    if not path.exists():
        raise FileNotFoundError(f"bag {str(path)!r} does not exist")
    reader = AnyReader([path], default_typestore=get_typestore(DEFAULT_STORE))
    try:
        reader.open()
    except AnyReaderError as exc:
        raise ValueError(f"cannot read bag {str(path)!r}: {exc}") from exc
    return reader


def bag_info(path: str | Path) -> BagInfo:
    """Topics, types, counts and time range of a bag (from its index; reads no messages)."""
    path = Path(path)
    reader = _open_reader(path)
    try:
        counts: dict[str, int] = {}
        types: dict[str, str] = {}
        for c in reader.connections:
            counts[c.topic] = counts.get(c.topic, 0) + c.msgcount
            types.setdefault(c.topic, c.msgtype)
        return BagInfo(
            path=path, start_ns=reader.start_time if counts else 0,
            end_ns=reader.end_time - 1 if counts else 0,  # rosbags' end_time is one past the last message
            message_count=reader.message_count,
            topics={t: TopicInfo(t, types[t], counts[t]) for t in sorted(counts)},
        )
    finally:
        reader.close()


def read_bag(
    path: str | Path, *, topics: Iterable[str] | None = None, include_other: bool = False,
    decode_compressed: bool = True,
) -> Iterator[BagRecord]:
    """The bag's messages in log-time order as BagRecords.

    decode_compressed: CompressedImage messages become ImageFrames (decoded) or, when False,
    CompressedFrames (the recorded bytes, for republishing as they are).

    topics: bag topic names to read (default: all). Messages of types other than Image,
    CompressedImage and String are skipped unless include_other; naming such a topic in topics
    without include_other is an error. An image whose encoding cannot be decoded raises
    ValueError naming the encoding, the topic and the time.
    """
    path = Path(path)
    reader = _open_reader(path)
    try:
        available = {c.topic: c.msgtype for c in reader.connections}
        wanted = set(available) if topics is None else set(topics)
        if missing := sorted(wanted - set(available)):
            raise ValueError(f"topics {missing} are not in bag {str(path)!r}; it has {sorted(available)}")
        if topics is not None and not include_other:
            other = sorted(f"{t} ({available[t]})" for t in wanted if available[t] not in DECODED_TYPES)
            if other:
                raise ValueError(
                    f"topics {other} are of types read_bag does not decode ({', '.join(DECODED_TYPES)});"
                    " pass include_other=True"
                )
        conns = [c for c in reader.connections if c.topic in wanted and (include_other or c.msgtype in DECODED_TYPES)]
        skipped = sorted({f"{c.topic} ({c.msgtype})" for c in reader.connections if c.topic in wanted} - {
            f"{c.topic} ({c.msgtype})" for c in conns
        })
        if skipped:
            logger.info("read_bag %s: skipping topics of types not decoded: %s", path, ", ".join(skipped))
        if not conns:
            return
        fallback = get_typestore(DEFAULT_STORE)
        for conn, t_ns, raw in reader.messages(connections=conns):
            store = _store_for(conn.msgtype, reader.typestore, fallback)
            if store is None:  # include_other, a type the bag does not define and we do not know
                yield BagRecord(conn.topic, conn.msgtype, t_ns, bytes(raw))
                continue
            msg = store.deserialize_cdr(raw, conn.msgtype)
            try:
                content = _decode(conn.msgtype, msg, decode_compressed)
            except ValueError as exc:
                raise ValueError(f"{exc} (topic {conn.topic}, log time {t_ns} ns, bag {str(path)!r})") from exc
            yield BagRecord(conn.topic, conn.msgtype, t_ns, content)
    finally:
        reader.close()


def _store_for(msgtype: str, own: Typestore, fallback: Typestore) -> Typestore | None:
    # A bag may embed definitions for some types only; the rest come from the standard store.
    if msgtype in own.fielddefs:
        return own
    if msgtype in fallback.fielddefs:
        return fallback
    return None


def _stamp_ns(msg: Any) -> int:
    return int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec)


def _decode(msgtype: str, msg: Any, decode_compressed: bool = True) -> Content:
    if msgtype == IMAGE_TYPE:
        rgb = image_to_rgb(msg.encoding, int(msg.height), int(msg.width), int(msg.step), msg.data)
        return ImageFrame(rgb, _stamp_ns(msg), msg.header.frame_id, msg.encoding, compressed=False)
    if msgtype == COMPRESSED_IMAGE_TYPE and not decode_compressed:
        return CompressedFrame(str(msg.format), _as_bytes(msg.data).tobytes(), _stamp_ns(msg), msg.header.frame_id)
    if msgtype == COMPRESSED_IMAGE_TYPE:
        rgb, kind = compressed_to_rgb(msg.format, msg.data)
        return ImageFrame(rgb, _stamp_ns(msg), msg.header.frame_id, kind, compressed=True)
    if msgtype == STRING_TYPE:
        return str(msg.data)
    return msg


# --------------------------------------------------------------------------------------------
# Replay


def parse_remaps(items: Iterable[str]) -> dict[str, str]:
    """["from:=to", ...] (the form of `ros2 bag play --remap`) to a dict; for string-list parameters."""
    out: dict[str, str] = {}
    for item in items:
        src, sep, dst = item.partition(":=")
        if not sep or not src.strip() or not dst.strip():
            raise ValueError(f"bad remap {item!r}: expected 'from_topic:=to_topic'")
        out[src.strip()] = dst.strip()
    return out


@dataclass(frozen=True)
class PlaySchedule:
    """How BagReplayer plays a bag."""

    rate: float = 1.0  # 1.0 real time, 2.0 twice as fast; 0.0 as fast as possible
    loops: int = 1  # 0: forever
    remap: Mapping[str, str] = field(default_factory=dict)  # bag topic -> published topic
    topics: tuple[str, ...] = ()  # bag topics to play; () all of a decoded type
    preload: bool = False  # decode the whole bag into memory before the first message
    preload_limit_bytes: int = 2 << 30  # refuse to preload more decoded bytes than this
    clock_hz: float = 0.0  # > 0: also yield CLOCK events at this wall-clock rate (sim time)
    # Bag time between the last message of one loop and the first of the next; None: the bag's
    # mean message interval (0.1 s for a one-message bag), so a looped stream keeps its rate.
    loop_gap_s: float | None = None
    pause_poll_s: float = 0.01  # how often should_pause() is asked while held
    max_sleep_s: float = 0.05  # longest single sleep, so stop() and clock ticks are not delayed
    late_tolerance_s: float = 0.005  # a message yielded later than this past its time counts as late
    # CompressedImage topics: decoded to ImageFrames (True) or kept as recorded, CompressedFrames.
    decode_compressed: bool = True

    def __post_init__(self) -> None:
        if not self.rate >= 0.0:
            raise ValueError(f"rate must be >= 0 (0: as fast as possible), got {self.rate}")
        if self.loops < 0:
            raise ValueError(f"loops must be >= 0 (0: forever), got {self.loops}")
        object.__setattr__(self, "remap", dict(self.remap))
        for src, dst in self.remap.items():
            if not isinstance(src, str) or not isinstance(dst, str) or not src or not dst:
                raise ValueError(f"remap entries must be non-empty topic names, got {src!r} -> {dst!r}")
        object.__setattr__(self, "topics", tuple(self.topics))
        if self.preload_limit_bytes <= 0:
            raise ValueError(f"preload_limit_bytes must be > 0, got {self.preload_limit_bytes}")
        if self.clock_hz < 0:
            raise ValueError(f"clock_hz must be >= 0, got {self.clock_hz}")
        if self.loop_gap_s is not None and self.loop_gap_s < 0:
            raise ValueError(f"loop_gap_s must be >= 0 or None, got {self.loop_gap_s}")
        for name in ("pause_poll_s", "max_sleep_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.late_tolerance_s < 0:
            raise ValueError(f"late_tolerance_s must be >= 0, got {self.late_tolerance_s}")


class EventKind(enum.Enum):
    MESSAGE = "message"  # publish record
    CLOCK = "clock"  # publish /clock = sim_time_ns (only with clock_hz > 0)


@dataclass(frozen=True)
class ReplayEvent:
    kind: EventKind
    sim_time_ns: int  # bag time this event stands for, plus time_offset_ns: the /clock value
    time_offset_ns: int  # loop * loop span; add it to header stamps that must not repeat across loops
    loop: int
    record: BagRecord | None = None  # MESSAGE: topic already remapped
    bag_topic: str = ""  # MESSAGE: the topic in the bag
    lateness_s: float = 0.0  # MESSAGE: how far past its scheduled wall time it was yielded


@dataclass
class ReplayStats:
    messages: int = 0
    clock_ticks: int = 0
    loops_completed: int = 0
    pauses: int = 0
    paused_s: float = 0.0
    late_messages: int = 0
    max_lateness_s: float = 0.0
    wall_s: float = 0.0  # from the first message to the last event
    preloaded_bytes: int = 0


class ReplayClock:
    """Maps bag time to wall time at a rate and holds while paused.

    A message at bag time t is due at t0 + paused + (t - t_start) / rate. Time held in a pause
    shifts every later message, so the stream resumes with its spacing instead of bursting to catch
    up; lateness from a slow consumer does not shift it (the player catches up, and counts it).
    time_fn and sleep_fn are injectable so tests run on a fake clock.
    """

    def __init__(
        self,
        rate: float,
        *,
        time_fn: Callable[[], float] = time.monotonic,
        sleep_fn: Callable[[float], None] = time.sleep,
        should_pause: Callable[[], bool] | None = None,
        clock_hz: float = 0.0,
        pause_poll_s: float = 0.01,
        max_sleep_s: float = 0.05,
        stop_event: threading.Event | None = None,
    ) -> None:
        if not rate >= 0:
            raise ValueError(f"rate must be >= 0, got {rate}")
        self.rate = rate
        self._time = time_fn
        self._sleep = sleep_fn
        self._should_pause = should_pause
        self._tick_s = 1.0 / clock_hz if clock_hz > 0 and rate > 0 else 0.0
        self._poll_s = pause_poll_s
        self._max_sleep_s = max_sleep_s
        self._stop = stop_event if stop_event is not None else threading.Event()
        self._t0 = 0.0
        self._sim0 = 0
        self._next_tick = 0.0
        self.paused_s = 0.0
        self.pauses = 0
        self.last_lateness_s = 0.0
        self._last_sim = 0

    def start(self, sim_start_ns: int) -> None:
        self._t0 = self._time()
        self._sim0 = sim_start_ns
        self._last_sim = sim_start_ns
        self._next_tick = self._t0
        self.paused_s = 0.0
        self.pauses = 0

    def due_s(self, sim_ns: int) -> float:
        """Wall time (time_fn's clock) at which bag time sim_ns is due."""
        if self.rate == 0:
            return self._time()
        return self._t0 + self.paused_s + (sim_ns - self._sim0) / 1e9 / self.rate

    def sim_now_ns(self) -> int:
        """Bag time corresponding to now (frozen during a hold; the last message's time at rate 0)."""
        if self.rate == 0:
            return self._last_sim
        return self._sim0 + round((self._time() - self._t0 - self.paused_s) * self.rate * 1e9)

    def wait(self, sim_ns: int) -> Iterator[int]:
        """Sleep until sim_ns is due, then hold while should_pause(). Yields the sim time of every
        /clock tick that falls due meanwhile; leaves the lateness in last_lateness_s."""
        now = self._time()
        due = self.due_s(sim_ns)
        while not self._stop.is_set():
            now = self._time()
            if self._tick_s and now >= self._next_tick:
                yield min(self.sim_now_ns(), sim_ns)
                self._next_tick = max(self._next_tick + self._tick_s, now)
                continue
            if now >= due:
                break
            nap = min(due - now, self._max_sleep_s)
            if self._tick_s:
                nap = min(nap, self._next_tick - now)
            self._sleep(nap)
        self.last_lateness_s = max(0.0, now - due) if self.rate > 0 else 0.0
        self._last_sim = sim_ns
        if self._should_pause is None or self._stop.is_set() or not self._should_pause():
            return
        self.pauses += 1
        held_from = self._time()
        logger.info("replay paused at bag time %d ns", sim_ns)
        while not self._stop.is_set() and self._should_pause():
            now = self._time()
            if self._tick_s and now >= self._next_tick:
                yield sim_ns  # sim time stands still while held
                self._next_tick = max(self._next_tick + self._tick_s, now)
            self._sleep(self._poll_s)
        held = self._time() - held_from
        self.paused_s += held
        logger.info("replay resumed after %.3f s", held)


RecordSource = Union[str, Path, Sequence[BagRecord]]


class BagReplayer:
    """Plays a bag (or records already in memory) as a stream of ReplayEvents on a ReplayClock.

        replayer = BagReplayer("run.mcap", PlaySchedule(rate=2.0, loops=0), should_pause=lambda: paused)
        for ev in replayer:            # on the replay thread; replayer.stop() from anywhere ends it
            if ev.kind is EventKind.CLOCK: publish_clock(ev.sim_time_ns)
            else: publish(ev.record.topic, ev.record.content)

    With preload the bag is read and decoded in the constructor, so the first message goes out
    with no disk or decode time in the schedule.
    """

    def __init__(
        self,
        source: RecordSource,
        config: PlaySchedule = PlaySchedule(),  # noqa: B008  frozen dataclass: immutable default
        *,
        should_pause: Callable[[], bool] | None = None,
        time_fn: Callable[[], float] = time.monotonic,
        sleep_fn: Callable[[float], None] = time.sleep,
    ) -> None:
        self.config = config
        self._should_pause = should_pause
        self._time = time_fn
        self._sleep = sleep_fn
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._stats = ReplayStats()
        self._path: Path | None = None
        self._records: list[BagRecord] | None = None
        if isinstance(source, (str, Path)):
            self._path = Path(source)
            info = bag_info(self._path)
            self.info: BagInfo | None = info
            if missing := sorted(set(config.topics) - set(info.topics)):
                raise ValueError(f"topics {missing} are not in bag {str(self._path)!r}; it has {sorted(info.topics)}")
            names = set(config.topics) or set(info.topics)
            if unused := sorted(set(config.remap) - names):
                logger.warning("remap for topics not played from %s: %s", self._path, unused)
            if config.preload:
                self._records = self._preload()
        else:
            self.info = None
            records = sorted(source, key=lambda r: r.log_time_ns)
            if config.topics:
                records = [r for r in records if r.topic in config.topics]
            self._records = records

    def _read_once(self) -> Iterator[BagRecord]:
        if self._records is not None:
            return iter(self._records)
        assert self._path is not None
        return read_bag(self._path, topics=self.config.topics or None,
                        decode_compressed=self.config.decode_compressed)

    def _preload(self) -> list[BagRecord]:
        assert self._path is not None
        out: list[BagRecord] = []
        total = 0
        limit = self.config.preload_limit_bytes
        t = time.perf_counter()
        for rec in read_bag(self._path, topics=self.config.topics or None,
                            decode_compressed=self.config.decode_compressed):
            c = rec.content
            total += (c.rgb.nbytes if isinstance(c, ImageFrame) else len(c.data) if isinstance(c, CompressedFrame)
                      else len(c) if isinstance(c, str) else 0)
            if total > limit:
                raise ValueError(
                    f"preloading {str(self._path)!r} needs more than preload_limit_bytes={limit}"
                    f" (at message {len(out)})"
                )
            out.append(rec)
        self._stats.preloaded_bytes = total
        logger.info(
            "preloaded %d messages (%.1f MB) from %s in %.2f s",
            len(out), total / 1e6, self._path, time.perf_counter() - t,
        )
        return out

    def stop(self) -> None:
        """End the replay at the next sleep or poll; safe from any thread."""
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def stats(self) -> ReplayStats:
        with self._lock:
            return dataclasses.replace(self._stats)

    def __iter__(self) -> Iterator[ReplayEvent]:
        cfg = self.config
        clock = ReplayClock(
            cfg.rate, time_fn=self._time, sleep_fn=self._sleep, should_pause=self._should_pause,
            clock_hz=cfg.clock_hz, pause_poll_s=cfg.pause_poll_s, max_sleep_s=cfg.max_sleep_s,
            stop_event=self._stop,
        )
        with self._lock:
            self._stats = ReplayStats(preloaded_bytes=self._stats.preloaded_bytes)
        first_ns: int | None = None
        span_ns = 0
        t_begin = 0.0
        loop = 0
        while cfg.loops == 0 or loop < cfg.loops:
            offset = loop * span_ns
            n = 0
            last_ns = 0
            for rec in self._read_once():
                if first_ns is None:
                    first_ns = rec.log_time_ns
                    clock.start(first_ns)
                    t_begin = self._time()
                sim = rec.log_time_ns + offset
                for tick in clock.wait(sim):
                    with self._lock:
                        self._stats.clock_ticks += 1
                    yield ReplayEvent(EventKind.CLOCK, tick, offset, loop)
                if self._stop.is_set():
                    return
                late = clock.last_lateness_s
                topic = cfg.remap.get(rec.topic, rec.topic)
                out = rec if topic == rec.topic else dataclasses.replace(rec, topic=topic)
                with self._lock:
                    s = self._stats
                    s.messages += 1
                    s.pauses, s.paused_s = clock.pauses, clock.paused_s
                    s.late_messages += late > cfg.late_tolerance_s
                    s.max_lateness_s = max(s.max_lateness_s, late)
                    s.wall_s = self._time() - t_begin
                yield ReplayEvent(EventKind.MESSAGE, sim, offset, loop, out, rec.topic, late)
                n += 1
                last_ns = rec.log_time_ns
            if loop == 0:
                if n == 0 or first_ns is None:
                    raise ValueError(
                        f"nothing to replay: no decodable messages on topics {list(cfg.topics) or 'all'}"
                        f" in {self._path or 'the given records'}"
                    )
                if cfg.loop_gap_s is not None:
                    gap_ns = round(cfg.loop_gap_s * 1e9)
                else:
                    gap_ns = (last_ns - first_ns) // (n - 1) if n > 1 else 100_000_000
                span_ns = last_ns - first_ns + gap_ns
            loop += 1
            with self._lock:
                self._stats.loops_completed = loop
                self._stats.wall_s = self._time() - t_begin
