"""Feature streams without ROS (core/wire.py StreamDescriptor, core/streams.py): the id is a stable
content address (robots and servers of different builds must compute the same one), the server's
cache refuses an id that is not its descriptor's and stays bounded, the robot's announcer decides
which messages describe their stream."""

import threading

import pytest

from edge_vlm_ros.core.streams import StreamAnnouncer, StreamCache
from edge_vlm_ros.core.wire import StreamDescriptor

FP, CB = bytes.fromhex("0123456789abcdef"), bytes.fromhex("5eed5eed5eed5eed")


def _desc(shape=(577, 1024), **kw) -> StreamDescriptor:
    fields = dict(split_kind=3, split_block=1, codec=2, dtype=2, model_fingerprint=FP, codebook_digest=CB,
                  codec_params=(12, 1, 0), shape=shape)
    fields.update(kw)
    return StreamDescriptor(**fields)


def test_the_id_is_a_pinned_content_address():
    # Pinned: a change to the canonical form would make old robots' ids unknown to new servers.
    assert _desc().stream_id == 0xF3C48F6D
    assert _desc().canonical().startswith(b"edge_vlm_ros/stream/1\0")
    variants = [_desc(split_block=2), _desc(codec=1), _desc(dtype=1), _desc(model_fingerprint=bytes(8)),
                _desc(codebook_digest=bytes(8)), _desc(codec_params=(12, 2, 0)), _desc(shape=(577, 1023)),
                _desc(shape=(577, 1024, 1))]
    assert len({v.stream_id for v in variants} | {_desc().stream_id}) == len(variants) + 1


def test_a_descriptor_that_cannot_travel_is_refused():
    for bad, why in ((_desc(model_fingerprint=b"\x01"), "digests have 1 and 8 bytes"),
                     (_desc(codec=256), "codec = 256 is not a uint8"),
                     (_desc(codec_params=(12, 1, 300)), "codec_params"),
                     (_desc(shape=(2 ** 32,)), "shape")):
        with pytest.raises(ValueError, match=why):
            bad.check()


def test_the_cache_checks_ids_keeps_robots_apart_and_is_bounded():
    cache = StreamCache(max_per_robot=2)
    d = _desc()
    with pytest.raises(ValueError, match="is not its descriptor's"):
        cache.learn("robot_0", d.stream_id ^ 1, d)
    cache.learn("robot_0", d.stream_id, d)
    assert cache.get("robot_0", d.stream_id) == d and cache.get("robot_1", d.stream_id) is None
    others = [_desc(shape=(577, n)) for n in (1, 2)]
    for o in others:
        cache.learn("robot_0", o.stream_id, o)
    assert cache.counts() == {"robot_0": 2} and cache.evicted == 1
    assert cache.get("robot_0", d.stream_id) is None                 # least recently used: gone
    assert "more than 2 streams" in cache.unknown_reason("robot_0", d.stream_id)
    with pytest.raises(ValueError):
        StreamCache(max_per_robot=0)


def test_the_announcer_is_safe_across_threads():
    ann = StreamAnnouncer(period_s=3600)
    results: list[bool] = []
    lock = threading.Lock()

    def send():
        for _ in range(200):
            due = ann.due(7)
            with lock:
                results.append(due)
    threads = [threading.Thread(target=send) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1 and (ann.described, ann.lean) == (1, 799)
