"""Rate-limited links (seed 003 Fig. 6): a robot and the server in two network namespaces joined by
a tbf-shaped veth pair, one codec per robot, time from frame to features-on-server and to answer.

Layout: the server runs in the server namespace; this module's worker runs in the robot namespace
and starts there one edge node per codec (raw image, JPEG-90, JPEG-10, fp16 features, and vq when
a codebook is given), so camera frames stay local and only what each codec sends crosses the link.
The link's rate is changed in place between rates (netns_link.sh up is idempotent); requests go
one at a time, so each measures the link, not a queue behind other requests.

frame -> features-on-server = answer time - server_total_ms (the server's time from receiving the
features to answering), so it includes the answer's own trip back (a few hundred bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ..bag.netns import LinkConfig, find_link_script

CODECS = {  # robot name -> edge parameters
    "robot_raw": {"split_point": "none", "codec": "image"},
    "robot_jpeg90": {"split_point": "none", "codec": "jpeg", "jpeg_quality": 90},
    "robot_jpeg10": {"split_point": "none", "codec": "jpeg", "jpeg_quality": 10},
    "robot_fp16": {"split_point": "projector", "codec": "raw", "codec_dtype": "float16"},
}
LABELS = {"robot_raw": "raw image", "robot_jpeg90": "JPEG-90", "robot_jpeg10": "JPEG-10",
          "robot_fp16": "fp16 features", "robot_vq": "vq"}


def set_rate(link: LinkConfig, rate_kbit: int) -> None:
    import subprocess

    res = subprocess.run(["bash", str(find_link_script()), "up", link.ns_a, link.ns_b, str(rate_kbit),
                          "--net", link.net], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"netns_link.sh up at {rate_kbit} kbit/s failed: {res.stderr.strip()}")


def worker(spec: dict) -> int:
    """Runs inside the robot namespace: edges, a probe, the requests. Writes spec['out'] (JSON)."""
    from ..bringup import config_dir
    from .measure import Probe, latency_summary
    from .procs import ProcessGroup, node_command

    out = Path(spec["out"])
    link = LinkConfig(**spec["link"])
    robots = list(spec["robots"])
    group = ProcessGroup(dict(os.environ), Path(spec["log_dir"]))
    result: dict = {"rates": {}, "errors": []}
    probe = None
    try:
        for r in robots:
            params = {"robot_id": r, "model_path": spec["model"], "max_new_tokens": spec["max_new_tokens"],
                      "device": spec["edge_device"], **spec["edge_params"][r]}
            group.start(f"edge_{r}", node_command("edge_vlm_ros.edge_node", f"/{r}", params,
                                                  config_dir() / "robot.yaml"))
        probe = Probe(robots, "edge_vlm_bench_links")
        if not probe.wait_ready(spec["ready_timeout"]):
            result["errors"].append(f"nodes not ready within {spec['ready_timeout']} s; exited: {group.dead()}")
            return 1
        import numpy as np

        images = [np.load(p) for p in spec["images"]]
        question = spec["question"]

        def one(robot: str, i: int, timeout: float, attempts: int = 3) -> dict:
            n0 = probe.n_answers(robot)
            # Camera frames are best effort (qos.CAMERA): a large frame sent once can be lost in the
            # namespace's UDP buffers, so it is sent a few times; the edge keeps only the newest.
            for _ in range(3):
                probe.send_image(robot, images[i % len(images)])
                time.sleep(0.05)
            time.sleep(0.1)  # the frame must be the edge's newest before the prompt asks for it
            t0 = time.time_ns()
            probe.send_prompt(robot, question)
            got = probe.wait_for(lambda: probe.n_answers(robot) > n0, timeout)
            if not got:
                return {"outcome": "no_answer"}
            with probe._lock:
                t, a = probe.answers[robot][n0]
            if a.outcome.name == "ERROR" and "no camera frame" in a.reason and attempts > 1:
                return one(robot, i, timeout, attempts - 1)
            e2e = (t - t0) / 1e6
            return {"outcome": a.outcome.name.lower(), "reason": a.reason, "answer_ms": e2e,
                    "features_on_server_ms": e2e - a.timings.server_total_ms,
                    "transport_ms": a.timings.transport_ms}

        for robot in robots:  # warm-up at the first (fastest) rate
            set_rate(link, spec["rates_kbit"][0])
            for i in range(spec["warmup"]):
                one(robot, i, spec["timeout_s"])
        for rate in spec["rates_kbit"]:
            set_rate(link, rate)
            per = {}
            for robot in robots:
                t_feat0 = time.time_ns()
                runs = [one(robot, i, spec["timeout_s"]) for i in range(spec["n"])]
                ok = [x for x in runs if x["outcome"] == "ok"]
                sizes = probe.features_since([robot], t_feat0)
                per[robot] = {"codec": LABELS.get(robot, robot), "requests": len(runs),
                              "outcomes": {o: sum(x["outcome"] == o for x in runs) for o in {x["outcome"] for x in runs}},
                              "answer_ms": latency_summary([x["answer_ms"] for x in ok]),
                              "features_on_server_ms": latency_summary([x["features_on_server_ms"] for x in ok]),
                              "features_bytes": round(sum(sizes) / len(sizes), 1) if sizes else None}
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


def run_links(*, model: str, images: list[Path], question: str, rates_mbit: list[float], n: int, warmup: int,
              max_new_tokens: int, timeout_s: float, log_dir: Path, out_dir: Path, env: dict[str, str],
              domain_id: int, server_params: dict, edge_device: str = "cpu", vq_codebook: str = "",
              ready_timeout: float = 120.0) -> dict:
    """Bring the link up, start the server in its namespace and the worker in the robot's; tear down."""
    from ..bag.netns import NetnsLink, netns_supported
    from ..bringup import config_dir
    from .procs import node_command, peak_rss_mb

    ok, why = netns_supported()
    if not ok:
        return {"skipped": f"network namespaces unavailable: {why}"}
    edge_params = dict(CODECS)
    vq_note = ""
    if vq_codebook:
        edge_params["robot_vq"] = {"split_point": "projector", "codec": "vq", "codebook_path": vq_codebook}
    else:
        vq_note = "vq skipped: no codebook given (--vq-codebook PATH, trained for this model)"
    robots = list(edge_params)
    rates_kbit = [int(round(r * 1000)) for r in rates_mbit]
    cfg = LinkConfig(ns_a="evb_robot", ns_b="evb_server", rate_kbit=rates_kbit[0], net="198.18.77")
    result: dict = {"rates_mbit": rates_mbit, "codecs": {r: LABELS[r] for r in robots}, "n": n, "warmup": warmup}
    if vq_note:
        result["vq"] = vq_note
    log_dir.mkdir(parents=True, exist_ok=True)
    with NetnsLink(cfg) as link:
        sparams = {**server_params, "robots": robots}
        if vq_codebook:
            sparams["codebook_paths"] = [vq_codebook]
        server_log = open(log_dir / "links_server.log", "w")
        server = link.popen(cfg.ns_b, node_command("edge_vlm_ros.server_node", "/", sparams,
                                                   config_dir() / "server.yaml"),
                            env=link.env(cfg.ns_b, base=env, domain_id=domain_id),
                            stdout=server_log, stderr=subprocess_stdout())
        spec = {"out": str(out_dir / "links_worker.json"), "link": cfg.__dict__, "robots": robots,
                "log_dir": str(log_dir / "links_robot"), "model": model, "max_new_tokens": max_new_tokens,
                "edge_device": edge_device, "edge_params": edge_params, "ready_timeout": ready_timeout,
                "images": [str(p) for p in images], "question": question, "warmup": warmup, "n": n,
                "rates_kbit": rates_kbit, "timeout_s": timeout_s}
        spec_path = out_dir / "links_spec.json"
        spec_path.write_text(json.dumps(spec))
        wlog = open(log_dir / "links_worker.log", "w")
        w = link.popen(cfg.ns_a, [sys.executable, "-m", "edge_vlm_ros.bench.links", "--worker", str(spec_path)],
                       env=link.env(cfg.ns_a, base=env, domain_id=domain_id), stdout=wlog,
                       stderr=subprocess_stdout())
        budget = ready_timeout + len(robots) * (warmup + n * len(rates_kbit)) * (timeout_s + 1) + 60
        deadline = time.monotonic() + budget
        server_rss = None
        while w.poll() is None and time.monotonic() < deadline:
            server_rss = peak_rss_mb(server.pid) or server_rss
            time.sleep(0.5)
        server_rss = peak_rss_mb(server.pid) or server_rss
        if w.poll() is None:
            result["error"] = f"link worker did not finish within {budget:.0f} s"
        server_log.close()
        wlog.close()
    # link.down() (the with block) stopped the worker and the server
    wpath = Path(spec["out"])
    if wpath.is_file():
        wres = json.loads(wpath.read_text())
        result.update(rates=wres.get("rates", {}), errors=wres.get("errors", []))
        result["peak_rss_mb"] = {**wres.get("peak_rss_mb", {}), "server": round(server_rss, 1) if server_rss else None}
    else:
        result.setdefault("error", "link worker wrote no result")
    return result


def subprocess_stdout():
    import subprocess

    return subprocess.STDOUT


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="link benchmark worker (started by edge_vlm_ros.bench.run)")
    ap.add_argument("--worker", type=Path, required=True, help="spec JSON written by run_links")
    args = ap.parse_args(argv)
    return worker(json.loads(args.worker.read_text()))


if __name__ == "__main__":
    raise SystemExit(main())
