"""Compressed camera input and /diagnostics over real DDS, with real node processes.

robot_0's edge runs with image_transport compressed (it reads sensor_msgs/CompressedImage JPEG on
camera/image_raw/compressed), robot_1's with raw Images. The same JPEG frame, sent compressed to
robot_0 and decoded to a raw Image for robot_1, gets the same answer tokens. Bombs and corrupt
frames on robot_0's compressed topic are counted (its /diagnostics status says how many) and the
frame it answers on stays the last good one. Every node reports its health on /diagnostics; while
the server holds the robots PAUSED (a tiny matched queue, a fast camera) the edges and the server
report WARN.
"""

import threading
import time

import cv2
import numpy as np
import ros_harness
from camera_client import FORMAT, CameraClient, bomb_jpeg, compressed, jpeg_of, level
from edge_vlm_ros.core.camera import decode_compressed
from edge_vlm_ros.core.diagnostics import Level
from edge_vlm_ros.core.types import Outcome
from edge_vlm_ros.data.scenes import make_scene
from ros_harness import running

OK, WARN = Level.OK, Level.WARN      # the DiagnosticStatus level values


def test_compressed_camera_answers_like_raw_and_survives_bad_frames(ros_env, tmp_path, monkeypatch):
    monkeypatch.setattr(ros_harness, "RobotClient", CameraClient)
    overrides = {"edge": {"max_new_tokens": 6}, "server": {"ignore_eos": True}}
    per_robot = {"robot_0": {"image_transport": "compressed"}}
    with running(ros_env, tmp_path, 2, overrides, per_robot=per_robot) as (nodes, client):
        rgb = make_scene(5, "test", 3, image_size=64).image
        # robot_1 (raw) gets exactly the frame robot_0 decodes from the JPEG
        decoded, kind = decode_compressed(FORMAT, jpeg_of(rgb))
        assert kind == "jpeg" and decoded.shape == rgb.shape and not np.array_equal(decoded, rgb)
        a0 = client.ask("robot_0", rgb, "what color is the shape ?", timeout=90)
        a1 = client.ask("robot_1", decoded, "what color is the shape ?", timeout=90)
        assert a0 is not None and a0.outcome is Outcome.OK, a0
        assert a1 is not None and a1.outcome is Outcome.OK, a1
        assert a0.token_ids and a0.token_ids == a1.token_ids, (a0.token_ids, a1.token_ids)

        edge0 = "edge_vlm_ros: edge (robot_0)"

        def count(key: str) -> int:
            v = client.value(edge0, key)
            return -1 if v is None else int(v)

        def until_counted(key: str, msg_fn, timeout: float = 60.0) -> None:
            """Publish (again every 2 s: camera frames are best effort) until the edge counted it."""
            assert client.wait_for(lambda: count(key) >= 0, 30), f"no diagnostics from {edge0}: {client.health}"
            before = count(key)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                client.pub_image["robot_0"].publish(msg_fn())
                if client.wait_for(lambda: count(key) > before, 2.0):
                    return
            raise AssertionError(f"{key} stayed {before}: {client.latest(edge0)}")

        # Bad frames are counted and skipped: a bomb, garbage, a PNG too large, a frame cut in its header.
        big_png = cv2.imencode(".png", np.zeros((5000, 5000, 3), np.uint8))[1].tobytes()
        for bad in (lambda: compressed(bomb_jpeg(), time.time_ns()),
                    lambda: compressed(b"\x00garbage" * 50, time.time_ns()),
                    lambda: compressed(big_png, time.time_ns(), "bgr8; png compressed bgr8"),
                    lambda: compressed(jpeg_of(rgb)[:120], time.time_ns())):
            until_counted("frames_bad", bad)
        assert not nodes.poll(), nodes.poll()
        # The next good frame is answered ...
        a2 = client.ask("robot_0", rgb, "what color is the shape ?", timeout=90)
        assert a2 is not None and a2.outcome is Outcome.OK and a2.token_ids == a0.token_ids, a2
        # ... and a bad frame after a good one does not replace it: the edge answers on the good one.
        good_stamp = time.time_ns()
        until_counted("frames_in", lambda: compressed(jpeg_of(rgb), good_stamp))
        until_counted("frames_bad", lambda: compressed(bomb_jpeg(), time.time_ns()))
        n_prompts = len(client.prompts["robot_0"])
        client.send_prompt("robot_0", "what is in the picture ?")
        assert client.wait_for(lambda: len(client.prompts["robot_0"]) > n_prompts, 60)
        _, rid, stamp, _ = client.prompts["robot_0"][n_prompts]
        assert stamp == good_stamp, (stamp, good_stamp)
        assert client.wait_for(lambda: any(a.request_id == rid for _, a in client.answers["robot_0"]), 90)
        assert next(a for _, a in client.answers["robot_0"] if a.request_id == rid).outcome is Outcome.OK

        s = client.latest(edge0)
        assert s.hardware_id == "robot_0" and level(s) == OK, s
        assert int(client.value(edge0, "frames_bad")) >= 5 and client.value(edge0, "server_lease") == "alive"
        assert client.latest("edge_vlm_ros: server (server)") is not None, sorted(client.health)
        assert not nodes.poll(), nodes.poll()


