"""The replay node plays a bag that another tool wrote (the rosbags library directly, mcap, bgr8
images with padded rows, as a camera driver records them) into a robot, and the robot's questions
get answered: real processes, real DDS, a private domain, deadlines, every process stopped."""

import json
import subprocess
import sys
import time

import numpy as np
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

from camera_client import FORMAT, CameraClient, jpeg_of
from edge_vlm_ros.data.scenes import make_scene
from ros_harness import running

T0 = 1_750_000_000_000_000_000


def write_foreign_bag(path, n_frames=8, rate_hz=10.0, prompt_at=(2, 5)):
    """sensor_msgs/Image bgr8 (step padded by 8 bytes per row) + std_msgs/String, mcap, by rosbags."""
    ts = get_typestore(Stores.ROS2_HUMBLE)
    Image, Str = ts.types["sensor_msgs/msg/Image"], ts.types["std_msgs/msg/String"]
    Header, Time = ts.types["std_msgs/msg/Header"], ts.types["builtin_interfaces/msg/Time"]
    period = int(1e9 / rate_hz)
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as w:
        cam = w.add_connection("/camera/image_raw", "sensor_msgs/msg/Image", typestore=ts)
        txt = w.add_connection("/edge_vlm/prompt_text", "std_msgs/msg/String", typestore=ts)
        for i in range(n_frames):
            t = T0 + i * period
            rgb = make_scene(3, "test", i, image_size=64).image
            h, wd, _ = rgb.shape
            step = wd * 3 + 8
            buf = np.zeros((h, step), np.uint8)
            buf[:, : wd * 3] = rgb[:, :, ::-1].reshape(h, wd * 3)
            hdr = Header(stamp=Time(sec=t // 10**9, nanosec=t % 10**9), frame_id="cam")
            w.write(cam, t, ts.serialize_cdr(Image(header=hdr, height=h, width=wd, encoding="bgr8", is_bigendian=0,
                                                   step=step, data=buf.reshape(-1)), "sensor_msgs/msg/Image"))
            if i in prompt_at:   # after the frame: the edge answers on the newest frame
                w.write(txt, t + period // 2, ts.serialize_cdr(Str(data=f"what color is shape {i} ?"),
                                                               "std_msgs/msg/String"))


def test_replay_of_a_rosbags_written_bag_gets_answers(ros_env, tmp_path):
    bag = tmp_path / "foreign_bag"
    write_foreign_bag(bag)
    stats = tmp_path / "replay_stats.json"
    overrides = {"edge": {"max_new_tokens": 4}, "server": {"ignore_eos": True}}
    with running(ros_env, tmp_path, 1, overrides) as (nodes, client):
        cmd = [sys.executable, "-m", "edge_vlm_ros.replay_node", "--ros-args",
               "-p", f"bag_path:={bag}", "-p", "robots:=[robot_0]", "-p", "rate:=2.0",
               "-p", f"stats_path:={stats}", "-p", "wait_for_subscribers_s:=20.0"]
        log = open(tmp_path / "logs" / "replay.log", "w")
        replay = subprocess.Popen(cmd, env=ros_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                  cwd=tmp_path)  # not the source tree: it lacks the generated msg/ package
        try:
            rc = replay.wait(timeout=45)
            assert rc == 0, (tmp_path / "logs" / "replay.log").read_text()[-2000:]
            assert client.wait_for(lambda: client.n_answers("robot_0") >= 2, 30), \
                f"answers: {client.answers['robot_0']}"
        finally:
            if replay.poll() is None:
                replay.terminate()
                try:
                    replay.wait(10)
                except subprocess.TimeoutExpired:
                    replay.kill()
                    replay.wait()
            log.close()
        time.sleep(0.5)
        got = [a for _, a in client.answers["robot_0"]]
        assert len(got) == 2, got
        assert all(a.outcome.name == "OK" and a.token_ids for a in got), got
        # the answered frames are the bag's (stamps from the bag, shifted by no loop)
        assert all(T0 <= a.stamp_ns < T0 + 10**9 for a in got), [a.stamp_ns for a in got]
        s = json.loads(stats.read_text())
        c = s["counters"]
        assert (c["images"], c["strings"]) == (8, 2) and c.get("pause_msgs", 0) == 0 and s["loops_completed"] == 1 and not s["failed"], s


def write_compressed_bag(path, n_frames=8, rate_hz=10.0, prompt_at=(2, 5)):
    """A robot's recording as image_transport leaves it: the CompressedImage stream on
    /camera/image_raw/compressed (JPEG, format "rgb8; jpeg compressed bgr8"), the raw stream on
    /camera/image_raw beside it, and prompts. Returns the JPEG payloads in order."""
    ts = get_typestore(Stores.ROS2_HUMBLE)
    Image, Compressed = ts.types["sensor_msgs/msg/Image"], ts.types["sensor_msgs/msg/CompressedImage"]
    Str, Header, Time = ts.types["std_msgs/msg/String"], ts.types["std_msgs/msg/Header"], \
        ts.types["builtin_interfaces/msg/Time"]
    period = int(1e9 / rate_hz)
    payloads = []
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as w:
        raw = w.add_connection("/camera/image_raw", "sensor_msgs/msg/Image", typestore=ts)
        cam = w.add_connection("/camera/image_raw/compressed", "sensor_msgs/msg/CompressedImage", typestore=ts)
        txt = w.add_connection("/edge_vlm/prompt_text", "std_msgs/msg/String", typestore=ts)
        for i in range(n_frames):
            t = T0 + i * period
            rgb = make_scene(3, "test", i, image_size=64).image
            hdr = Header(stamp=Time(sec=t // 10**9, nanosec=t % 10**9), frame_id="cam")
            w.write(raw, t, ts.serialize_cdr(Image(header=hdr, height=64, width=64, encoding="rgb8", is_bigendian=0,
                                                   step=192, data=rgb.reshape(-1)), "sensor_msgs/msg/Image"))
            jpg = jpeg_of(rgb)
            payloads.append(jpg)
            w.write(cam, t, ts.serialize_cdr(Compressed(header=hdr, format=FORMAT,
                                                        data=np.frombuffer(jpg, np.uint8)),
                                             "sensor_msgs/msg/CompressedImage"))
            if i in prompt_at:
                w.write(txt, t + period // 2, ts.serialize_cdr(Str(data=f"what color is shape {i} ?"),
                                                               "std_msgs/msg/String"))
    return payloads


def test_replay_publishes_compressed_images_as_recorded_and_starts_promptly(ros_env, tmp_path, monkeypatch):
    """The bag's CompressedImage topic goes out as CompressedImage, byte for byte, to an edge with
    image_transport compressed, which answers; the bag's raw topic, which no edge reads, does not
    hold the start (the replay's default wait is 10 s; it starts well within it)."""
    from sensor_msgs.msg import CompressedImage

    import ros_harness
    from edge_vlm_ros import qos, topics

    bag = tmp_path / "compressed_bag"
    payloads = write_compressed_bag(bag)
    stats = tmp_path / "replay_stats.json"
    monkeypatch.setattr(ros_harness, "RobotClient", CameraClient)
    overrides = {"edge": {"max_new_tokens": 4, "image_transport": "compressed"}, "server": {"ignore_eos": True}}
    with running(ros_env, tmp_path, 1, overrides) as (nodes, client):
        heard: list[tuple[str, bytes]] = []
        client.node.create_subscription(
            CompressedImage, topics.for_robot("robot_0", topics.CAMERA_COMPRESSED),
            lambda m: heard.append((m.format, bytes(m.data))), qos.CAMERA)
        cmd = [sys.executable, "-m", "edge_vlm_ros.replay_node", "--ros-args",
               "-p", f"bag_path:={bag}", "-p", "robots:=[robot_0]", "-p", "rate:=2.0",
               "-p", f"stats_path:={stats}"]
        log = open(tmp_path / "logs" / "replay.log", "w")
        replay = subprocess.Popen(cmd, env=ros_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                  cwd=tmp_path)
        try:
            rc = replay.wait(timeout=60)
            assert rc == 0, (tmp_path / "logs" / "replay.log").read_text()[-2000:]
            assert client.wait_for(lambda: client.n_answers("robot_0") >= 2, 60), \
                f"answers: {client.answers['robot_0']}"
        finally:
            if replay.poll() is None:
                replay.terminate()
                try:
                    replay.wait(10)
                except subprocess.TimeoutExpired:
                    replay.kill()
                    replay.wait()
            log.close()
        got = [a for _, a in client.answers["robot_0"]]
        assert len(got) == 2 and all(a.outcome.name == "OK" and a.token_ids for a in got), got
        assert all(T0 <= a.stamp_ns < T0 + 10**9 for a in got), [a.stamp_ns for a in got]
        # The answers above came from an edge that reads only CompressedImage, stamped with the bag's
        # frames: the frames went out as CompressedImage. What this listener heard must be the recorded
        # bytes; it may have heard nothing when its best-effort subscription matched the replay's
        # publisher only after the last frame (discovery on a loaded machine): the replay starts as
        # soon as the edge listens.
        assert all(fmt == FORMAT and data in payloads for fmt, data in heard), [(f, len(d)) for f, d in heard]
        s = json.loads(stats.read_text())
        c = s["counters"]
        assert (c["compressed_images"], c["images"], c["strings"]) == (8, 8, 2) and not s["failed"], s
        assert s["first_publish_s"] is not None and s["first_publish_s"] < 5.0, s
        replay_log = (tmp_path / "logs" / "replay.log").read_text()
        assert "every robot is listening" in replay_log and "starting after" not in replay_log, replay_log[-2000:]


def test_replay_waits_for_a_prompt_reader_not_only_an_image_reader(ros_env, tmp_path):
    """Someone else (a viewer, a recorder) reading the camera topic is not the robot's edge: a bag with
    prompts waits for a reader of the prompt topic too, and says so when it starts without one."""
    import rclpy
    from sensor_msgs.msg import Image

    from edge_vlm_ros import qos, topics

    bag = tmp_path / "foreign_bag"
    write_foreign_bag(bag, n_frames=3, prompt_at=(1,))
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    node = rclpy.create_node("camera_viewer", context=ctx)
    node.create_subscription(Image, topics.for_robot("robot_0", topics.CAMERA), lambda m: None, qos.CAMERA)
    cmd = [sys.executable, "-m", "edge_vlm_ros.replay_node", "--ros-args",
           "-p", f"bag_path:={bag}", "-p", "robots:=[robot_0]", "-p", "wait_for_subscribers_s:=3.0",
           "-p", "pause_on_flow_control:=false"]
    (tmp_path / "logs").mkdir()
    with open(tmp_path / "logs" / "replay.log", "w") as log:
        replay = subprocess.Popen(cmd, env=ros_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                  cwd=tmp_path)
    try:
        rc = replay.wait(timeout=60)
    finally:
        if replay.poll() is None:
            replay.kill()
            replay.wait()
        node.destroy_node()
        rclpy.try_shutdown(context=ctx)
    text = (tmp_path / "logs" / "replay.log").read_text()
    assert rc == 0, text[-2000:]
    assert "starting after 3 s without a subscriber on one of ['/robot_0/edge_vlm/prompt_text']" in text, text
