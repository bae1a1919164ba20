"""The compact VisualFeatures message through the real rosidl serializer (no ROS graph needed):
every field of a feature packet round-trips, the MAC covers the compact fields, the byte count is
the one the README's "Wire format" states, and the receiver refuses numbers that name nothing."""

import time

import numpy as np
import pytest
from rclpy.serialization import deserialize_message, serialize_message

from edge_vlm_ros.conversions import features_request_id, features_to_msg, msg_to_features
from edge_vlm_ros.core import wire
from edge_vlm_ros.core.auth import Authenticator, Verdict
from edge_vlm_ros.core.types import EncodedTensor, FeaturePacket, RequestError
from edge_vlm_ros.msg import VisualFeatures
from edge_vlm_ros.msg_auth import MessageAuth, sign_with_key
from edge_vlm_ros.tools.codec_report import cdr_size, header_bytes

KEY = b"k" * 32
RID = "00112233445566778899aabbccddeeff"
CB_HASH = "5eed" * 16          # a 64-hex-digit codebook content hash


def _packet(codec="vq", dtype="float16", shape=(577, 1024), payload=b"\x01" * 866, side_info=b"",
            split="projector", codebook=CB_HASH, params=None, fingerprint="0123456789abcdef") -> FeaturePacket:
    if params is None:
        params = {"bits": "12", "entropy": "none"} if codec == "vq" else {}
    enc = EncodedTensor(codec, dtype, shape, payload, side_info, codebook, params)
    return FeaturePacket(RID, "robot_0", split, fingerprint, enc, stamp_ns=1_700_000_000_123_456_789,
                         edge_preprocess_ms=1.25, edge_encode_ms=3.5, deadline_ns=1_700_000_005_000_000_000)


def _wire_round_trip(p: FeaturePacket, sent_ns: int = 1_700_000_000_200_000_000) -> FeaturePacket:
    m = deserialize_message(serialize_message(features_to_msg(p, sent_ns)), VisualFeatures)
    return msg_to_features(m, "robot_0")


CASES = {
    "vq at a block, ln1 statistics": _packet(split="vision_block:5/ln1", side_info=bytes(range(200)) * 11,
                                             params={"bits": "12", "entropy": "adaptive"}, dtype="bfloat16"),
    "vq after the projector": _packet(params={"bits": "9", "entropy": "static"}),
    "raw float32 at block 23": _packet("raw", "float32", (577, 1024), bytes(8), codebook="", split="vision_block:23"),
    "jpeg": _packet("jpeg", "uint8", (336, 336, 3), b"\xff\xd8" + bytes(100), codebook="", split="none",
                    params={"quality": "90"}, fingerprint=""),
    "image": _packet("image", "uint8", (4, 5, 3), bytes(60), codebook="", split="none", fingerprint=""),
}


@pytest.mark.parametrize("name", list(CASES))
def test_every_field_round_trips(name):
    p = CASES[name]
    got = _wire_round_trip(p)
    # Names come back as names; digests as their 16 hex digits (the fingerprint is one already).
    assert (got.request_id, got.robot_id, got.split_point) == (p.request_id, p.robot_id, p.split_point)
    assert got.model_fingerprint == p.model_fingerprint
    assert got.encoded.codebook_hash == p.encoded.codebook_hash[:16]
    assert wire.digest(got.encoded.codebook_hash) == wire.digest(p.encoded.codebook_hash)
    e, g = p.encoded, got.encoded
    assert (g.codec, g.dtype, g.shape, g.params) == (e.codec, e.dtype, tuple(e.shape), e.params)
    assert (g.payload, g.side_info) == (e.payload, e.side_info)
    assert (got.stamp_ns, got.deadline_ns, got.sent_at_ns) == (p.stamp_ns, p.deadline_ns, 1_700_000_000_200_000_000)
    assert (got.edge_preprocess_ms, got.edge_encode_ms) == (p.edge_preprocess_ms, p.edge_encode_ms)


