"""Rate-limited links (seed 003 Fig. 6): a robot and the server in two network namespaces joined by
a tbf-shaped veth pair, time from frame to features-on-server and to answer, per codec and rate.

Layout: every codec gets a fresh link (a new namespace pair, so nothing a slow codec left queued
in the shaper or in a reliable writer's history can delay the next one), a fresh server in the
server namespace and a fresh worker in the robot namespace. The worker starts that codec's edge
node next to it and publishes the camera frames there, as the robot's camera would: frames never
cross the link, only what the codec sends (features, JPEG or raw image), the prompt's request and
the answer do. Within a codec the rates go from fast to slow, changed in place
(netns_link.sh up is idempotent), and before every request the worker waits until both tbf queues
are empty (`tc -s qdisc` backlog 0), so each request measures the link, not a queue.

Camera frames are best effort (qos.CAMERA, the camera's sensor-data profile). A 338 KB rgb8 frame
is six ~64 KB UDP datagrams sent back to back; when the receiving edge is slow to drain its socket
(the CPU is shared) the kernel drops one (UDP RcvbufErrors, counted per rate in the robot
namespace, where net.core.rmem_default cannot be raised) and best effort never repairs it. So the
worker publishes a short burst of freshly stamped frames before each prompt, makes the request
again when the edge answered with a frame older than the burst (all of it dropped; after ATTEMPTS
tries the request is counted as `stale_frame` and left out of the latencies), and measures every
latency from the stamp of the frame the edge actually used (Answer.header.stamp):
  frame -> features on server = auth.stamp_ns (VisualFeatures: its publish time) + transport_ms (Answer) - frame stamp
                              = the server's receive time - frame stamp, both on this host's clock;
  frame -> answer             = answer received (robot side) - frame stamp.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from ..bag.netns import LinkConfig, find_link_script
from ..processes import launcher_main, stop_processes

CODECS = {  # robot name -> edge parameters
    "robot_raw": {"split_point": "none", "codec": "image"},
    "robot_jpeg90": {"split_point": "none", "codec": "jpeg", "jpeg_quality": 90},
    "robot_jpeg10": {"split_point": "none", "codec": "jpeg", "jpeg_quality": 10},
    "robot_fp16": {"split_point": "projector", "codec": "raw", "codec_dtype": "float16"},
}
LABELS = {"robot_raw": "raw image", "robot_jpeg90": "JPEG-90", "robot_jpeg10": "JPEG-10",
          "robot_fp16": "fp16 features", "robot_vq": "vq"}
CODEC_KEYS = {"raw": "robot_raw", "jpeg90": "robot_jpeg90", "jpeg10": "robot_jpeg10", "fp16": "robot_fp16",
              "vq": "robot_vq"}
FRAME_BURST = 4        # freshly stamped frames published before each prompt
FRAME_SPACING_S = 0.1  # lets the edge drain its socket between ~6-datagram frames
LINK_BURST_BYTES = 1600  # tbf bucket: one full Ethernet frame (netns_link.sh's minimum)
ATTEMPTS = 5           # requests per measurement before a lost-frame request is counted as stale_frame


def robot_side_env(env: dict[str, str]) -> dict[str, str]:
    """The robot namespace's processes (worker = camera, edge) keep Fast DDS's shared-memory transport
    next to UDPv4, so camera frames go from the camera to the edge through shared memory as on a
    robot, instead of as ~6 best-effort 64 KB loopback datagrams each that overflow the edge's UDP
    receive buffer. The server stays UDPv4-only: Fast DDS uses shared memory only when both sides
    have it, so everything between robot and server still crosses the shaped veth."""
    return {**env, "FASTDDS_BUILTIN_TRANSPORTS": "DEFAULT"}


def set_rate(link: LinkConfig, rate_kbit: int) -> None:
    # A one-frame bucket: with the script's default (>= 4 KB) a small message leaves at line rate
    # after an idle gap (the requests are spaced), so JPEG-10 or VQ would not see the rate at all;
    # a real narrow link serializes every packet at its rate.
    res = subprocess.run(["bash", str(find_link_script()), "up", link.ns_a, link.ns_b, str(rate_kbit),
                          "--net", link.net, "--burst-bytes", str(LINK_BURST_BYTES)], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"netns_link.sh up at {rate_kbit} kbit/s failed: {res.stderr.strip()}")


def _ifname(peer: str) -> str:
    if len(peer) > 14:
        raise ValueError(f"namespace name {peer!r} too long for this helper")
    return f"v{peer}"  # netns_link.sh's ifname_to


def backlog_bytes(link: LinkConfig) -> int:
    """Bytes queued in the two tbf shapers (`tc -s qdisc` backlog), both directions."""
    total = 0
    for ns, dev in ((link.ns_a, _ifname(link.ns_b)), (link.ns_b, _ifname(link.ns_a))):
        out = subprocess.run(["tc", "-n", ns, "-s", "qdisc", "show", "dev", dev], capture_output=True,
                             text=True).stdout
        m = re.search(r"backlog (\d+)b", out)
        total += int(m.group(1)) if m else 0
    return total


def shaped_bytes_sent(link: LinkConfig) -> int:
    """Bytes the robot -> server shaper has sent so far (`tc -s qdisc` "Sent N bytes"): what really
    crossed the link, to check against the messages' sizes."""
    out = subprocess.run(["tc", "-n", link.ns_a, "-s", "qdisc", "show", "dev", _ifname(link.ns_b)],
                         capture_output=True, text=True).stdout
    m = re.search(r"Sent (\d+) bytes", out)
    return int(m.group(1)) if m else 0


