"""The lean VisualFeatures message through the real rosidl serializer (no ROS graph needed): every
field of a feature packet round-trips, described (its FeatureStream inline) and lean (the stream's
id only, known to the receiver from an earlier message); the MAC covers every field; the byte counts
are the ones the README's "Wire format" states; the receiver refuses numbers that name nothing, an
id that is not its descriptor's, and a stream it was never told about."""

import dataclasses
import time

import numpy as np
import pytest
from rclpy.serialization import deserialize_message, serialize_message

from edge_vlm_ros.conversions import features_request_id, features_to_msg, msg_to_features, restream
from edge_vlm_ros.core import wire
from edge_vlm_ros.core.auth import Authenticator, Verdict
from edge_vlm_ros.core.streams import StreamAnnouncer, StreamCache
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


def _wire_round_trip(p: FeaturePacket, sent_ns: int = 1_700_000_000_200_000_000, describe: bool = True,
                     streams: StreamCache | None = None) -> FeaturePacket:
    m = deserialize_message(serialize_message(features_to_msg(p, sent_ns, describe=describe)), VisualFeatures)
    return msg_to_features(m, "robot_0", streams)


CASES = {
    "vq at a block, ln1 statistics": _packet(split="vision_block:5/ln1", side_info=bytes(range(200)) * 11,
                                             params={"bits": "12", "entropy": "adaptive"}, dtype="bfloat16"),
    "vq after the projector": _packet(params={"bits": "9", "entropy": "static"}),
    "raw float32 at block 23": _packet("raw", "float32", (577, 1024), bytes(8), codebook="", split="vision_block:23"),
    "jpeg": _packet("jpeg", "uint8", (336, 336, 3), b"\xff\xd8" + bytes(100), codebook="", split="none",
                    params={"quality": "90"}, fingerprint=""),
    "image": _packet("image", "uint8", (4, 5, 3), bytes(60), codebook="", split="none", fingerprint=""),
}


@pytest.mark.parametrize("lean", [False, True])
@pytest.mark.parametrize("name", list(CASES))
def test_every_field_round_trips(name, lean):
    p = CASES[name]
    streams = StreamCache()
    if lean:     # an earlier message of the stream described it; this one carries the id only
        first = _wire_round_trip(p, streams=streams)
        assert streams.counts() == {"robot_0": 1} and first.encoded.payload == p.encoded.payload
    got = _wire_round_trip(p, describe=not lean, streams=streams)
    # Names come back as names; digests as their 16 hex digits (the fingerprint is one already).
    assert (got.request_id, got.robot_id, got.split_point) == (p.request_id, p.robot_id, p.split_point)
    assert got.model_fingerprint == p.model_fingerprint
    assert got.encoded.codebook_hash == p.encoded.codebook_hash[:16]
    assert wire.digest(got.encoded.codebook_hash) == wire.digest(p.encoded.codebook_hash)
    e, g = p.encoded, got.encoded
    assert (g.codec, g.dtype, g.shape, g.params) == (e.codec, e.dtype, tuple(e.shape), e.params)
    assert (g.payload, g.side_info) == (e.payload, e.side_info)
    assert (got.stamp_ns, got.deadline_ns, got.sent_at_ns) == (p.stamp_ns, p.deadline_ns, 1_700_000_000_200_000_000)
    # the edge's stage timings stay on the robot (the edge adds them to the relayed outcome)
    assert (got.edge_preprocess_ms, got.edge_encode_ms) == (0.0, 0.0)


def test_the_deadline_travels_as_ms_after_the_signing_stamp():
    sent = 1_700_000_000_200_000_000
    for deadline, wire_ms, back in [
            (sent + 4_800_000_000, 4800, sent + 4_800_000_000),      # exact
            (sent + 1_999_999, 1, sent + 1_000_000),                   # rounded down: never later than asked
            (sent + 1, 1, sent + 1_000_000),                           # due within the ms: 1 (0 means none)
            (sent - 5_000_000_000, 1, sent + 1_000_000),               # already past: due now
            (0, 0, 0),                                                 # none
            (sent + 2**33 * 1_000_000, 2**32 - 1, sent + (2**32 - 1) * 1_000_000)]:     # capped at 49 days
        p = dataclasses.replace(_packet(), deadline_ns=deadline)
        m = features_to_msg(p, sent)
        assert m.deadline_ms == wire_ms, (deadline, m.deadline_ms)
        assert _wire_round_trip(p, sent_ns=sent).deadline_ns == back
    m = features_to_msg(_packet(), sent)
    m.auth.stamp_ns = 0         # a deadline with no stamp to count it from: refused, not guessed
    with pytest.raises(RequestError, match="without auth.stamp_ns"):
        msg_to_features(m, "robot_0")


