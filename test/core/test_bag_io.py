"""Rosbag2 writing, reading (of our bags and of bags other tools wrote) and replay scheduling.

Replay timing runs on a fake clock (injected time and sleep), so nothing here waits on real time.
"""

from __future__ import annotations

import itertools
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

from edge_vlm_ros.bag import (
    BagRecord,
    BagReplayer,
    EventKind,
    ImageFrame,
    ReplayClock,
    PlaySchedule,
    SampleBagConfig,
    Storage,
    bag_info,
    compressed_to_rgb,
    image_to_rgb,
    parse_remaps,
    read_bag,
    split_ns,
    synthetic_frame,
    write_sample_bag,
)

W, H = 40, 24  # small frames keep every bag tiny
PROMPT_TOPIC = SampleBagConfig().prompt_topic
T0 = 1_700_000_000_000_000_000


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept = 0.0

    def time(self) -> float:
        return self.now

    def sleep(self, dt: float) -> None:
        assert dt >= 0, dt
        self.slept += dt
        self.now += dt


def rand_frames(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for _ in range(n)]


def gray(rgb: np.ndarray) -> np.ndarray:
    g = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    return np.repeat(g[:, :, None], 3, axis=2)


# ---------------------------------------------------------------------------------------------
# our writer -> our reader


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "mono8"])
def test_sample_bag_roundtrip(tmp_path: Path, storage: str, encoding: str) -> None:
    frames = [synthetic_frame(i + 3, H, W) for i in range(6)]  # structured: JPEG keeps it recognisable
    cfg = SampleBagConfig(
        storage=storage, width=W, height=H, rate_hz=20.0, n_frames=6, encoding=encoding,
        compressed_topic="/camera/image_raw/compressed", prompts=("p0", "p1"), prompt_every_n_frames=2,
    )
    info = write_sample_bag(tmp_path / "bag", cfg, frames)
    assert info.topics["/camera/image_raw"].count == 6
    assert info.topics["/camera/image_raw/compressed"].count == 6
    assert info.topics[PROMPT_TOPIC].count == 3
    on_disk = bag_info(tmp_path / "bag")
    assert (on_disk.start_ns, on_disk.end_ns, on_disk.message_count) == (info.start_ns, info.end_ns, 15)
    assert on_disk.topics == info.topics

    recs = list(read_bag(tmp_path / "bag"))
    assert [r.log_time_ns for r in recs] == sorted(r.log_time_ns for r in recs)
    raw = [r for r in recs if r.topic == "/camera/image_raw"]
    jpg = [r for r in recs if r.topic == "/camera/image_raw/compressed"]
    prompts = [r for r in recs if r.topic == PROMPT_TOPIC]
    assert [p.content for p in prompts] == ["p0", "p1", "p0"]
    period = 50_000_000
    assert [r.log_time_ns - raw[0].log_time_ns for r in raw] == [i * period for i in range(6)]
    for i, (r, j) in enumerate(zip(raw, jpg)):
        assert isinstance(r.content, ImageFrame) and isinstance(j.content, ImageFrame)
        assert r.content.stamp_ns == r.log_time_ns == j.content.stamp_ns
        assert r.content.encoding == encoding and not r.content.compressed
        assert j.content.encoding == "jpeg" and j.content.compressed
        assert r.content.rgb.shape == (H, W, 3) and r.content.rgb.dtype == np.uint8
        want = gray(frames[i]) if encoding == "mono8" else frames[i]
        assert np.array_equal(r.content.rgb, want)
        assert r.content.rgb.flags.writeable and r.content.rgb.flags.c_contiguous
        # JPEG at quality 90: close to the frame, and far from it with red and blue swapped.
        err = np.abs(j.content.rgb.astype(int) - want.astype(int)).mean()
        assert err < 12
        if encoding != "mono8":
            assert np.abs(j.content.rgb[..., ::-1].astype(int) - want.astype(int)).mean() > 4 * err
    # A prompt comes just before the frame it goes with.
    assert prompts[1].log_time_ns < raw[2].log_time_ns and prompts[1].log_time_ns > raw[1].log_time_ns


