"""Rosbag2 files of messages kept as their serialized (CDR) bytes, for any message type, without ROS.

`bag.io` decodes camera frames and strings; this module is for everything else a benchmark or a
replay wants back exactly as it went over the wire, e.g. the Prompt and VisualFeatures messages a
real edge node published. The bytes are what rosbag2 itself stores (the middleware's CDR with its
4-byte encapsulation header), so a bag written here opens in `ros2 bag info/play`, and a bag
recorded by `ros2 bag record` reads back here. The message definitions go into the bag (from the
.msg texts the caller passes), so the bag is self-describing: rosbags, mcap tools and ros2 bag can
all decode it without this package.

Decoding the bytes into message objects is the caller's business (rclpy's deserialize_message on
the ROS side); this module stays free of rclpy.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from rosbags.highlevel import AnyReader, AnyReaderError
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import get_types_from_msg, get_typestore
from rosbags.typesys.store import Typestore

from .io import DEFAULT_STORE, Storage

_PLUGINS = {Storage.SQLITE3: StoragePlugin.SQLITE3, Storage.MCAP: StoragePlugin.MCAP}


@dataclass(frozen=True)
class RawRecord:
    """One message as stored: its topic, type name (pkg/msg/Name), log time and CDR bytes."""

    topic: str
    msgtype: str
    log_time_ns: int
    data: bytes


def typestore_with(definitions: Mapping[str, str]) -> Typestore:
    """The standard ROS 2 types plus `definitions` ({"pkg/msg/Name": .msg text}); nested types of
    the same package must be among them."""
    ts = get_typestore(DEFAULT_STORE)
    types: dict = {}
    for name, text in definitions.items():
        if name.count("/") != 2 or "/msg/" not in name:
            raise ValueError(f"message type names look like 'pkg/msg/Name', got {name!r}")
        types.update(get_types_from_msg(text, name))
    ts.register(types)
    return ts


def write_raw_bag(path: str | Path, records: Iterable[RawRecord], definitions: Mapping[str, str],
                  storage: Storage = Storage.SQLITE3, bag_version: int = 9) -> dict[str, int]:
    """Write records (in any order; rosbag2 indexes by log time) to a new bag at `path`.
    Returns {topic: messages written}. A topic must keep one type; every type must be defined."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"bag {str(path)!r} exists; remove it or choose another path")
    ts = typestore_with(definitions)
    counts: dict[str, int] = {}
    with Writer(path, version=bag_version, storage_plugin=_PLUGINS[Storage(storage)]) as writer:
        conns: dict[str, tuple[object, str]] = {}
        for rec in records:
            if rec.topic not in conns:
                if rec.msgtype not in ts.fielddefs:
                    raise ValueError(f"no definition for {rec.msgtype!r} (topic {rec.topic}); "
                                     f"defined: {sorted(definitions)}")
                conns[rec.topic] = (writer.add_connection(rec.topic, rec.msgtype, typestore=ts), rec.msgtype)
            conn, msgtype = conns[rec.topic]
            if msgtype != rec.msgtype:
                raise ValueError(f"topic {rec.topic} holds {msgtype}, got a {rec.msgtype} for it")
            if len(rec.data) < 4:
                raise ValueError(f"{rec.topic} at {rec.log_time_ns}: {len(rec.data)} bytes is no CDR message")
            writer.write(conn, rec.log_time_ns, rec.data)
            counts[rec.topic] = counts.get(rec.topic, 0) + 1
    return counts


def read_raw_bag(path: str | Path, topics: Iterable[str] | None = None) -> Iterator[RawRecord]:
    """Every message of the bag (sqlite3 or mcap) on `topics` (default all) in log-time order, as bytes."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"bag {str(path)!r} does not exist")
    reader = AnyReader([path], default_typestore=get_typestore(DEFAULT_STORE))
    try:
        reader.open()
    except AnyReaderError as exc:
        raise ValueError(f"cannot read bag {str(path)!r}: {exc}") from exc
    try:
        available = {c.topic for c in reader.connections}
        wanted = available if topics is None else set(topics)
        if missing := sorted(wanted - available):
            raise ValueError(f"topics {missing} are not in bag {str(path)!r}; it has {sorted(available)}")
        conns = [c for c in reader.connections if c.topic in wanted]
        for conn, t_ns, raw in reader.messages(connections=conns):
            yield RawRecord(conn.topic, conn.msgtype, t_ns, bytes(raw))
    finally:
        reader.close()
