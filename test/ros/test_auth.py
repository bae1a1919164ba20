"""Message authentication over real DDS: another process on the domain cannot touch a robot's requests.

The spoofer (spoofer.py, a separate process) holds only another robot's key. While it attacks, every
answer the victim receives must be its own (the tokens the unsplit model gives for the victim's image
and question), exactly one per request, and the server must have counted the drops.
"""

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from rclpy.serialization import deserialize_message, serialize_message

from edge_vlm_ros.bringup import NodeSet, NodeSpec, PARAM_FILES, config_dir
from edge_vlm_ros.client import RobotClient
from edge_vlm_ros.conversions import chunk_to_msg
from edge_vlm_ros.core.auth import (Authenticator, ReplayGuard, Verdict, compute_mac, create_key,
                                   default_keys_dir, ensure_keys, load_key)
from edge_vlm_ros.core.chunks import ActionChunk
from edge_vlm_ros.core.split import load_vlm
from edge_vlm_ros.core.types import Outcome
from edge_vlm_ros.msg import Prompt
from edge_vlm_ros.msg_auth import MessageAuth, canonical_bytes, sign_with_key
from edge_vlm_ros.tools.default_model import ensure
from ros_harness import running

HERE = Path(__file__).resolve().parent
N_NEW = 6


def _image(seed):
    return np.random.RandomState(seed).randint(0, 256, (64, 64, 3), np.uint8)


def _spoofer(env, keys_dir, out, *extra):
    return subprocess.Popen([sys.executable, str(HERE / "spoofer.py"), "--keys-dir", str(keys_dir),
                             "--out", str(out), *extra], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)


def _stop(p):
    p.terminate()
    try:
        _, err = p.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
    return err.decode(errors="replace")[-2000:]


def test_spoofer_cannot_hijack_reject_or_pause_a_robot(ros_env, tmp_path):
    model = ensure()
    reference = load_vlm(model)
    n_tokens, dim = reference.server_forward_images([_image(0)]).shape[1:]
    stats_path = tmp_path / "server_stats.json"
    overrides = {"edge": {"max_new_tokens": N_NEW},
                 "server": {"ignore_eos": True, "stats_path": str(stats_path), "match_ttl_s": 3.0}}
    with running(ros_env, tmp_path, 2, overrides, with_controller=False) as (nodes, client):
        spoof = _spoofer(ros_env, tmp_path / "keys", tmp_path / "spoofer.json", "--fingerprint",
                         reference.fingerprint, "--shape", str(n_tokens), str(dim))
        try:
            # The spoofer must be on the graph (reading the victim's prompts) before the victim asks.
            # (by its node name: counting readers passes as soon as the edge and server are there).
            assert client.wait_for(lambda: any(
                i.node_name == "not_a_robot"
                for i in client.node.get_subscriptions_info_by_topic("/robot_0/edge_vlm/prompt")), 60), _stop(spoof)
            time.sleep(1.0)
            questions = ["what color is the shape ?", "how many shapes are there ?", "is there a circle ?"]
            asked = []
            for i, q in enumerate(questions * 2):
                img = _image(i)
                a = client.ask("robot_0", img, q, timeout=60)
                assert a is not None, f"question {i}: no answer (paused by a forged PAUSE?)"
                asked.append((a, reference.monolithic_generate(img, q, N_NEW, N_NEW)))
            time.sleep(3.5)        # past match_ttl_s: any forged half would have produced its outcome
        finally:
            err = _stop(spoof)
        sent = json.loads((tmp_path / "spoofer.json").read_text())
        assert sent["replayed_prompt"] >= len(asked) and sent["random_ids"] > 10 and sent["pause"] > 10, (sent, err)

        for a, want in asked:
            assert a.outcome is Outcome.OK, a.reason
            assert a.token_ids == want, "the victim got an answer that is not computed from its own request"
        answers = [a for _, a in client.answers["robot_0"]]
        counts = Counter(a.request_id for a in answers)
        assert all(n == 1 for n in counts.values()), counts.most_common(3)
        assert sorted(counts) == sorted(client.sent["robot_0"]), "robot_0 got outcomes for ids it never sent"
        assert all(a.outcome is Outcome.OK and "pwned" not in a.text for a in answers)
        assert all(s == 0 for _, s, _ in client.flow["robot_0"]), "an authenticated PAUSE reached robot_0"
        dropped_here = client.auth_dropped["robot_0"]
        assert dropped_here.get("unsigned", 0) > 0 and dropped_here.get("bad_mac", 0) > 0, dropped_here
        # The insider's halves naming robot_0 were refused on robot_1's route, never finishing robot_0's
        # (robot_1's edge did not open them, so it passes the server's refusals on as their outcomes).
        r1 = [a for _, a in client.answers["robot_1"]]
        assert r1 and all(a.outcome is not Outcome.OK or a.robot_id == "robot_1" for a in r1)
        assert any("does not match the namespace" in a.reason for a in r1), [a.reason for a in r1][:5]
        stats = json.loads(stats_path.read_text())
        dropped = stats["auth_dropped"]["robot_0"]
        for reason in ("unsigned", "bad_mac", "replay"):
            assert dropped.get(reason, 0) > 0, (reason, dropped)