def test_stream_ids_are_content_addresses():
    ids = {name: features_to_msg(p, 0).stream for name, p in CASES.items()}
    assert len(set(ids.values())) == len(ids) and 0 not in ids.values()
    # the same configuration is the same stream whatever the request, stamp or payload
    again = _packet(payload=b"\x02" * 866, params={"bits": "9", "entropy": "static"})
    again.request_id, again.stamp_ns = "ff" * 16, 5
    assert features_to_msg(again, 0).stream == ids["vq after the projector"] != features_to_msg(
        _packet(params={"bits": "12", "entropy": "none"}), 0).stream


def test_a_stream_the_receiver_was_not_told_about_is_refused_with_the_reason():
    streams = StreamCache()
    with pytest.raises(RequestError, match="features name stream [0-9a-f]{8}, which robot_0 has not described"):
        _wire_round_trip(_packet(), describe=False, streams=streams)
    _wire_round_trip(_packet(), streams=streams)              # described once: learned
    assert _wire_round_trip(_packet(), describe=False, streams=streams).request_id == RID
    # learned per robot: another robot's topic does not inherit it
    m = features_to_msg(_packet(), 0, describe=False)
    with pytest.raises(RequestError, match="robot_1 has not described"):
        msg_to_features(m, "robot_1", streams)


def test_a_descriptor_whose_id_is_another_is_refused_and_not_learned():
    streams = StreamCache()
    m = features_to_msg(_packet(), 0)
    m.description[0].shape = [577, 1023]          # edited after the id was computed
    with pytest.raises(RequestError, match="is not its descriptor's"):
        msg_to_features(m, "robot_0", streams)
    assert streams.counts() == {}


def test_the_cache_is_bounded_per_robot():
    streams = StreamCache(max_per_robot=2)
    ps = [_packet(shape=(577, d)) for d in (1021, 1022, 1023)]
    for p in ps:
        _wire_round_trip(p, streams=streams)
    assert streams.counts() == {"robot_0": 2} and streams.evicted == 1
    with pytest.raises(RequestError, match="more than 2 streams in use"):
        _wire_round_trip(ps[0], describe=False, streams=streams)     # least recently used: gone
    assert _wire_round_trip(ps[2], describe=False, streams=streams).encoded.shape == (577, 1023)


def test_the_announcer_describes_first_messages_periodically_and_to_new_servers():
    t = [0.0]
    ann = StreamAnnouncer(period_s=5.0, clock=lambda: t[0])
    p = _packet()
    described = []
    for now in (0.0, 1.0, 4.9, 5.0, 6.0):
        t[0] = now
        described.append(len(features_to_msg(p, 0, ann).description))
    assert described == [1, 0, 0, 1, 0]
    assert ann.receiver_seen(("server", 1)) and not ann.receiver_seen(("server", 1))
    assert len(features_to_msg(p, 0, ann).description) == 1        # a new server instance: described again
    assert ann.receiver_seen(("server", 2)) and not ann.receiver_seen(("server", 1))   # both remembered
    assert (ann.described, ann.lean) == (3, 3)
    always = StreamAnnouncer(period_s=0)
    assert all(len(features_to_msg(p, 0, always).description) == 1 for _ in range(3))