def test_frame_sources(tmp_path: Path) -> None:
    frames = rand_frames(3, seed=1)
    cfg = SampleBagConfig(width=W, height=H, n_frames=3, prompt_topic="")
    write_sample_bag(tmp_path / "a", cfg, lambda i: frames[i])
    write_sample_bag(tmp_path / "b", cfg, iter(frames))
    for name in ("a", "b"):
        got = [r.content.rgb for r in read_bag(tmp_path / name)]
        assert all(np.array_equal(g, f) for g, f in zip(got, frames, strict=True))
    # None: the synthetic source, which changes from frame to frame
    write_sample_bag(tmp_path / "c", cfg)
    got = [r.content.rgb for r in read_bag(tmp_path / "c")]
    assert np.array_equal(got[1], synthetic_frame(1, H, W)) and not np.array_equal(got[0], got[1])

    with pytest.raises(ValueError, match="ended after 2 frames"):
        write_sample_bag(tmp_path / "d", cfg, frames[:2])
    with pytest.raises(ValueError, match="80x48.*resize"):
        write_sample_bag(tmp_path / "e", cfg, [np.zeros((48, 80, 3), np.uint8)] * 3)
    with pytest.raises(ValueError, match="uint8"):
        write_sample_bag(tmp_path / "f", cfg, [np.zeros((H, W, 3), np.float32)] * 3)
    big = [np.zeros((48, 80, 3), np.uint8)] * 3
    write_sample_bag(tmp_path / "g", SampleBagConfig(width=W, height=H, n_frames=3, resize=True), big)
    assert next(r for r in read_bag(tmp_path / "g") if r.msgtype.endswith("Image")).content.rgb.shape == (H, W, 3)


def test_sample_config_validation() -> None:
    with pytest.raises(ValueError, match="'tiff'"):
        SampleBagConfig(storage="tiff")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'rgba8'"):
        SampleBagConfig(encoding="rgba8")
    with pytest.raises(ValueError, match="absolute.*'camera'"):
        SampleBagConfig(image_topic="camera")
    with pytest.raises(ValueError, match="rate_hz.*-1"):
        SampleBagConfig(rate_hz=-1)
    assert SampleBagConfig(storage="mcap").storage is Storage.MCAP


# ---------------------------------------------------------------------------------------------
# a bag written by another tool (the rosbags library directly, as ros2 bag record would lay it out)