def test_controller_executes_only_chunks_signed_with_the_robots_key(ros_env, tmp_path):
    keys = tmp_path / "keys"
    ensure_keys(keys, ["robot_0", "robot_1"])
    cfg = config_dir()
    spec = NodeSpec("controller", "/", {"robots": ["robot_0"], "actions": True, "auth_keys_dir": str(keys),
                                        "stats_path": str(tmp_path / "ctl.json")},
                    cfg / PARAM_FILES["controller"], "controller")
    nodes = NodeSet([spec], env=ros_env, log_dir=tmp_path / "logs").start()
    client = RobotClient(["robot_0"], "test_auth_chunks", actions=True, auth_keys_dir=str(keys))
    spoof = None
    try:
        assert client.wait_for(lambda: len(client.actions["robot_0"]) > 5, 60), nodes.poll()
        spoof = _spoofer(ros_env, keys, tmp_path / "spoofer.json", "--chunks", "--fingerprint", "x",
                         "--shape", "1", "1")
        assert client.wait_for(lambda: client.node.count_publishers("/robot_0/edge_vlm/action_chunk") >= 1, 60)
        t0 = time.time_ns()
        time.sleep(3.0)
        err = _stop(spoof)
        spoof = None
        sent = json.loads((tmp_path / "spoofer.json").read_text())
        assert sent["chunks"] > 20, (sent, err)
        with client._lock:
            during = [m for t, m in client.actions["robot_0"] if t > t0]
        assert during and all(m.status != m.STATUS_ACTING for m in during), "a forged chunk was executed"
        # A chunk signed with robot_0's key is executed: the check above can fail.
        good = ActionChunk.from_array(np.full((8, 7), 0.25, np.float32), request_id="a" * 32, robot_id="robot_0",
                                      episode_id="", stamp_ns=time.time_ns(), control_period_s=0.05)
        pub = client.node.create_publisher(type(chunk_to_msg(good)), "/robot_0/edge_vlm/action_chunk", 10)
        assert client.wait_for(lambda: pub.get_subscription_count() >= 1, 30)
        time.sleep(1.0)
        t1 = time.time_ns()
        good = ActionChunk.from_array(np.full((8, 7), 0.25, np.float32), request_id="b" * 32, robot_id="robot_0",
                                      episode_id="", stamp_ns=time.time_ns(), control_period_s=0.05)
        pub.publish(sign_with_key(chunk_to_msg(good), "robot_0", load_key(keys, "robot_0")))
        assert client.wait_for(lambda: any(t > t1 and m.status == m.STATUS_ACTING
                                           for t, m in client.actions["robot_0"]), 10), "the genuine chunk was not executed"
    finally:
        if spoof is not None:
            _stop(spoof)
        client.close()
        nodes.stop()
    stats = json.loads((tmp_path / "ctl.json").read_text())
    assert stats["auth_dropped"]["robot_0"].get("unsigned", 0) > 0
    assert stats["auth_dropped"]["robot_0"].get("bad_mac", 0) > 0      # signed with robot_1's key


# ---- in-process checks of the primitives --------------------------------------------------------

def test_key_files_are_private_and_refused_when_readable(tmp_path):
    p = create_key(tmp_path / "k", "robot_0")
    assert oct(p.stat().st_mode & 0o777) == "0o600" and oct(p.parent.stat().st_mode & 0o777) == "0o700"
    assert len(load_key(tmp_path / "k", "robot_0")) == 32
    assert create_key(tmp_path / "k", "robot_0").read_text() == p.read_text(), "an existing key was replaced"
    p.chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        load_key(tmp_path / "k", "robot_0")
    with pytest.raises(FileNotFoundError, match="tools.keys create"):
        load_key(tmp_path / "k", "robot_9")
    with pytest.raises(ValueError):
        create_key(tmp_path / "k", "../etc/passwd")


def _create_and_read(args):
    keys_dir, barrier = args
    barrier.wait()
    create_key(keys_dir, "robot_0")
    return load_key(keys_dir, "robot_0")


def test_processes_creating_one_robots_key_at_once_all_end_with_the_same_key(tmp_path):
    """A launcher and the node it starts (or two launchers) may both find the key missing: whoever
    loses the race must use the winner's key, never replace the one the winner already loaded."""
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    for attempt in range(5):
        keys_dir = tmp_path / f"k{attempt}"
        n = 8
        barrier = ctx.Manager().Barrier(n)
        with ctx.Pool(n) as pool:
            loaded = pool.map(_create_and_read, [(keys_dir, barrier)] * n)
        assert len(set(loaded)) == 1 and loaded[0] == load_key(keys_dir, "robot_0"), \
            f"attempt {attempt}: {len(set(loaded))} different keys in use"
        assert [p.name for p in keys_dir.iterdir()] == ["robot_0.key"], "a temporary file was left behind"