def drain(link: LinkConfig, timeout_s: float, quiet_s: float = 0.3) -> float:
    """Wait until both shapers stay empty for quiet_s; returns the seconds waited (timeout_s if not)."""
    t0 = time.monotonic()
    empty_since = None
    while time.monotonic() - t0 < timeout_s:
        if backlog_bytes(link) == 0:
            empty_since = empty_since or time.monotonic()
            if time.monotonic() - empty_since >= quiet_s:
                return time.monotonic() - t0
        else:
            empty_since = None
        time.sleep(0.05)
    return timeout_s


def udp_counters() -> dict[str, int]:
    """This network namespace's UDP counters (/proc/net/snmp)."""
    lines = [ln.split() for ln in open("/proc/net/snmp") if ln.startswith("Udp:")]
    return {k: int(v) for k, v in zip(lines[0][1:], lines[1][1:])} if len(lines) >= 2 else {}


def run_schedule(schedule: list[list[int]], robot: str, one, link: LinkConfig, probe, timeout_s: float) -> dict:
    """The link changing under the robot: phases [rate_kbit, requests] run in order, the rate changed
    in place between them, one request at a time as in the per-rate runs. Every request is kept (phase,
    outcome, frame -> answer, bytes of its VisualFeatures message), and every codec_switch the edge
    publishes (only an edge with a codec_ladder publishes them)."""
    from std_msgs.msg import String

    from .. import qos, topics

    switches: list[dict] = []
    probe.node.create_subscription(String, topics.for_robot(robot, topics.CODEC_SWITCH),
                                   lambda m: switches.append({"t_ns": time.time_ns(), **json.loads(m.data)}),
                                   qos.CODEC_SWITCH)
    requests: list[dict] = []
    t_start = time.time_ns()
    i = 0
    for phase, (rate, n) in enumerate(schedule):
        set_rate(link, int(rate))
        for _ in range(int(n)):
            t0 = time.time_ns()
            x = one(robot, i, timeout_s)
            sizes = probe.features_since([robot], t0)
            x.update(phase=phase, rate_kbit=int(rate), t_s=round((t0 - t_start) / 1e9, 3),
                     features_bytes=sizes[-1] if sizes else None)
            requests.append(x)
            i += 1
        print(f"[links] phase {phase} ({rate} kbit/s, {n} requests) done; switches so far: "
              f"{sum(s.get('event') == 'switch' for s in switches)}", flush=True)
    return {"requests": requests, "codec_switches": switches}


