"""core.camera: CompressedImage frames are checked from their headers before decoding, and decode to
the RGB frame that was compressed (PNG exactly, JPEG as OpenCV decodes it), in image_transport's
format strings."""

import cv2
import numpy as np
import pytest

from edge_vlm_ros.codecs.base import DecodeLimits
from edge_vlm_ros.core.camera import (CAMERA_LIMITS, CompressedFormat, check_compressed, decode_compressed, parse_format,
                                      read_png_header)
from edge_vlm_ros.data.scenes import make_scene


def rgb_frame() -> np.ndarray:
    return make_scene(3, "test", 1, image_size=64).image          # (64, 64, 3) uint8 RGB


def jpeg_of(rgb: np.ndarray, quality: int = 90) -> bytes:
    return cv2.imencode(".jpg", rgb[:, :, ::-1], [int(cv2.IMWRITE_JPEG_QUALITY), quality])[1].tobytes()


def bomb_jpeg(height: int, width: int) -> bytes:
    b = bytearray(jpeg_of(np.zeros((8, 8, 3), np.uint8)))
    i = b.index(b"\xff\xc0")
    b[i + 5:i + 7] = height.to_bytes(2, "big")
    b[i + 7:i + 9] = width.to_bytes(2, "big")
    return bytes(b)


def test_format_strings_of_image_transport_and_drivers():
    assert parse_format("rgb8; jpeg compressed bgr8") == CompressedFormat("jpeg", "bgr8")
    assert parse_format("jpeg").pixel_order == "" and parse_format("JPG").kind == "jpeg"
    assert parse_format("bgra8; png compressed rgba8") == CompressedFormat("png", "rgba8")
    assert parse_format("", b"\x89PNG\r\n\x1a\n....").kind == "png"
    assert parse_format("", b"\xff\xd8\xff\xe0").kind == "jpeg"
    with pytest.raises(ValueError, match="compressedDepth"):
        parse_format("16UC1; compressedDepth png")
    with pytest.raises(ValueError, match="'mono16'"):
        parse_format("mono16; png compressed mono16")
    with pytest.raises(ValueError, match="'tiff'"):
        parse_format("tiff")
    with pytest.raises(ValueError, match="neither JPEG nor PNG"):
        parse_format("", b"GIF89a")
    with pytest.raises(ValueError, match="characters"):
        parse_format("jpeg" * 100)


def test_jpeg_and_png_decode_to_the_frame():
    rgb = rgb_frame()
    jpg = jpeg_of(rgb)
    out, kind = decode_compressed("rgb8; jpeg compressed bgr8", jpg)
    want = cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
    assert kind == "jpeg" and out.shape == (64, 64, 3) and np.array_equal(out, want)
    assert np.abs(out.astype(int) - rgb).mean() < 8          # a JPEG of the frame, not something else
    png = cv2.imencode(".png", rgb[:, :, ::-1])[1].tobytes()
    out, kind = decode_compressed("bgr8; png compressed bgr8", png)
    assert kind == "png" and np.array_equal(out, rgb)
    # pixels handed to the encoder in RGB order come back in RGB order
    out, _ = decode_compressed("rgb8; png compressed rgb8", cv2.imencode(".png", rgb)[1].tobytes())
    assert np.array_equal(out, rgb)
    # grey: three equal channels; bytes, array('B') and numpy payloads alike
    grey = cv2.imencode(".png", rgb[:, :, 0])[1]
    out, _ = decode_compressed("mono8; png compressed mono8", grey)
    assert np.array_equal(out, np.repeat(rgb[:, :, :1], 3, axis=2))
    import array
    out2, _ = decode_compressed("png", array.array("B", grey.tobytes()))
    assert np.array_equal(out, out2)


def test_bombs_are_refused_from_their_headers():
    bomb = bomb_jpeg(16000, 16000)
    assert len(bomb) < 1000
    with pytest.raises(ValueError, match="16000 x 16000"):
        check_compressed("jpeg", bomb)
    with pytest.raises(ValueError, match="16000 x 16000"):
        decode_compressed("jpeg", bomb)
    big_png = cv2.imencode(".png", np.zeros((5000, 5000, 3), np.uint8))[1].tobytes()
    assert read_png_header(big_png) == (5000, 5000)
    with pytest.raises(ValueError, match="5000 x 5000"):
        decode_compressed("png", big_png)
    # the caps are the caller's: a small limit refuses a small frame
    with pytest.raises(ValueError, match="64 x 64"):
        check_compressed("jpeg", jpeg_of(rgb_frame()), DecodeLimits(max_image_side=32))
    # a payload far longer than any encoder writes for its declared size
    padded = jpeg_of(rgb_frame()) + bytes(2 << 20)
    with pytest.raises(ValueError, match="more than"):
        check_compressed("jpeg", padded)
    assert check_compressed("jpeg", jpeg_of(rgb_frame()), CAMERA_LIMITS).height == 64


def test_malformed_frames_say_what_is_wrong():
    rgb = rgb_frame()
    png = cv2.imencode(".png", rgb)[1].tobytes()
    with pytest.raises(ValueError, match="not a JPEG"):
        decode_compressed("jpeg", png)                       # format says jpeg, bytes are PNG
    with pytest.raises(ValueError, match="not a PNG"):
        decode_compressed("png", jpeg_of(rgb))
    with pytest.raises(ValueError, match="no data"):
        decode_compressed("jpeg", b"")
    with pytest.raises(ValueError, match="before its first scan|truncated|declares"):
        decode_compressed("jpeg", jpeg_of(rgb)[:100])         # cut inside its headers
    with pytest.raises(ValueError, match="ends inside its IHDR"):
        decode_compressed("png", png[:20])
    deep = cv2.imencode(".png", np.zeros((4, 4, 3), np.uint16))[1].tobytes()
    with pytest.raises(ValueError, match="bit depth 16"):
        decode_compressed("png", deep)
    progressive = cv2.imencode(".jpg", rgb, [int(cv2.IMWRITE_JPEG_PROGRESSIVE), 1])[1].tobytes()
    with pytest.raises(ValueError, match="progressive"):
        decode_compressed("jpeg", progressive)
