"""Markdown summary and matplotlib plots of a results.json (one PNG per comparison)."""

from __future__ import annotations

from pathlib import Path


def _fmt(x, nd: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def plots(res: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    sw = res.get("batch_sweep") or {}
    if sw.get("rows"):
        rows = sw["rows"]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([r["max_batch_size"] for r in rows], [r["new_tokens_per_s"] or 0 for r in rows], "o-")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("server max_batch_size")
        ax.set_ylabel("new tokens / s")
        ax.set_title(f"Batch-size sweep (best {sw.get('best_batch_size')})")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "batch_sweep.png", dpi=110)
        plt.close(fig)
        made.append("batch_sweep.png")
    cs = res.get("cloud_vs_split") or {}
    if cs.get("cloud_only") and cs.get("split"):
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
        runs = [("shared CPUs", cs)]
        cp = res.get("cloud_vs_split_pinned") or {}
        if cp.get("cloud_only") and cp.get("split"):
            runs.append(("pinned (edge CPU 0, server CPU 1)", cp))
        w = 0.38
        for j, (label, c) in enumerate(runs):
            thr = [c["cloud_only"].get("requests_per_s") or 0, c["split"].get("requests_per_s") or 0]
            xs = [i + (j - (len(runs) - 1) / 2) * w for i in range(2)]
            bars = a1.bar(xs, thr, width=w, color=["#999", "#2a7"] if j == 0 else ["#666", "#185"],
                          edgecolor="k", hatch="" if j == 0 else "//")
            a1.text(sum(xs) / 2, max(thr) * 1.02, f"{label}\ngain x{_fmt(c.get('gain'))} / bound x{_fmt(c.get('bound'))}",
                    ha="center", va="bottom", fontsize=7)
            if c.get("bound") and thr[0]:
                a1.plot([xs[1] - w / 2, xs[1] + w / 2], [thr[0] * c["bound"]] * 2, "k--", lw=1.2)
            del bars
        a1.set_xticks([0, 1], ["cloud-only", "split"])
        a1.set_ylabel("requests / s")
        a1.set_ylim(0, a1.get_ylim()[1] * 1.25)
        a1.set_title("Throughput (dashed: cloud-only x bound)", fontsize=10)
        t1 = cs.get("table_one") or {}
        parts = [t1.get("vision_fraction") or 0, t1.get("llm_fraction") or 0, t1.get("overhead_fraction") or 0]
        a2.barh(["cloud-only"], [parts[0]], color="#c84", label="vision")
        a2.barh(["cloud-only"], [parts[1]], left=[parts[0]], color="#48c", label="LLM")
        a2.barh(["cloud-only"], [parts[2]], left=[parts[0] + parts[1]], color="#bbb", label="overhead")
        a2.set_xlim(0, 1)
        a2.legend(loc="lower right", fontsize=8)
        a2.set_title("Server time breakdown (Table I)")
        fig.tight_layout()
        fig.savefig(out / "cloud_vs_split.png", dpi=110)
        plt.close(fig)
        made.append("cloud_vs_split.png")
    mr = res.get("multi_robot") or {}
    if mr.get("rows"):
        rows = mr["rows"]
        n = [r["robots"] for r in rows]
        fig, a1 = plt.subplots(figsize=(5.5, 3.5))
        a1.plot(n, [r["requests_per_s"] or 0 for r in rows], "o-", color="#2a7", label="requests/s")
        a1.set_xlabel("robots into one server")
        a1.set_ylabel("requests / s")
        a2 = a1.twinx()
        a2.plot(n, [r["e2e_p50_ms"] or 0 for r in rows], "s--", color="#48c", label="p50 ms")
        a2.plot(n, [r["e2e_p99_ms"] or 0 for r in rows], "^--", color="#c44", label="p99 ms")
        a2.set_ylabel("end-to-end latency (ms)")
        a1.set_xticks(n)
        fig.legend(loc="upper left", fontsize=8)
        a1.set_title("Robots into one server")
        fig.tight_layout()
        fig.savefig(out / "multi_robot.png", dpi=110)
        plt.close(fig)
        made.append("multi_robot.png")
    lk = res.get("links") or {}
    if lk.get("rates"):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        rates = sorted(lk["rates"], key=lambda k: int(k))
        for robot, label in lk.get("codecs", {}).items():
            for ax, key in zip(axes, ("features_on_server_ms", "answer_ms")):
                xs, ys = [], []
                for r in rates:
                    v = lk["rates"][r].get(robot, {}).get(key, {}).get("p50")
                    if v is not None:
                        xs.append(int(r) / 1000)
                        ys.append(v)
                ax.plot(xs, ys, "o-", label=label)
        for ax, t in zip(axes, ("frame -> features on server", "frame -> answer")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("link rate (Mbit/s)")
            ax.set_ylabel("p50 latency (ms)")
            ax.set_title(t)
            ax.grid(alpha=0.3, which="both")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "links.png", dpi=110)
        plt.close(fig)
        made.append("links.png")
    return made


def markdown(res: dict) -> str:
    m = res.get("meta", {})
    L = [f"# edge_vlm_ros benchmark ({m.get('mode')} mode)", "",
         f"- command: `{m.get('command')}`", f"- machine: {m.get('machine')}", f"- started: {m.get('started')}",
         f"- model: {m.get('model_desc')}", f"- max_new_tokens {m.get('max_new_tokens')} (ignore_eos), "
         f"{m.get('threads')} torch thread(s) per process, camera {m.get('camera')}", ""]
    sw = res.get("batch_sweep") or {}
    if sw.get("rows"):
        L += ["## Server batch-size sweep (engine in-process, always fed)", "",
              "| max_batch_size | requests/s | new tokens/s | mean batch | generate p50 ms |", "|---|---|---|---|---|"]
        L += [f"| {r['max_batch_size']} | {_fmt(r['requests_per_s'])} | {_fmt(r['new_tokens_per_s'])} | "
              f"{_fmt(r['mean_batch_size'])} | {_fmt(r['generate_ms_p50'])} |" for r in sw["rows"]]
        L += ["", f"Best batch size **{sw.get('best_batch_size')}**: x{_fmt(sw.get('best_over_batch1'))} the "
              f"throughput of batch 1.", ""]
    cs = res.get("cloud_vs_split") or {}
    if cs.get("cloud_only"):
        t1 = cs.get("table_one") or {}
        L += ["## Cloud-only vs split (same nodes, same server, replayed bag)", "",
              "| config | requests/s | new tokens/s | e2e p50 / p90 / p99 ms | bytes/request | outcomes | pauses |",
              "|---|---|---|---|---|---|---|"]
        for k in ("cloud_only", "split"):
            s = cs.get(k) or {}
            e = s.get("e2e_ms") or {}
            fb = (s.get("features_bytes") or {}).get("mean")
            L.append(f"| {k} | {_fmt(s.get('requests_per_s'))} | {_fmt(s.get('new_tokens_per_s'))} | "
                     f"{_fmt(e.get('p50'), 1)} / {_fmt(e.get('p90'), 1)} / {_fmt(e.get('p99'), 1)} | {_fmt(fb, 0)} | "
                     f"{s.get('outcomes_all')} | {s.get('pauses')} |")
        L += ["", f"Table I (cloud-only server time): vision {_fmt(100 * (t1.get('vision_fraction') or 0), 1)}%, "
              f"LLM {_fmt(100 * (t1.get('llm_fraction') or 0), 1)}%, overhead "
              f"{_fmt(100 * (t1.get('overhead_fraction') or 0), 1)}% (t_vision {_fmt(t1.get('t_vision_ms_per_request'))} ms, "
              f"t_llm {_fmt(t1.get('t_llm_ms_per_request'))} ms per request).", "",
              f"Measured gain **x{_fmt(cs.get('gain'), 3)}** against the bound (t_vision + t_llm) / max = "
              f"x{_fmt(cs.get('bound'), 3)}: gain/bound {_fmt(cs.get('gain_over_bound'), 3)}, "
              f"(gain-1)/(bound-1) {_fmt(cs.get('extra_over_possible'), 3)}.", ""]
        cp = res.get("cloud_vs_split_pinned") or {}
        if cp.get("cloud_only"):
            t1p = cp.get("table_one") or {}
            L += [f"Pinned run ({cp.get('cpus')}): the fair emulation of two devices on one machine.", "",
                  "| config (pinned) | requests/s | e2e p50 / p90 / p99 ms | outcomes | pauses |", "|---|---|---|---|---|"]
            for k in ("cloud_only", "split"):
                x = cp.get(k) or {}
                e = x.get("e2e_ms") or {}
                L.append(f"| {k} | {_fmt(x.get('requests_per_s'))} | {_fmt(e.get('p50'), 1)} / {_fmt(e.get('p90'), 1)} / "
                         f"{_fmt(e.get('p99'), 1)} | {x.get('outcomes_all')} | {x.get('pauses')} |")
            L += ["", f"Pinned: vision {_fmt(100 * (t1p.get('vision_fraction') or 0), 1)}%, LLM "
                  f"{_fmt(100 * (t1p.get('llm_fraction') or 0), 1)}% of the cloud-only server's time; gain "
                  f"**x{_fmt(cp.get('gain'), 3)}** against bound x{_fmt(cp.get('bound'), 3)}: gain/bound "
                  f"{_fmt(cp.get('gain_over_bound'), 3)}, (gain-1)/(bound-1) {_fmt(cp.get('extra_over_possible'), 3)}.", ""]
        for k in ("cloud_only", "split"):
            st = (cs.get(k) or {}).get("stages_ms") or {}
            L.append(f"- {k} stages (mean ms): " + ", ".join(f"{n.replace('_ms', '')} {_fmt(v.get('mean'), 1)}"
                                                         for n, v in st.items()))
        L.append("")
    mr = res.get("multi_robot") or {}
    if mr.get("rows"):
        L += ["## Robots into one server (split, back-pressure on)", "",
              "| robots | requests/s | new tokens/s | e2e p50 / p99 ms | PAUSEs | max queue depth | outcomes |",
              "|---|---|---|---|---|---|---|"]
        L += [f"| {r['robots']} | {_fmt(r['requests_per_s'])} | {_fmt(r['new_tokens_per_s'])} | "
              f"{_fmt(r['e2e_p50_ms'], 1)} / {_fmt(r['e2e_p99_ms'], 1)} | {r['pauses']} | {r['max_queue_depth']} | "
              f"{r['outcomes']} |" for r in mr["rows"]]
        L.append("")
    lk = res.get("links") or {}
    if lk.get("skipped") or lk.get("error"):
        L += ["## Rate-limited links", "", f"Not run: {lk.get('skipped') or lk.get('error')}", ""]
    if lk.get("rates"):
        codecs = lk.get("codecs", {})
        L += ["## Rate-limited links (tbf veth between namespaces, one request at a time)", "",
              f"{lk.get('layout', '')}. Cells: frame -> features on server p50 / p90, then frame -> answer "
              f"p50 / p90 (ms), {lk.get('n')} requests per cell.", "",
              "| Mbit/s | " + " | ".join(codecs.values()) + " |", "|---|" + "---|" * len(codecs)]
        for rate in sorted(lk["rates"], key=lambda k: int(k)):
            cells = []
            for robot in codecs:
                x = lk["rates"][rate].get(robot, {})
                f, a = x.get("features_on_server_ms") or {}, x.get("answer_ms") or {}
                bad = {k: v for k, v in (x.get("outcomes") or {}).items() if k != "ok"}
                cells.append(f"{_fmt(f.get('p50'), 0)} / {_fmt(f.get('p90'), 0)}; {_fmt(a.get('p50'), 0)} / "
                             f"{_fmt(a.get('p90'), 0)}" + (f" {bad}" if bad else ""))
            L.append(f"| {int(rate) / 1000:g} | " + " | ".join(cells) + " |")
        first = lk["rates"][sorted(lk["rates"], key=lambda k: int(k))[0]]
        L += ["", "Bytes on the wire per request (serialized VisualFeatures): " +
              ", ".join(f"{codecs[r]} {_fmt(first.get(r, {}).get('features_bytes'), 0)}" for r in codecs), ""]
        for k, v in (lk.get("ratios") or {}).items():
            L.append(f"- {k}: {v}")
        if lk.get("vq"):
            L.append(f"- {lk['vq']}")
        L.append("")
    rss = res.get("peak_rss_mb") or {}
    if rss:
        L += ["## Peak RSS per process (VmHWM, MB)", "", ", ".join(f"{k} {v}" for k, v in rss.items()), ""]
    if res.get("errors"):
        L += ["## Errors", ""] + [f"- {e}" for e in res["errors"]] + [""]
    return "\n".join(L)