def _foreign_bag(path: Path, plugin: StoragePlugin) -> dict[str, tuple[np.ndarray, int]]:
    """Camera-driver-like topics: padded bgr8 rows, rgba8, bgra8, mono8, image_transport JPEG,
    bare PNG, a String, and an IMU topic the reader should skip. Header stamps differ from log
    times, as on a robot. Returns (RGB, header stamp) per image topic."""
    ts = get_typestore(Stores.ROS2_JAZZY)
    T = ts.types
    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    smooth = cv2.GaussianBlur(rgb, (0, 0), 3)  # compresses without large error
    alpha = np.full((H, W, 1), 255, np.uint8)
    bgr = rgb[..., ::-1]

    def hdr(t: int) -> object:
        sec, ns = split_ns(t)
        stamp = T["builtin_interfaces/msg/Time"](sec=sec, nanosec=ns)
        return T["std_msgs/msg/Header"](stamp=stamp, frame_id="cam_optical")

    def image(t: int, enc: str, px: np.ndarray, pad: int = 0) -> object:
        rows = px.reshape(H, -1)
        step = rows.shape[1] + pad
        data = np.zeros((H, step), np.uint8)
        data[:, : rows.shape[1]] = rows
        return T["sensor_msgs/msg/Image"](
            header=hdr(t), height=H, width=W, encoding=enc, is_bigendian=0, step=step, data=data.reshape(-1)
        )

    def compressed(t: int, fmt: str, blob: np.ndarray) -> object:
        return T["sensor_msgs/msg/CompressedImage"](header=hdr(t), format=fmt, data=blob.reshape(-1))

    _, jpg = cv2.imencode(".jpg", cv2.cvtColor(smooth, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    _, png = cv2.imencode(".png", cv2.cvtColor(smooth, cv2.COLOR_RGB2BGR))
    t = T0 + 5_000_000_000
    msgs = [
        ("/camera/color/image_raw", "sensor_msgs/msg/Image", image(t, "bgr8", rgb[..., ::-1], pad=8)),
        ("/camera/rgba", "sensor_msgs/msg/Image", image(t + 1, "rgba8", np.concatenate([rgb, alpha], axis=2))),
        ("/camera/bgra", "sensor_msgs/msg/Image", image(t + 2, "bgra8", np.concatenate([bgr, alpha], axis=2))),
        ("/camera/mono", "sensor_msgs/msg/Image", image(t + 3, "mono8", cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), pad=3)),
        ("/camera/color/image_raw/compressed", "sensor_msgs/msg/CompressedImage",
         compressed(t + 4, "bgr8; jpeg compressed bgr8", jpg)),
        ("/camera/png", "sensor_msgs/msg/CompressedImage", compressed(t + 5, "png", png)),
        ("/instruction", "std_msgs/msg/String", T["std_msgs/msg/String"](data="pick up the red block")),
        ("/imu", "sensor_msgs/msg/Imu", T["sensor_msgs/msg/Imu"](
            header=hdr(t),
            orientation=T["geometry_msgs/msg/Quaternion"](x=0.0, y=0.0, z=0.0, w=1.0),
            orientation_covariance=np.zeros(9),
            angular_velocity=T["geometry_msgs/msg/Vector3"](x=0.0, y=0.0, z=0.0),
            angular_velocity_covariance=np.zeros(9),
            linear_acceleration=T["geometry_msgs/msg/Vector3"](x=0.0, y=0.0, z=9.8),
            linear_acceleration_covariance=np.zeros(9),
        )),
    ]
    with Writer(path, version=9, storage_plugin=plugin) as w:
        for i, (topic, msgtype, msg) in enumerate(msgs):
            conn = w.add_connection(topic, msgtype, typestore=ts)
            w.write(conn, t + 10 * i, ts.serialize_cdr(msg, msgtype))
    return {
        "/camera/color/image_raw": (rgb, t), "/camera/rgba": (rgb, t + 1), "/camera/bgra": (rgb, t + 2),
        "/camera/mono": (gray(rgb), t + 3),
        "/camera/color/image_raw/compressed": (smooth, t + 4),
        "/camera/png": (smooth, t + 5),
    }


@pytest.mark.parametrize("plugin", [StoragePlugin.SQLITE3, StoragePlugin.MCAP])
def test_read_foreign_bag(tmp_path: Path, plugin: StoragePlugin) -> None:
    truth = _foreign_bag(tmp_path / "robot", plugin)
    recs = list(read_bag(tmp_path / "robot"))
    assert "/imu" not in {r.topic for r in recs}  # not a decoded type: skipped
    assert len(recs) == 7
    by_topic = {r.topic: r for r in recs}
    assert by_topic["/instruction"].content == "pick up the red block"
    for topic, (want, stamp) in truth.items():
        frame = by_topic[topic].content
        assert isinstance(frame, ImageFrame), topic
        assert frame.frame_id == "cam_optical" and frame.stamp_ns == stamp
        assert frame.rgb.shape == (H, W, 3)
        if frame.compressed:
            assert np.abs(frame.rgb.astype(int) - want.astype(int)).mean() < 3, topic
        else:
            assert np.array_equal(frame.rgb, want), topic
    assert by_topic["/camera/png"].content.encoding == "png"
    assert np.array_equal(by_topic["/camera/png"].content.rgb, truth["/camera/png"][0])  # lossless

    # Topic selection, and types we do not decode only on request.
    only = list(read_bag(tmp_path / "robot", topics=["/camera/mono", "/instruction"]))
    assert [r.topic for r in only] == ["/camera/mono", "/instruction"]
    with pytest.raises(ValueError, match=r"/imu \(sensor_msgs/msg/Imu\).*include_other"):
        list(read_bag(tmp_path / "robot", topics=["/imu"]))
    imu = list(read_bag(tmp_path / "robot", topics=["/imu"], include_other=True))
    assert len(imu) == 1 and imu[0].content.header.frame_id == "cam_optical"
    with pytest.raises(ValueError, match="/nope"):
        list(read_bag(tmp_path / "robot", topics=["/nope"]))

    # And it replays.
    evs = list(BagReplayer(tmp_path / "robot", PlaySchedule(rate=0)))
    assert len(evs) == 7 and all(e.kind is EventKind.MESSAGE for e in evs)


def test_read_bag_without_message_definitions(tmp_path: Path) -> None:
    """Humble's sqlite3 bags (schema 3) embed no message definitions: standard ones are used."""
    frames = rand_frames(2, seed=3)
    write_sample_bag(tmp_path / "h", SampleBagConfig(width=W, height=H, n_frames=2), frames)
    db = next((tmp_path / "h").glob("*.db3"))
    con = sqlite3.connect(db)
    con.execute("DROP TABLE message_definitions")
    con.execute("UPDATE schema SET schema_version = 3")
    con.commit()
    con.close()
    recs = list(read_bag(tmp_path / "h"))
    assert [r.content for r in recs if r.topic == PROMPT_TOPIC] == ["Describe the scene."]
    images = [r.content.rgb for r in recs if r.topic != PROMPT_TOPIC]
    assert all(np.array_equal(got, f) for got, f in zip(images, frames, strict=True))


def test_unsupported_encodings_are_named(tmp_path: Path) -> None:
    ts = get_typestore(Stores.ROS2_HUMBLE)
    T = ts.types
    depth = np.zeros(H * W * 2, np.uint8)
    msg = T["sensor_msgs/msg/Image"](
        header=T["std_msgs/msg/Header"](stamp=T["builtin_interfaces/msg/Time"](sec=1, nanosec=0), frame_id="d"),
        height=H, width=W, encoding="16UC1", is_bigendian=0, step=2 * W, data=depth,
    )
    with Writer(tmp_path / "d", version=9) as w:
        c = w.add_connection("/depth", "sensor_msgs/msg/Image", typestore=ts)
        w.write(c, 5, ts.serialize_cdr(msg, "sensor_msgs/msg/Image"))
    with pytest.raises(ValueError, match=r"'16UC1'.*/depth"):
        list(read_bag(tmp_path / "d"))

    for enc in ("yuv422", "bayer_rggb8", "mono16", "32FC1"):
        with pytest.raises(ValueError, match=repr(enc)):
            image_to_rgb(enc, 2, 2, 8, bytes(16))
    with pytest.raises(ValueError, match="compressedDepth"):
        compressed_to_rgb("16UC1; compressedDepth png", b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ValueError, match="'mono16'"):
        compressed_to_rgb("mono16; png compressed mono16", b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ValueError, match="'tiff'"):
        compressed_to_rgb("tiff", b"II*\x00")
    with pytest.raises(ValueError, match="step 5"):
        image_to_rgb("rgb8", 2, 2, 5, bytes(12))
    with pytest.raises(ValueError, match="needs 12"):
        image_to_rgb("rgb8", 2, 2, 6, bytes(11))


def test_pixel_conversions() -> None:
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    assert np.array_equal(image_to_rgb("rgb8", 2, 3, 9, rgb.tobytes()), rgb)
    assert np.array_equal(image_to_rgb("bgr8", 2, 3, 9, rgb[..., ::-1].tobytes()), rgb)
    rgba = np.concatenate([rgb, np.full((2, 3, 1), 7, np.uint8)], axis=2)
    assert np.array_equal(image_to_rgb("rgba8", 2, 3, 12, rgba.tobytes()), rgb)
    bgra = np.concatenate([rgb[..., ::-1], np.full((2, 3, 1), 7, np.uint8)], axis=2)
    assert np.array_equal(image_to_rgb("bgra8", 2, 3, 12, bgra.tobytes()), rgb)
    # padded rows, and a last row without its padding
    padded = np.zeros((2, 11), np.uint8)
    padded[:, :9] = rgb.reshape(2, 9)
    assert np.array_equal(image_to_rgb("rgb8", 2, 3, 11, padded.reshape(-1)[:-2].tobytes()), rgb)
    # image_transport may say the compressed pixels were rgb8: then they decode in that order
    _, png = cv2.imencode(".png", rgb)  # rgb handed over as is
    out, kind = compressed_to_rgb("rgb8; png compressed rgb8", png.tobytes())
    assert kind == "png" and np.array_equal(out, rgb)
    out, kind = compressed_to_rgb("", cv2.imencode(".png", rgb[..., ::-1])[1].tobytes())  # empty format: sniffed
    assert kind == "png" and np.array_equal(out, rgb)


def test_core_imports_no_rclpy() -> None:
    code = "import sys, edge_vlm_ros.bag, edge_vlm_ros.bag.netns; sys.exit('rclpy' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


# ---------------------------------------------------------------------------------------------
# replay


def _records(n: int = 10, hz: float = 10.0, topic: str = "/camera/image_raw") -> list[BagRecord]:
    period = round(1e9 / hz)
    return [BagRecord(topic, "sensor_msgs/msg/Image", T0 + i * period, f"frame{i}") for i in range(n)]


def _play(records: object, cfg: PlaySchedule, clock: FakeClock, **kw: object) -> list[tuple[float, object]]:
    r = BagReplayer(records, cfg, time_fn=clock.time, sleep_fn=clock.sleep, **kw)  # type: ignore[arg-type]
    return [(clock.now, ev) for ev in r]


@pytest.mark.parametrize("rate", [1.0, 2.0, 0.5])
def test_replay_scaled_rate(rate: float) -> None:
    clock = FakeClock()
    out = _play(_records(), PlaySchedule(rate=rate), clock)
    t = [now for now, _ in out]
    assert [ev.record.content for _, ev in out] == [f"frame{i}" for i in range(10)]
    assert np.allclose(np.diff(t), 0.1 / rate, atol=1e-9)
    assert all(ev.lateness_s < 1e-9 and ev.kind is EventKind.MESSAGE for _, ev in out)


def test_replay_as_fast_as_possible_never_sleeps() -> None:
    clock = FakeClock()
    r = BagReplayer(_records(), PlaySchedule(rate=0), time_fn=clock.time, sleep_fn=clock.sleep)
    assert len(list(r)) == 10 and clock.slept == 0.0
    assert r.stats().messages == 10 and r.stats().loops_completed == 1


def test_replay_loops_and_remap() -> None:
    clock = FakeClock()
    recs = _records(5) + [BagRecord("/prompt", "std_msgs/msg/String", T0 + 1, "q")]
    cfg = PlaySchedule(rate=1.0, loops=3, remap=parse_remaps(["/camera/image_raw:=camera/image", "/prompt:=prompt"]))
    out = _play(recs, cfg, clock)
    msgs = [ev for _, ev in out]
    assert len(msgs) == 18
    assert {ev.record.topic for ev in msgs} == {"camera/image", "prompt"}
    assert {ev.bag_topic for ev in msgs} == {"/camera/image_raw", "/prompt"}
    assert [ev.loop for ev in msgs] == [0] * 6 + [1] * 6 + [2] * 6
    # Loop span = duration (0.4 s) + the mean interval (0.4 s over 5 intervals): the stream keeps its pace.
    span = msgs[6].time_offset_ns
    assert span == 400_000_000 + 80_000_000 and msgs[12].time_offset_ns == 2 * span
    sims = [ev.sim_time_ns for ev in msgs]
    assert sims == sorted(sims)
    t = [now for now, ev in out if ev.bag_topic == "/camera/image_raw"]
    assert np.isclose(t[5] - t[0], 0.48) and np.isclose(t[10] - t[0], 2 * 0.48) and np.isclose(t[5] - t[4], 0.08)

    forever = BagReplayer(_records(4), PlaySchedule(rate=0, loops=0))
    first = list(itertools.islice(forever, 41))
    assert first[-1].loop == 10 and forever.stats().loops_completed == 10


def test_replay_pause_hook_holds_and_shifts() -> None:
    clock = FakeClock()
    start = clock.now
    # PAUSE from 0.25 s to 0.75 s after the start: frame 3 (due at 0.3 s) waits until 0.75 s.
    paused = lambda: 0.25 <= clock.now - start < 0.75  # noqa: E731
    cfg = PlaySchedule(rate=1.0, pause_poll_s=0.01)
    r = BagReplayer(_records(), cfg, should_pause=paused, time_fn=clock.time, sleep_fn=clock.sleep)
    t = []
    for _ in r:
        assert not paused(), "a message went out during PAUSE"
        t.append(clock.now - start)
    assert np.allclose(t[:3], [0.0, 0.1, 0.2])
    assert 0.75 <= t[3] < 0.76
    # Later frames keep their spacing after the hold instead of bursting.
    assert np.allclose(np.diff(t[3:]), 0.1, atol=1e-9)
    s = r.stats()
    assert s.pauses == 1 and 0.45 <= s.paused_s < 0.46 and s.late_messages == 0


def test_replay_clock_ticks() -> None:
    clock = FakeClock()
    start = clock.now
    paused = lambda: 0.2 <= clock.now - start < 0.4  # noqa: E731
    cfg = PlaySchedule(rate=1.0, clock_hz=20.0)
    r = BagReplayer(_records(4), cfg, should_pause=paused, time_fn=clock.time, sleep_fn=clock.sleep)
    evs = [(clock.now - start, ev) for ev in r]
    ticks = [(t, ev.sim_time_ns) for t, ev in evs if ev.kind is EventKind.CLOCK]
    msgs = [ev for _, ev in evs if ev.kind is EventKind.MESSAGE]
    assert len(msgs) == 4
    # every 50 ms of wall time over 0.5 s (0.3 s of bag + 0.2 s held)
    assert len(ticks) == 11 and r.stats().clock_ticks == 11
    sims = [s for _, e in evs for s in [e.sim_time_ns]]
    assert sims == sorted(sims), "sim time never goes back"
    held = [s for t, s in ticks if 0.2 < t < 0.4]
    assert held and set(held) == {T0 + 200_000_000}, "sim time stands still while paused"


def test_replay_lateness_is_counted_and_caught_up() -> None:
    clock = FakeClock()
    r = BagReplayer(_records(5), PlaySchedule(rate=1.0), time_fn=clock.time, sleep_fn=clock.sleep)
    for ev in r:
        if ev.record.content == "frame1":
            clock.now += 0.25  # a slow consumer
    s = r.stats()
    assert s.late_messages == 2 and np.isclose(s.max_lateness_s, 0.15)


def test_replay_stop_from_consumer() -> None:
    r = BagReplayer(_records(), PlaySchedule(rate=0, loops=0))
    n = 0
    for _ in r:
        n += 1
        if n == 3:
            r.stop()
    assert n == 3 and r.stopped


def test_replay_from_bag_with_preload(tmp_path: Path) -> None:
    write_sample_bag(tmp_path / "bag", SampleBagConfig(storage="mcap", width=W, height=H, n_frames=5, rate_hz=10.0))
    clock = FakeClock()
    cfg = PlaySchedule(rate=2.0, preload=True, topics=("/camera/image_raw",))
    r = BagReplayer(tmp_path / "bag", cfg, time_fn=clock.time, sleep_fn=clock.sleep)
    assert r.stats().preloaded_bytes == 5 * H * W * 3
    shutil.rmtree(tmp_path / "bag")  # everything is in memory now
    t = []
    for ev in r:
        assert isinstance(ev.record.content, ImageFrame)
        t.append(clock.now)
    assert np.allclose(np.diff(t), 0.05)

    write_sample_bag(tmp_path / "bag2", SampleBagConfig(width=W, height=H, n_frames=5))
    with pytest.raises(ValueError, match="preload_limit_bytes=1000"):
        BagReplayer(tmp_path / "bag2", PlaySchedule(preload=True, preload_limit_bytes=1000))
    with pytest.raises(ValueError, match="/nope"):
        BagReplayer(tmp_path / "bag2", PlaySchedule(topics=("/nope",)))
    # streamed from disk, looped: the bag is read again each loop
    evs = list(BagReplayer(tmp_path / "bag2", PlaySchedule(rate=0, loops=2)))
    assert len(evs) == 12 and evs[-1].record.content.stamp_ns + evs[-1].time_offset_ns == evs[-1].sim_time_ns


def test_replay_clock_directly() -> None:
    clock = FakeClock()
    rc = ReplayClock(4.0, time_fn=clock.time, sleep_fn=clock.sleep, max_sleep_s=0.05)
    rc.start(0)
    assert list(rc.wait(2_000_000_000)) == []  # 2 s of bag at 4x: 0.5 s of wall
    assert np.isclose(clock.now, 100.5) and np.isclose(clock.slept, 0.5)
    assert rc.sim_now_ns() == 2_000_000_000


def test_replay_config_validation() -> None:
    with pytest.raises(ValueError, match="-1"):
        PlaySchedule(rate=-1.0)
    with pytest.raises(ValueError, match="loops.*-2"):
        PlaySchedule(loops=-2)
    with pytest.raises(ValueError, match="'/a' -> ''"):
        PlaySchedule(remap={"/a": ""})
    with pytest.raises(ValueError, match="bad remap 'x'"):
        parse_remaps(["x"])
    with pytest.raises(ValueError, match="nothing to replay"):
        list(BagReplayer([], PlaySchedule(rate=0)))