def test_signed_compact_fields_are_covered_by_the_mac():
    auth = MessageAuth(Authenticator({"robot_0": KEY}))
    signed = sign_with_key(features_to_msg(_packet(), time.time_ns()), "robot_0", KEY)
    assert len(bytes(signed.auth.mac)) == 16
    raw = serialize_message(signed)
    assert auth.verify(deserialize_message(raw, VisualFeatures), "robot_0") is Verdict.OK
    for field, value in (("codec", 1), ("split_kind", 3), ("split_block", 1), ("dtype", 1),
                         ("request_id", [0] * 16), ("model_fingerprint", [0] * 8), ("codebook_digest", [0] * 8),
                         ("codec_params", [12, 2, 0]), ("shape", [577, 1023])):
        m = deserialize_message(raw, VisualFeatures)
        setattr(m, field, value)
        assert auth.verify(m, "robot_0") is Verdict.BAD_MAC, field
    unsigned = deserialize_message(serialize_message(features_to_msg(_packet(), time.time_ns())), VisualFeatures)
    assert not any(bytes(unsigned.auth.mac)) and auth.verify(unsigned, "robot_0") is Verdict.UNSIGNED


def test_bytes_on_the_wire_at_clip_l_shapes():
    """The README's "Wire format" numbers: 577 tokens of VQ K=4096 (12 bits) are 866 payload bytes,
    and the message is 1,004 bytes, signed: 130 bytes beyond the DDS/CDR minimum (4-byte
    encapsulation, the payload's 4-byte length), 44 of them authentication (MAC, key id, stamp, nonce)."""
    p = _packet()
    signed = sign_with_key(features_to_msg(p, time.time_ns()), "robot_0", KEY)
    n = len(serialize_message(signed))
    assert n == cdr_size(p) == 1004
    assert header_bytes(n, p.encoded) == 130
    assert features_request_id(signed) == RID
    # Whatever the lengths of payload and side_info, the header is 128 fixed bytes plus alignment
    # (at most 3 after each byte array, 4 before the 8-byte auth fields).
    for n in (1, 2, 3, 24, 866, 1155):
        for k in (0, 1, 68, 2308):
            q = _packet(payload=bytes(n), side_info=bytes(k), split="vision_block:1/ln1")
            size = len(serialize_message(sign_with_key(features_to_msg(q, 0), "robot_0", KEY)))
            assert size == cdr_size(q) and 128 <= header_bytes(size, q.encoded) <= 138, (n, k)


@pytest.mark.parametrize("field,value,reason", [
    ("codec", 0, "unknown codec 0"), ("codec", 99, "unknown codec 99"),
    ("split_kind", 0, "unknown split_kind 0"), ("split_kind", 6, "unknown split_kind 6"),
    ("split_block", 4, "takes no block, got split_block 4"),
    ("dtype", 9, "unknown dtype 9"),
    ("codec_params", [12, 7, 0], "entropy = 7 is not one of"),
    ("codec_params", [12, 1, 3], r"codec_params\[2\] = 3"),
])
def test_numbers_that_name_nothing_are_rejected_with_the_value(field, value, reason):
    m = features_to_msg(_packet(), time.time_ns())
    setattr(m, field, value)
    with pytest.raises(RequestError, match=reason):
        msg_to_features(m, "robot_0")


def test_the_sender_refuses_what_has_no_wire_form():
    for p, why in ((_packet(codec="h265"), "unknown codec 'h265'"),
                   (FeaturePacket("robot_0-1", "robot_0", "projector", "", _packet().encoded), "32 lowercase hex"),
                   (_packet(params={"bits": "12", "entropy": "none", "level": "3"}), "not \\['level'\\]"),
                   (_packet(dtype="float64"), "'float64' has no wire form")):
        with pytest.raises(ValueError, match=why):
            features_to_msg(p, 0)
    assert np.array_equal(features_to_msg(_packet(), 0).request_id, np.frombuffer(bytes.fromhex(RID), np.uint8))