def test_signed_compact_fields_are_covered_by_the_mac():
    auth = MessageAuth(Authenticator({"robot_0": KEY}))
    signed = sign_with_key(features_to_msg(_packet(), time.time_ns()), "robot_0", KEY)
    assert len(bytes(signed.auth.mac)) == 16
    raw = serialize_message(signed)
    assert auth.verify(deserialize_message(raw, VisualFeatures), "robot_0") is Verdict.OK
    edits = [("stream", 7), ("request_id", [0] * 16), ("payload", [0] * 866), ("deadline_ms", 12345),
             ("stamp.sec", 1)]
    edits += [(f"description.{f}", v) for f, v in (
        ("codec", 1), ("split_kind", 3), ("split_block", 1), ("dtype", 1), ("model_fingerprint", [0] * 8),
        ("codebook_digest", [0] * 8), ("codec_params", [12, 2, 0]), ("shape", [577, 1023]))]
    for field, value in edits:
        m = deserialize_message(raw, VisualFeatures)
        obj, name = m, field
        if field.startswith("description."):
            obj, name = m.description[0], field.split(".", 1)[1]
        elif field == "stamp.sec":
            obj, name = m.stamp, "sec"
        setattr(obj, name, value)
        assert auth.verify(m, "robot_0") is Verdict.BAD_MAC, field
    m = deserialize_message(raw, VisualFeatures)
    m.description = []                     # dropping the descriptor is an edit too
    assert auth.verify(m, "robot_0") is Verdict.BAD_MAC
    unsigned = deserialize_message(serialize_message(features_to_msg(_packet(), time.time_ns())), VisualFeatures)
    assert not any(bytes(unsigned.auth.mac)) and auth.verify(unsigned, "robot_0") is Verdict.UNSIGNED


def test_bytes_on_the_wire_at_clip_l_shapes():
    """The README's "Wire format" numbers: 577 tokens of VQ K=4096 (12 bits) are 866 payload bytes;
    signed, the lean message is 938 bytes, 64 beyond the DDS/CDR minimum (4-byte encapsulation, the
    payload's 4-byte length): 24 of them authentication (stamp, MAC; the key is the topic's robot),
    40 everything else. A described message (the stream's first, one every stream_announce_s) is
    974 bytes."""
    p = _packet()
    stamp = time.time_ns()
    signed = sign_with_key(features_to_msg(p, stamp, describe=False), "robot_0", KEY, stamp)
    n = len(serialize_message(signed))
    assert n == cdr_size(p) == 938
    assert header_bytes(n, p.encoded) == 64
    described = len(serialize_message(sign_with_key(features_to_msg(p, 0), "robot_0", KEY)))
    assert described == cdr_size(p, described=True) == 974
    assert features_request_id(signed) == RID
    # Whatever the payload's length, the lean header is 64 fixed bytes, plus the alignment a
    # side_info whose length is not a multiple of 4 leaves before the payload (at most 3): every
    # field sits on its alignment and the byte arrays come last. Described, 36 more for a 2-d shape
    # (the descriptor and the byte of alignment after its 3 codec parameters), 4 more per dimension.
    for n in (1, 2, 3, 24, 866, 1155):
        for k in (0, 1, 3, 68, 2308):
            q = _packet(payload=bytes(n), side_info=bytes(k), split="vision_block:1/ln1")
            for described in (False, True):
                size = len(serialize_message(sign_with_key(features_to_msg(q, 0, describe=described),
                                                           "robot_0", KEY)))
                assert size == cdr_size(q, described=described), (n, k, described)
                assert header_bytes(size, q.encoded) == 64 + 36 * described + (-k) % 4, (n, k, described)


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
    setattr(m.description[0], field, value)
    restream(m)                    # a consistent descriptor that names nothing: refused for what it says
    streams = StreamCache()
    with pytest.raises(RequestError, match=reason):
        msg_to_features(m, "robot_0", streams)
    # learned all the same: the stream's later, lean messages get the same reason
    m.description = []
    with pytest.raises(RequestError, match=reason):
        msg_to_features(m, "robot_0", streams)


def test_the_sender_refuses_what_has_no_wire_form():
    for p, why in ((_packet(codec="h265"), "unknown codec 'h265'"),
                   (FeaturePacket("robot_0-1", "robot_0", "projector", "", _packet().encoded), "32 lowercase hex"),
                   (_packet(params={"bits": "12", "entropy": "none", "level": "3"}), "not \\['level'\\]"),
                   (_packet(dtype="float64"), "'float64' has no wire form")):
        with pytest.raises(ValueError, match=why):
            features_to_msg(p, 0)
    assert np.array_equal(features_to_msg(_packet(), 0).request_id, np.frombuffer(bytes.fromhex(RID), np.uint8))
