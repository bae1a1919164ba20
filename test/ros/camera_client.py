"""A RobotClient for tests whose camera may be image_transport's compressed stream, and that
records /diagnostics; and the JPEG/CompressedImage helpers it uses."""

import time

import cv2
import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from sensor_msgs.msg import CompressedImage

from edge_vlm_ros import qos, topics
from edge_vlm_ros.client import RobotClient
from edge_vlm_ros.conversions import ns_to_stamp

FORMAT = "rgb8; jpeg compressed bgr8"   # what image_transport's compressed plugin writes for rgb8 frames


def jpeg_of(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]), [int(cv2.IMWRITE_JPEG_QUALITY), 85])[1].tobytes()


def compressed(data: bytes, stamp_ns: int, fmt: str = FORMAT) -> CompressedImage:
    msg = CompressedImage(format=fmt, data=data)
    msg.header.stamp = ns_to_stamp(stamp_ns)
    msg.header.frame_id = "camera"
    return msg


def bomb_jpeg(height: int = 16000, width: int = 16000) -> bytes:
    b = bytearray(jpeg_of(np.zeros((8, 8, 3), np.uint8)))
    i = b.index(b"\xff\xc0")
    b[i + 5:i + 7] = height.to_bytes(2, "big")
    b[i + 7:i + 9] = width.to_bytes(2, "big")
    return bytes(b)


class CameraClient(RobotClient):
    """A RobotClient whose camera for the robots in `compressed` is a CompressedImage JPEG stream (as
    a robot with image_transport's compressed plugin publishes it), and which records /diagnostics."""

    compressed: tuple[str, ...] = ("robot_0",)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.health: dict[str, list[DiagnosticStatus]] = {}       # status name -> statuses received
        for r in self.compressed:
            self.node.destroy_publisher(self.pub_image[r])
            self.pub_image[r] = self.node.create_publisher(
                CompressedImage, topics.for_robot(r, topics.CAMERA_COMPRESSED), qos.CAMERA)
        self.node.create_subscription(DiagnosticArray, topics.DIAGNOSTICS, self._on_diagnostics, qos.DIAGNOSTICS)

    def send_image(self, robot: str, rgb: np.ndarray, stamp_ns: int | None = None) -> int:
        if robot not in self.compressed:
            return super().send_image(robot, rgb, stamp_ns)
        stamp_ns = stamp_ns if stamp_ns is not None else time.time_ns()
        self.pub_image[robot].publish(compressed(jpeg_of(rgb), stamp_ns))
        return stamp_ns

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        with self._lock:
            for s in msg.status:
                self.health.setdefault(s.name, []).append(s)
            self._lock.notify_all()

    def latest(self, name: str) -> DiagnosticStatus | None:
        got = self.health.get(name)
        return got[-1] if got else None

    def value(self, name: str, key: str) -> str | None:
        s = self.latest(name)
        return None if s is None else {kv.key: kv.value for kv in s.values}.get(key)


def level(s: DiagnosticStatus) -> int:
    return s.level[0] if isinstance(s.level, bytes) else int(s.level)