def worker(spec: dict) -> int:
    """Runs inside the robot namespace: the edge, a probe (camera, prompts, answers), the requests."""
    from ..bringup import config_dir
    from .measure import Probe, latency_summary
    from .procs import ProcessGroup, node_command

    out = Path(spec["out"])
    link = LinkConfig(**spec["link"])
    robots = list(spec["robots"])
    from ..core.auth import ensure_keys
    ensure_keys(None, robots)   # the nodes authenticate with the default keys
    group = ProcessGroup(dict(os.environ), Path(spec["log_dir"]))
    result: dict = {"rates": {}, "errors": []}
    probe = None
    try:
        for r in robots:
            params = {"robot_id": r, "model_path": spec["model"], "max_new_tokens": spec["max_new_tokens"],
                      "device": spec["edge_device"], **spec["edge_params"][r]}
            cmd = node_command("edge_vlm_ros.edge_node", f"/{r}", params, config_dir() / "robot.yaml")
            if spec.get("edge_params_file"):
                cmd += ["--params-file", spec["edge_params_file"]]
            group.start(f"edge_{r}", cmd)
        probe = Probe(robots, "edge_vlm_bench_links", decode_features=True)
        if not probe.wait_ready(spec["ready_timeout"], abort=lambda: bool(group.dead())):
            result["errors"].append(f"nodes not ready within {spec['ready_timeout']} s; exited: {group.dead()}")
            return 1
        import numpy as np

        images = [np.load(p) for p in spec["images"]]
        question = spec["question"]

        def one(robot: str, i: int, timeout: float, attempts: int = ATTEMPTS) -> dict:
            result["drain_s"] = result.get("drain_s", 0.0) + drain(link, timeout)
            n0 = probe.n_answers(robot)
            sent = []
            for _ in range(FRAME_BURST):
                sent.append(probe.send_image(robot, images[i % len(images)]))
                time.sleep(FRAME_SPACING_S)
            probe.send_prompt(robot, question)
            got = probe.wait_for(lambda: probe.n_answers(robot) > n0, timeout)
            if not got:
                return {"outcome": "no_answer"}
            with probe._lock:
                t, a = probe.answers[robot][n0]
            if a.outcome.name == "ERROR" and "no camera frame" in a.reason and attempts > 1:
                result["frame_retries"] = result.get("frame_retries", 0) + 1
                return one(robot, i, timeout, attempts - 1)
            if a.stamp_ns not in sent and attempts > 1:
                # every frame of this burst was dropped and the edge answered an older one: its
                # stamp would count idle time as latency, so the request is made again
                result["stale_frame_retries"] = result.get("stale_frame_retries", 0) + 1
                return one(robot, i, timeout, attempts - 1)
            if a.outcome.name == "OK" and a.stamp_ns not in sent:
                # still an older frame after every attempt: the answer is fine, but its latency
                # would be measured from a frame published seconds earlier; counted, not timed
                return {"outcome": "stale_frame", "reason": "every frame of the last burst was lost"}
            x = {"outcome": a.outcome.name.lower(), "reason": a.reason,
                 "frame_used": sent.index(a.stamp_ns) if a.stamp_ns in sent else None,
                 "answer_ms": (t - a.stamp_ns) / 1e6, "transport_ms": a.timings.transport_ms,
                 "edge_ms": a.timings.edge_preprocess_ms + a.timings.edge_encode_ms,
                 "server_ms": a.timings.server_total_ms}
            with probe._feat_lock:
                fs = probe.feature_sent.get(a.request_id)
            if fs is not None and fs[1]:
                x["features_on_server_ms"] = (fs[1] - a.stamp_ns) / 1e6 + a.timings.transport_ms
            return x

        for robot in robots:  # warm-up at the first (fastest) rate
            set_rate(link, spec["rates_kbit"][0])
            for i in range(spec["warmup"]):
                one(robot, i, spec["timeout_s"])
        if spec.get("schedule"):
            result["schedule"] = run_schedule(spec["schedule"], robots[0], one, link, probe, spec["timeout_s"])
            return 0
        for rate in spec["rates_kbit"]:
            set_rate(link, rate)
            per = {}
            for robot in robots:
                t_feat0 = time.time_ns()
                udp0, up0 = udp_counters(), shaped_bytes_sent(link)
                runs = [one(robot, i, spec["timeout_s"]) for i in range(spec["n"])]
                udp1, up1 = udp_counters(), shaped_bytes_sent(link)
                ok = [x for x in runs if x["outcome"] == "ok"]
                sizes = probe.features_since([robot], t_feat0)
                per[robot] = {"codec": LABELS.get(robot, robot), "requests": len(runs),
                              "outcomes": {o: sum(x["outcome"] == o for x in runs) for o in {x["outcome"] for x in runs}},
                              "answer_ms": latency_summary([x["answer_ms"] for x in ok]),
                              "features_on_server_ms": latency_summary([x["features_on_server_ms"] for x in ok
                                                                        if "features_on_server_ms" in x]),
                              "features_bytes": round(sum(sizes) / len(sizes), 1) if sizes else None,
                              "feature_messages": len(sizes),
                              "frames_used": [x.get("frame_used") for x in ok],
                              "link_up_bytes_per_request": round((up1 - up0) / max(1, len(runs)), 1),
                              "udp_robot_ns": {k: udp1.get(k, 0) - udp0.get(k, 0)
                                               for k in ("InDatagrams", "RcvbufErrors", "InErrors")}}
                print(f"[links] {rate} kbit/s {robot}: {per[robot]['answer_ms']['p50']} ms "
                      f"({per[robot]['features_bytes']} B) {per[robot]['outcomes']}", flush=True)
            result["rates"][str(rate)] = per
        return 0
    except Exception as e:  # reported in the JSON; the parent still tears the link down
        import traceback

        result["errors"].append(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        return 1
    finally:
        if probe is not None:
            probe.close()
        result["peak_rss_mb"] = group.stop()
        out.write_text(json.dumps(result, indent=1))


def run_one_codec(robot: str, edge_params: dict, *, model: str, images: list[Path], question: str,
               rates_kbit: list[int], n: int, warmup: int, max_new_tokens: int, timeout_s: float, log_dir: Path,
               out_dir: Path, env: dict[str, str], domain_id: int, server_params: dict, edge_device: str,
               vq_codebook: str, ready_timeout: float, net: str, schedule: list[list[int]] | None = None,
               edge_params_file: Path | None = None, ns: tuple[str, str] = ("evb_robot", "evb_server")) -> dict:
    """A fresh link, server and worker for one codec; everything torn down on return. With `schedule`
    ([rate_kbit, requests] phases) the worker runs run_schedule instead of the per-rate runs;
    `edge_params_file`: an extra parameters file for the edge (lists a -p argument cannot carry)."""
    from ..bag.netns import NetnsLink
    from ..bringup import config_dir
    from ..core.auth import default_keys_dir, ensure_keys
    from .procs import node_command, peak_rss_mb

    cfg = LinkConfig(ns_a=ns[0], ns_b=ns[1], rate_kbit=rates_kbit[0], net=net)
    res: dict = {}
    log_dir.mkdir(parents=True, exist_ok=True)
    # The server and the robot's edge authenticate with the default keys of the environment they get:
    # the key exists before either starts (the server refuses to configure without it).
    ensure_keys(default_keys_dir(env), [robot])
    with NetnsLink(cfg) as link:
        sparams = {**server_params, "robots": [robot]}
        if vq_codebook:
            sparams["codebook_paths"] = [vq_codebook]
        server_log = open(log_dir / f"links_server_{robot}.log", "w")
        server = link.popen(cfg.ns_b, node_command("edge_vlm_ros.server_node", "/", sparams,
                                                   config_dir() / "server.yaml"),
                            env=link.env(cfg.ns_b, base=env, domain_id=domain_id),
                            stdout=server_log, stderr=subprocess.STDOUT)
        spec = {"out": str(out_dir / f"links_worker_{robot}.json"), "link": cfg.__dict__, "robots": [robot],
                "log_dir": str(log_dir / "links_robot"), "model": model, "max_new_tokens": max_new_tokens,
                "edge_device": edge_device, "edge_params": {robot: edge_params}, "ready_timeout": ready_timeout,
                "images": [str(p) for p in images], "question": question, "warmup": warmup, "n": n,
                "rates_kbit": rates_kbit, "timeout_s": timeout_s, "schedule": schedule,
                "edge_params_file": str(edge_params_file) if edge_params_file else None}
        spec_path = out_dir / f"links_spec_{robot}.json"
        spec_path.write_text(json.dumps(spec))
        wpath = Path(spec["out"])
        wpath.unlink(missing_ok=True)
        wlog = open(log_dir / f"links_worker_{robot}.log", "w")
        w = link.popen(cfg.ns_a, [sys.executable, "-m", "edge_vlm_ros.bench.links", "--worker", str(spec_path)],
                       env=robot_side_env(link.env(cfg.ns_a, base=env, domain_id=domain_id)),
                       stdout=wlog, stderr=subprocess.STDOUT)
        n_requests = sum(int(k) for _, k in schedule) if schedule else n * len(rates_kbit)
        budget = ready_timeout + (warmup + n_requests) * (2 * timeout_s + 1) + 30
        deadline = time.monotonic() + budget
        server_rss = None
        while w.poll() is None and time.monotonic() < deadline:
            server_rss = peak_rss_mb(server.pid) or server_rss
            if server.poll() is not None:
                break
            time.sleep(0.5)
        server_rss = peak_rss_mb(server.pid) or server_rss
        if w.poll() is None:
            if server.poll() is not None:
                res["error"] = (f"{robot}: the server exited (code {server.returncode}) before the link worker "
                                f"finished; its log: {log_dir / f'links_server_{robot}.log'}")
            else:
                res["error"] = f"{robot}: link worker did not finish within {budget:.0f} s"
            stop_processes([w], int_grace=20.0)  # on SIGINT the worker stops the edge it started
        server_log.close()
        wlog.close()
    # link.down() (the with block) stopped the worker and the server and deleted the namespaces
    if wpath.is_file():
        wres = json.loads(wpath.read_text())
        res.update(rates=wres.get("rates", {}), errors=wres.get("errors", []), schedule=wres.get("schedule"),
                   frame_retries=wres.get("frame_retries", 0),
                   stale_frame_retries=wres.get("stale_frame_retries", 0), drain_s=round(wres.get("drain_s", 0.0), 2))
        res["peak_rss_mb"] = {**wres.get("peak_rss_mb", {}),
                              f"server_{robot}": round(server_rss, 1) if server_rss else None}
    else:
        res.setdefault("error", f"{robot}: link worker wrote no result")
    return res


def run_links(*, model: str, images: list[Path], question: str, rates_mbit: list[float], n: int, warmup: int,
              max_new_tokens: int, timeout_s: float, log_dir: Path, out_dir: Path, env: dict[str, str],
              domain_id: int, server_params: dict, edge_device: str = "cpu", vq_codebook: str = "",
              vq_placement: str = "projector", ready_timeout: float = 120.0,
              codecs: list[str] | None = None) -> dict:
    """One fresh link + server + worker per codec (see the module docstring); always torn down.

    codecs: a subset of CODEC_KEYS (default all).
    """
    from ..bag.netns import netns_supported

    ok, why = netns_supported()
    if not ok:
        return {"skipped": f"network namespaces unavailable: {why}"}
    edge_params = dict(CODECS)
    vq_note = ""
    if vq_codebook:
        edge_params["robot_vq"] = {"split_point": vq_placement, "codec": "vq", "codebook_path": vq_codebook}
    else:
        vq_note = "vq skipped: no codebook given (--vq-codebook PATH, trained for this model)"
    if codecs:
        unknown = [c for c in codecs if c not in CODEC_KEYS]
        if unknown:
            raise ValueError(f"unknown link codecs {unknown}; known: {sorted(CODEC_KEYS)}")
        wanted = {CODEC_KEYS[c] for c in codecs}
        edge_params = {r: p for r, p in edge_params.items() if r in wanted}
    robots = list(edge_params)
    rates_kbit = sorted({int(round(r * 1000)) for r in rates_mbit}, reverse=True)
    result: dict = {"rates_mbit": rates_mbit, "codecs": {r: LABELS[r] for r in robots}, "n": n, "warmup": warmup,
                    "layout": "fresh namespace pair + server + edge per codec; frames published in the robot "
                              "namespace; tbf queues drained (backlog 0) before every request",
                    "rates": {}, "errors": [], "per_codec": {}}
    if vq_note:
        result["vq"] = vq_note
    else:
        result["vq"] = f"vq: codebook {vq_codebook} at placement {vq_placement}"
    log_dir.mkdir(parents=True, exist_ok=True)
    for robot in robots:
        t = time.monotonic()
        try:
            r = run_one_codec(robot, edge_params[robot], model=model, images=images, question=question,
                           rates_kbit=rates_kbit, n=n, warmup=warmup, max_new_tokens=max_new_tokens,
                           timeout_s=timeout_s, log_dir=log_dir, out_dir=out_dir, env=env, domain_id=domain_id,
                           server_params=server_params, edge_device=edge_device,
                           vq_codebook=vq_codebook if robot == "robot_vq" else "", ready_timeout=ready_timeout,
                           net="198.18.77")
        except Exception as e:
            r = {"error": f"{robot}: {type(e).__name__}: {e}"}
        for rate, per in (r.get("rates") or {}).items():
            result["rates"].setdefault(rate, {}).update(per)
        result["errors"] += r.get("errors") or []
        if r.get("error"):
            result["errors"].append(r["error"])
        for k, v in (r.get("peak_rss_mb") or {}).items():
            result.setdefault("peak_rss_mb", {})[k] = v
        result["per_codec"][robot] = {"elapsed_s": round(time.monotonic() - t, 1),
                                      "frame_retries": r.get("frame_retries"),
                                      "stale_frame_retries": r.get("stale_frame_retries"), "drain_s": r.get("drain_s")}
        print(f"[links] {robot} done in {result['per_codec'][robot]['elapsed_s']} s", flush=True)
    return result


def subprocess_stdout():
    import subprocess

    return subprocess.STDOUT


@launcher_main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="link benchmark worker (started by edge_vlm_ros.bench.run)")
    ap.add_argument("--worker", type=Path, required=True, help="spec JSON written by run_links")
    args = ap.parse_args(argv)
    return worker(json.loads(args.worker.read_text()))


if __name__ == "__main__":
    raise SystemExit(main())
