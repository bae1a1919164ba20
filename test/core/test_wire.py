"""The compact VisualFeatures header's mappings (core/wire.py, codec parameters in codecs/base.py):
every value with a wire form round-trips, every wire value that names nothing is refused with it."""

import hashlib

import pytest

from edge_vlm_ros.codecs.base import CODEC_PARAM_SLOTS, WireParam
from edge_vlm_ros.codecs.registry import CODECS, codec_by_wire_id, codec_class
from edge_vlm_ros.codecs.vq import ENTROPY_MODES
from edge_vlm_ros.core import wire
from edge_vlm_ros.core.types import SplitPoint


@pytest.mark.parametrize("text", ["none", "projector", "vision_block:0", "vision_block:7", "vision_block:255",
                                  "vision_block:0/ln1", "vision_block:23/ln1", "token_compressor:2",
                                  "token_compressor:8"])
def test_every_split_point_round_trips(text):
    kind, block = wire.split_to_wire(text)
    assert 1 <= kind <= 255 and 0 <= block <= 255
    assert str(wire.split_from_wire(kind, block)) == text


def test_split_values_without_a_meaning_are_refused_with_the_value():
    with pytest.raises(ValueError, match="unknown split_kind 0"):
        wire.split_from_wire(0, 0)                   # an unset message
    with pytest.raises(ValueError, match="unknown split_kind 99"):
        wire.split_from_wire(99, 0)
    with pytest.raises(ValueError, match="takes no block, got split_block 3"):
        wire.split_from_wire(int(wire.SplitKind.PROJECTOR), 3)
    with pytest.raises(ValueError, match="block 256"):
        wire.split_to_wire(SplitPoint("vision_block", 256))


def test_dtypes_round_trip_and_unknown_ones_are_refused():
    for name in ("float32", "float16", "bfloat16", "uint8"):
        assert wire.dtype_from_wire(wire.dtype_to_wire(name)) == name
    with pytest.raises(ValueError, match="unknown dtype 0"):
        wire.dtype_from_wire(0)
    with pytest.raises(ValueError, match="'float64' has no wire form"):
        wire.dtype_to_wire("float64")


def test_request_ids_are_their_128_bits():
    rid = "0123456789abcdef" * 2
    assert wire.request_id_to_bytes(rid) == bytes.fromhex(rid)
    assert wire.request_id_from_bytes(wire.request_id_to_bytes(rid)) == rid
    for bad in ("0123456789ABCDEF" * 2, "abc", "g" * 32, "a" * 33, "robot_0-0123abcd-1"):
        with pytest.raises(ValueError, match="32 lowercase hex digits"):
            wire.request_id_to_bytes(bad)


def test_digests_keep_64_bits_and_are_idempotent():
    fp = "0123456789abcdef"                           # a model fingerprint: 64 bits of SHA-256 already
    assert wire.digest(fp) == bytes.fromhex(fp) and wire.digest_text(fp) == fp
    cb = hashlib.sha256(b"codebook").hexdigest()       # a codebook content hash: its first 8 bytes
    assert wire.digest(cb) == bytes.fromhex(cb[:16])
    other = "not hex at all"
    assert wire.digest(other) == hashlib.sha256(other.encode()).digest()[:8]
    for text in (fp, cb, other):
        d = wire.digest(text)
        assert len(d) == wire.DIGEST_BYTES and wire.digest(d.hex()) == d
        assert wire.digest_from_wire(wire.digest_to_wire(text)) == d.hex()
    assert wire.digest_to_wire("") == bytes(8) and wire.digest_from_wire(bytes(8)) == ""
    with pytest.raises(ValueError, match="7 bytes"):
        wire.digest_from_wire(bytes(7))


def test_every_codec_has_its_own_number_and_unknown_numbers_are_refused():
    ids = [c.wire_id for c in CODECS]
    assert len(set(ids)) == len(ids) and all(1 <= i <= 255 for i in ids)
    for c in CODECS:
        assert codec_by_wire_id(c.wire_id) is c
        assert len(c.wire_params) <= CODEC_PARAM_SLOTS
    with pytest.raises(ValueError, match=r"unknown codec 0 \(known: 1 raw, 2 vq"):
        codec_by_wire_id(0)


@pytest.mark.parametrize("codec,params", [("raw", {}), ("image", {}), ("jpeg", {"quality": "1"}),
                                          ("jpeg", {"quality": "100"}), ("jpeg", {})]
                         + [("vq", {"bits": str(b), "entropy": e}) for b in (1, 8, 12, 32) for e in ENTROPY_MODES])
def test_codec_params_round_trip(codec, params):
    cls = codec_class(codec)
    slots = cls.params_to_wire(params)
    assert len(slots) == CODEC_PARAM_SLOTS and all(0 <= s <= 255 for s in slots)
    assert cls.params_from_wire(slots) == params


def test_codec_params_without_a_meaning_are_refused_with_the_value():
    vq, jpeg, raw = codec_class("vq"), codec_class("jpeg"), codec_class("raw")
    with pytest.raises(ValueError, match="entropy = 4 is not one of 1 none, 2 static, 3 adaptive"):
        vq.params_from_wire([12, 4, 0])
    with pytest.raises(ValueError, match="bits = 33 is outside 1..32"):
        vq.params_from_wire([33, 1, 0])
    with pytest.raises(ValueError, match=r"quality = 101 is outside 1..100"):
        jpeg.params_from_wire([101, 0, 0])
    with pytest.raises(ValueError, match=r"codec raw has 0 parameters, but codec_params\[1\] = 5"):
        raw.params_from_wire([0, 5, 0])
    with pytest.raises(ValueError, match="codec_params has 2 values"):
        raw.params_from_wire([0, 0])
    # The sender refuses what it cannot carry, naming it.
    with pytest.raises(ValueError, match=r"carries parameters \[\], not \['bits'\]"):
        raw.params_to_wire({"bits": "8"})
    with pytest.raises(ValueError, match="quality='0' has no wire form"):
        jpeg.params_to_wire({"quality": "0"})
    with pytest.raises(ValueError, match="entropy='zip'"):
        vq.params_to_wire({"bits": "12", "entropy": "zip"})
    with pytest.raises(ValueError, match="0 is 'not given'"):
        WireParam("x", lo=0)
