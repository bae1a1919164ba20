"""The bandwidth-adaptive edge on a real shaped link: real server, real edge, real DDS, a tbf-shaped
veth between two network namespaces (bag/netns.py, needs root), the rate lowered mid-run.

The edge runs a 2-rung ladder: the raw 128x128 frame (~49 KB a request) and JPEG-10 of it (~1 KB).
At 10 Mbit/s the raw frame meets the 1.5 s target (generous: the target counts every wait for a CPU
on a loaded test machine); at 96 kbit/s it takes ~4 s on the wire, so after a couple of answers the
edge must step down to JPEG-10 and publish the switch on edge_vlm/codec_switch. (Much slower links
make DDS's own heartbeats and acknowledgements miss their deadlines. Rungs at different split points
on one model are covered by test/core/test_edge_ladder.py and by the benchmark.) The requests are
made by the links benchmark's worker (bench/links.py, run_schedule) inside the robot's namespace, so
this also runs the benchmark's changing-link scenario end to end.
"""

import os

import numpy as np
import pytest

from edge_vlm_ros.bag.netns import netns_supported
from edge_vlm_ros.bench.links import run_one_codec
from edge_vlm_ros.tools.default_model import ensure

LADDER = ["image: split_point=none, codec=image",
          "jpeg10: split_point=none, codec=jpeg, jpeg_quality=10"]


def test_edge_steps_down_its_ladder_when_the_link_slows_and_publishes_the_switch(ros_env, tmp_path, monkeypatch):
    ok, why = netns_supported()
    if not ok:
        print(f"SKIPPED: the shaped link needs network namespaces: {why}")
        pytest.skip(f"network namespaces unavailable: {why}")
    model = ensure()
    monkeypatch.chdir(tmp_path)   # `python -m` children import the installed package, not the source tree
    paths = []
    for i in range(2):   # smooth frames: JPEG-10 stays small, as for a camera image
        y, x = np.mgrid[0:128, 0:128]
        img = np.stack([(x * 2 + i * 30) % 256, (y * 2) % 256, (x + y) % 256], axis=-1).astype(np.uint8)
        paths.append(tmp_path / f"frame_{i}.npy")
        np.save(paths[-1], img)
    params_file = tmp_path / "ladder.yaml"
    params_file.write_text("/**:\n  ros__parameters:\n    codec_ladder: [" +
                           ", ".join(f'"{e}"' for e in LADDER) + "]\n")
    tag = os.getpid() % 100000
    # A keys folder with no key in it, as on a fresh machine: the run must create the robot's key
    # before the server (which refuses to configure without one) and the edge start, and both must
    # use that same key.
    env = {**ros_env, "EDGE_VLM_KEYS_DIR": str(tmp_path / "keys")}
    res = run_one_codec(
        "robot_adapt", {"latency_target_ms": 1500.0, "ladder_dwell_s": 60.0}, model=model, images=paths,
        question="What is in the image?", rates_kbit=[10000], n=0, warmup=3, max_new_tokens=4, timeout_s=30.0,
        log_dir=tmp_path / "logs", out_dir=tmp_path, env=env, domain_id=int(ros_env["ROS_DOMAIN_ID"]),
        server_params={"model_path": model, "ignore_eos": True, "default_max_new_tokens": 4, "max_batch_size": 1},
        edge_device="cpu", vq_codebook="", ready_timeout=180.0, net="198.19.61",
        schedule=[[10000, 3], [96, 6]], edge_params_file=params_file, ns=(f"evt_r{tag}", f"evt_s{tag}"))
    logs = {p.name: p.read_text()[-1500:] for p in (tmp_path / "logs").rglob("*.log")}
    assert not res.get("error") and not res.get("errors"), (res, logs)
    sched = res["schedule"]
    reqs = sched["requests"]
    assert [x["outcome"] for x in reqs] == ["ok"] * 9, (reqs, logs)
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["robot_adapt.key"]

    events = sched["codec_switches"]
    start = next(e for e in events if e["event"] == "start")
    assert start["current"] == "image" and start["robot_id"] == "robot_adapt"
    sizes = start["message_bytes"]
    assert sizes["image"] > 128 * 128 * 3 > 10 * sizes["jpeg10"], sizes
    switches = [e for e in events if e["event"] == "switch"]
    assert [(e["previous"], e["current"]) for e in switches] == [("image", "jpeg10")], (events, logs)
    assert "target 1500 ms" in switches[0]["reason"] and switches[0]["settings"]["codec"] == "jpeg"
    # the raw image over the target; JPEG-10 the pick (the most preferred rung that meets the target,
    # or the cheapest when none is predicted to: a rung never run borrows the current rung's time)
    pred = switches[0]["predicted_ms"]
    assert pred["image"] > 1500.0 and pred["jpeg10"] < pred["image"], pred

    # Which rung each request used, from the bytes the probe saw on the features topic (the whole message).
    def rung(x):
        return min(sizes, key=lambda r: abs(np.log(sizes[r] / x["features_bytes"])))
    fast, slow = reqs[:3], reqs[3:]
    assert [rung(x) for x in fast] == ["image"] * 3, reqs
    used = [rung(x) for x in slow]
    assert used[0] == "image" and used[-2:] == ["jpeg10", "jpeg10"], used
    # Down once the prediction is over target by the margin (20%) on 2 answers in a row; the link
    # estimate weighs the older, fast answers less with every answer, so here that is the 3rd slow answer.
    assert used.count("image") <= 4, f"stepped down only after {used.count('image')} slow answers: {used}"
    # The switch paid off: on the slow link JPEG-10 answers well within the time the raw image needed.
    image_slow = [x["answer_ms"] for x in slow if rung(x) == "image"]
    jpeg_slow = [x["answer_ms"] for x in slow if rung(x) == "jpeg10"]
    assert float(np.median(jpeg_slow)) < min(image_slow), (image_slow, jpeg_slow)