def test_default_keys_dir_is_read_from_the_environment_the_children_get(tmp_path):
    assert default_keys_dir({"EDGE_VLM_KEYS_DIR": str(tmp_path / "a")}) == tmp_path / "a"
    assert default_keys_dir({"XDG_CONFIG_HOME": str(tmp_path)}) == tmp_path / "edge_vlm_ros" / "keys"
    assert default_keys_dir({"HOME": str(tmp_path)}) == tmp_path / ".config" / "edge_vlm_ros" / "keys"


def test_every_field_is_covered_and_each_verdict_is_reached():
    keys = {"robot_0": b"a" * 32, "robot_1": b"b" * 32}
    auth = MessageAuth(Authenticator(keys, max_age_s=5.0))
    m = Prompt()
    m.request_id, m.robot_id, m.text, m.proprio = "x" * 32, "robot_0", "what is it ?", [0.5, 1.5]
    sign_with_key(m, "robot_0", keys["robot_0"])
    base = canonical_bytes(m, "robot_0")
    assert canonical_bytes(m, "robot_1") != base, "the signing robot's name is not covered"
    # Changing any field (nested ones too) changes the canonical bytes, so the MAC no longer holds.
    for mutate in (lambda p: setattr(p, "text", "what is it !"), lambda p: setattr(p, "proprio", [0.5, 1.25]),
                   lambda p: setattr(p.header.stamp, "nanosec", 1), lambda p: setattr(p, "max_new_tokens", 3),
                   lambda p: setattr(p.auth, "stamp_ns", p.auth.stamp_ns + 1),
                   lambda p: setattr(p, "robot_id", "robot_1")):
        c = deserialize_message(serialize_message(m), Prompt)
        assert canonical_bytes(c, "robot_0") == base
        mutate(c)
        assert canonical_bytes(c, "robot_0") != base
        assert auth.verify(c, "robot_0") is Verdict.BAD_MAC
    assert auth.verify(m, "robot_0") is Verdict.OK
    assert auth.verify(m, "robot_0") is Verdict.REPLAY
    assert auth.verify(sign_with_key(Prompt(), "robot_0", keys["robot_0"]), "robot_1") is Verdict.BAD_MAC
    assert auth.verify(Prompt(), "robot_0") is Verdict.UNSIGNED
    stale = sign_with_key(Prompt(), "robot_0", keys["robot_0"])
    stale.auth.stamp_ns -= 6_000_000_000
    stale.auth.mac = [0] * 16          # all zero: unsigned (a fixed-size field cannot be empty)
    stale.auth.mac = list(compute_mac(keys["robot_0"], canonical_bytes(stale, "robot_0")))
    assert auth.verify(stale, "robot_0") is Verdict.STALE
    unknown = MessageAuth(Authenticator({"robot_0": keys["robot_0"]}))
    assert unknown.verify(sign_with_key(Prompt(), "robot_1", keys["robot_1"]), "robot_1") is Verdict.UNKNOWN_KEY


def test_the_key_name_is_covered_and_identical_messages_are_not_replays():
    """The key's name is not sent, but covered: two robots that (wrongly) share one key still cannot
    speak for each other. And a sender that signs the same content twice (a repeated Cancel) gets two
    stamps, so neither copy is taken for a replay of the other; a real copy still is."""
    same = b"s" * 32
    auth = MessageAuth(Authenticator({"robot_0": same, "robot_1": same}, max_age_s=5.0))
    m = sign_with_key(Prompt(), "robot_0", same)
    assert auth.verify(deserialize_message(serialize_message(m), Prompt), "robot_1") is Verdict.BAD_MAC
    twice = [sign_with_key(Prompt(), "robot_0", same) for _ in range(50)]
    assert len({t.auth.stamp_ns for t in twice}) == 50
    assert all(auth.verify(t, "robot_0") is Verdict.OK for t in twice)
    assert all(auth.verify(t, "robot_0") is Verdict.REPLAY for t in twice)


def test_replay_cache_is_bounded_and_never_forgets_unsafely():
    now = [10_000_000_000]
    g = ReplayGuard(max_age_s=5.0, capacity=4, clock=lambda: now[0])
    stamps = [now[0] - 100 + i for i in range(6)]
    def tag(i: int) -> bytes:
        return i.to_bytes(16, "little")

    assert all(g.check("r", s, tag(i)) is Verdict.OK for i, s in enumerate(stamps))
    assert len(g._seen["r"]) <= 4
    # MACs 0 and 1 were evicted; their stamps are under the floor, so their replay is still refused.
    assert g.check("r", stamps[0], tag(0)) is Verdict.REPLAY and g.check("r", stamps[1], tag(1)) is Verdict.REPLAY
    assert g.check("r", stamps[5], tag(5)) is Verdict.REPLAY                 # still remembered
    assert g.check("r", now[0] + 6_000_000_000, tag(99)) is Verdict.STALE
    assert g.check("r", now[0] + 1, tag(100)) is Verdict.OK
