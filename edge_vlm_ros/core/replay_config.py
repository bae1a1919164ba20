"""Configuration of the rosbag replay node (replay_node.py): one frozen dataclass, validated here.

Kept apart from core/config.py so the replay tooling can change without touching the pipeline's
configuration. The node declares its ROS parameters from these fields (the `description` metadata
becomes the ParameterDescriptor) and config/replay.yaml sets them. How the bag is scheduled
(bag.io.ReplayConfig) is derived from this in the node; this module stays ROS-free and bag-free.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import _f


def _names(values: list[str]) -> list[str]:
    # YAML cannot type an empty list, so config files write [""]: empty entries mean nothing.
    return [v.strip() for v in values if v.strip()]


@dataclass(frozen=True)
class ReplayConfig:
    bag_path: str = _f("", "rosbag2 to play: a bag folder (sqlite3 or mcap, from any writer) or a .mcap "
                           "file. Required.")
    rate: float = _f(1.0, "Playback rate: 1.0 real time, 2.0 twice as fast, 0.0 as fast as possible.")
    loops: int = _f(1, "How many times the bag is played; 0 = forever.")
    remaps: list[str] = _f([], "Topic remaps 'from:=to' (bag topic -> published topic), as `ros2 bag play "
                               "--remap`; e.g. /camera/image_raw/compressed:=/camera/image_raw.")
    topics: list[str] = _f([], "Bag topics to play (empty = every sensor_msgs/Image, CompressedImage and "
                               "std_msgs/String topic).")
    robots: list[str] = _f([], "Robot namespaces to replay into: each (remapped) bag topic /x is published "
                               "as /<robot>/x for every robot. Empty = publish the topics as they are.")
    publish_clock: bool = _f(False, "Publish /clock (rosgraph_msgs/Clock) with bag time, for use_sim_time.")
    clock_hz: float = _f(100.0, "Rate of /clock messages when publish_clock is set.")
    preload: bool = _f(False, "Decode the whole bag into memory before the first message (no disk or "
                              "decode time inside the schedule).")
    preload_limit_mb: int = _f(2048, "Refuse to preload more decoded bytes than this many MB.")
    pause_on_flow_control: bool = _f(True, "Subscribe each robot's edge_vlm/flow_control and hold the "
                                           "replay while any server says PAUSE.")
    restamp: bool = _f(False, "Set header.stamp of replayed images to the publish time (end-to-end latency "
                              "from the replay); otherwise the bag's stamp, shifted by the loop span.")
    wait_for_subscribers_s: float = _f(10.0, "Before the first message, wait up to this long for a "
                                             "subscriber on every image topic (and, with "
                                             "pause_on_flow_control, a flow state from every robot's "
                                             "server); 0 = do not wait.")
    start_delay_s: float = _f(0.0, "Extra wait before the first message.")
    shutdown_when_done: bool = _f(True, "Exit the node when the replay has ended (as `ros2 bag play`).")
    stats_path: str = _f("", "If set, the replay statistics are written as JSON to this file at the end.")

    def __post_init__(self) -> None:
        for name in ("remaps", "topics", "robots"):
            object.__setattr__(self, name, _names(list(getattr(self, name))))
        if not self.bag_path:
            raise ValueError("bag_path is required: the rosbag2 folder or .mcap file to play, got ''")
        if not self.rate >= 0.0:
            raise ValueError(f"rate must be >= 0 (0: as fast as possible), got {self.rate}")
        if self.loops < 0:
            raise ValueError(f"loops must be >= 0 (0: forever), got {self.loops}")
        for item in self.remaps:
            src, sep, dst = item.partition(":=")
            if not sep or not src.strip() or not dst.strip():
                raise ValueError(f"bad remap {item!r}: expected 'from_topic:=to_topic'")
        if len(set(self.robots)) != len(self.robots):
            raise ValueError(f"robots must be distinct, got {self.robots!r}")
        for r in self.robots:
            if not r.replace("_", "").isalnum():
                raise ValueError(f"robot name {r!r} must be a valid ROS namespace token ([A-Za-z0-9_])")
        if self.publish_clock and not self.clock_hz > 0:
            raise ValueError(f"clock_hz must be > 0 with publish_clock, got {self.clock_hz}")
        if self.preload_limit_mb < 1:
            raise ValueError(f"preload_limit_mb must be >= 1, got {self.preload_limit_mb}")
        if self.wait_for_subscribers_s < 0 or self.start_delay_s < 0:
            raise ValueError(f"wait_for_subscribers_s={self.wait_for_subscribers_s} and start_delay_s="
                             f"{self.start_delay_s} must be >= 0")

    def remap_dict(self) -> dict[str, str]:
        out = {}
        for item in self.remaps:
            src, _, dst = item.partition(":=")
            out[src.strip()] = dst.strip()
        return out

    def output_topics(self, topic: str) -> list[str]:
        """Where a bag topic is published: remapped, then put under each robot's namespace."""
        t = self.remap_dict().get(topic, topic)
        if not self.robots:
            return [t]
        return [f"/{r}/{t.lstrip('/')}" for r in self.robots]