def test_diagnostics_report_ok_then_warn_while_paused(ros_env, tmp_path, monkeypatch):
    monkeypatch.setattr(CameraClient, "compressed", ())
    monkeypatch.setattr(ros_harness, "RobotClient", CameraClient)
    overrides = {"edge": {"request_mode": "continuous", "standing_prompt": "describe the scene ."},
                 "server": {"max_batch_size": 1, "default_max_new_tokens": 40, "ignore_eos": True,
                            "pause_threshold": 3, "resume_threshold": 1, "queue_capacity": 32, "match_ttl_s": 60.0}}
    names = ["edge_vlm_ros: edge (robot_0)", "edge_vlm_ros: edge (robot_1)", "edge_vlm_ros: server (server)",
             "edge_vlm_ros: controller (robot_0)", "edge_vlm_ros: controller (robot_1)"]
    with running(ros_env, tmp_path, 2, overrides, with_controller=True) as (nodes, client):
        # Idle, every node up and the server heard: every status OK.
        assert client.wait_for(lambda: all(client.latest(n) is not None and level(client.latest(n)) == OK
                                           for n in names), 60), \
            {n: (client.latest(n).level, client.latest(n).message) if client.latest(n) else None for n in names}
        assert client.latest(names[2]).hardware_id and client.value(names[2], "flow.robot_0") == "RESUME"
        assert client.latest(names[0]).hardware_id == "robot_0"
        stop = threading.Event()

        def camera(robot: str, seed: int) -> None:     # 30 Hz per robot: far faster than the server
            i = 0
            while not stop.is_set():
                client.send_image(robot, make_scene(seed + i % 7, "test", 0, image_size=64).image)
                i += 1
                time.sleep(1 / 30)
        cams = [threading.Thread(target=camera, args=(r, 100 * k)) for k, r in enumerate(client.robots)]
        for t in cams:
            t.start()
        try:
            def paused_warn() -> bool:
                e, s = client.latest(names[0]), client.latest(names[2])
                return (e is not None and level(e) == WARN and "PAUSED" in e.message
                        and s is not None and level(s) == WARN and client.value(names[2], "flow.robot_0") == "PAUSE")
            assert client.wait_for(paused_warn, 90), (client.latest(names[0]), client.latest(names[2]))
            assert client.value(names[0], "paused") == "True"
        finally:
            stop.set()
            for t in cams:
                t.join()
        # The queue drains, the server resumes: OK again.
        assert client.wait_for(lambda: level(client.latest(names[0])) == OK and level(client.latest(names[2])) == OK,
                               120), (client.latest(names[0]), client.latest(names[2]))
        assert not nodes.poll(), nodes.poll()
