"""Render a bench report: JSON (the record), Markdown (a CI step summary) and a PNG. Computes nothing:
every figure comes from the report dict that ``mmopt.bench.harness`` and ``mmopt.bench.gates`` built.

Files are written atomically (temporary name, then rename), so a CI step never reads half a report.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mmopt.bench.png import PALETTE, Axes, Canvas, GREY, log_ticks, nice_ticks, span, text_width
from mmopt.store import atomic_write, writable

FILES = {"json": "report.json", "markdown": "report.md", "png": "report.png"}


def check_out(out_dir: str | Path, bundle: str | Path) -> None:
    """Refuse an output folder that cannot hold the reports, before minutes of measurement."""
    from mmopt.errors import UsageError

    out, home = Path(out_dir).resolve(), Path(bundle).resolve()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out_dir}: exists and is not a folder. Give a folder for report.json / .md / .png.")
    if out == home or home in out.parents:
        raise UsageError(f"--out {out_dir}: is inside the bundle {bundle}; reports go beside it, e.g. "
                         f"--out {home.name}-bench.")
    parent = next((p for p in (out, *out.parents) if p.exists()), None)
    if parent is None or not parent.is_dir() or not writable(parent):
        raise UsageError(f"--out {out_dir}: cannot be created ({parent} is not a writable folder). "
                         "Choose another output folder.")


def write(report: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / v for k, v in FILES.items()}
    atomic_write(paths["json"], (json.dumps(report, indent=1, default=_default) + "\n").encode())
    atomic_write(paths["markdown"], markdown(report, FILES["png"]).encode())
    atomic_write(paths["png"], png_bytes(report))
    return paths


def _default(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


# ---- Markdown ------------------------------------------------------------------------------

def _f(v: Any, spec: str = ".3f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return format(v, spec)


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def headline_batch(report: dict[str, Any]) -> int | None:
    batches = sorted({r["batch"] for r in report["latency"]})
    return 8 if 8 in batches else (batches[len(batches) // 2] if batches else None)


def markdown(report: dict[str, Any], png_name: str | None = "report.png") -> str:
    gates = report.get("gates", {"passed": None, "failures": []})
    verdict = {True: "passed", False: "FAILED", None: "not evaluated"}[gates["passed"]]
    s, m = report["settings"], report["machine"]
    gpu = m["gpu"]["name"] if m.get("gpu") else "no GPU"
    out = [f"## mmopt bench: gates {verdict}\n",
           f"Bundle `{report['bundle']['path']}` ({report['bundle']['factory']}, fingerprint "
           f"`{report['bundle']['fingerprint']}`) on {m['cpus']} CPUs, {gpu}; {s['threads']} thread(s), "
           f"{s['repeats']} interleaved repeats after {s['warmup']} warm-up, {s['inputs']} inputs.\n"]
    for sk in report.get("skipped", []):
        out.append(f"- skipped **{sk['backend']}**: {sk['reason']}")
    for note in report.get("notes", []):
        out.append(f"- note: {note}")
    if gates["failures"]:
        out.append("\n### Gate failures\n")
        out += [f"- {f}" for f in gates["failures"]]
    out.append("\n### Parity vs eager PyTorch (worst over min/opt/max shapes and outputs)\n")
    rows = []
    for v in report["variants"]:
        for graph, p in v["parity"].items():
            rows.append([v["id"], graph, str(p["outputs"]), _f(p["cos_min"], ".6f"), _f(p["max_abs"], ".2e"),
                         _f(p["max_rel"], ".2e"), _f(p["argmax"]), "pass" if not p["failed"] else
                         f"**{p['failed']} failed**"])
    out.append(_table(["variant", "graph", "outputs", "cos min", "max abs", "max rel", "argmax", "status"], rows)
               if rows else "Only eager ran: nothing to compare.\n")
    tasks = [v for v in report["variants"] if v.get("task")]
    if tasks:
        ref = tasks[0]["task"]["score"]
        out.append(f"\n### Task score ({tasks[0]['task']['metric']} of `{tasks[0]['task']['output']}`, "
                   f"{tasks[0]['task']['samples']} samples)\n")
        out.append(_table(["variant", "score", "vs eager"],
                          [[v["id"], _f(v["task"]["score"], ".4f"), _f(v["task"]["score"] - ref, "+.4f")]
                           for v in tasks]))
    lat = report["latency"]
    out.append("\n### Pipeline latency (ms per call; ratio = paired median vs eager on the same device)\n")
    pipe = [r for r in lat if r["graph"] == "pipeline"]
    has_h2d = any("h2d_ms" in r for r in pipe)
    out.append(_table(["variant", "batch", "p50", "p90", "p99", "mean", "std", "samples/s", "vs eager"]
                      + (["h2d p50"] if has_h2d else []),
                      [[r["variant"], str(r["batch"]), _f(r["p50"]), _f(r["p90"]), _f(r["p99"]), _f(r["mean"]),
                        _f(r["std"]), _f(r["throughput"], ".0f"), _f(r["ratio_vs_eager"], ".2f") + "x"]
                       + ([_f(r.get("h2d_ms"))] if has_h2d else []) for r in pipe]))
    b = headline_batch(report)
    comp = [r for r in lat if r["graph"] != "pipeline" and r["batch"] == b]
    if comp:
        out.append(f"\n### Component latency at batch {b} (ms)\n")
        out.append(_table(["variant", "component", "p50", "p90", "p99", "std", "vs eager"],
                          [[r["variant"], r["graph"], _f(r["p50"]), _f(r["p90"]), _f(r["p99"]), _f(r["std"]),
                            _f(r["ratio_vs_eager"], ".2f") + "x"] for r in comp]))
    mem = report.get("memory", {})
    out.append(f"\n### Memory\n\nProcess peak RSS {_f(mem.get('rss_peak_mb'), '.0f')} MB"
               + (f", GPU peak allocated (torch) {_f(mem.get('gpu_peak_allocated_mb'), '.0f')} MB"
                  if "gpu_peak_allocated_mb" in mem else "") + ". Per variant, growth on loading:\n")
    out.append(_table(["variant", "host RSS +MB", "GPU +MB"],
                      [[v["id"], _f(v["memory"].get("host_rss_delta_mb"), ".1f"),
                        _f(v["memory"].get("gpu_used_delta_mb"), ".1f")] for v in report["variants"]]))
    base = report.get("baseline")
    if base:
        gate = ("pipeline p50 within" if base.get("gate_on") == "p50" else
                "each variant's pipeline ratio to eager, beyond this run's 95% spread, within")
        out.append(f"\n### Against baseline `{base['path']}` ({base['created']}; gate: {gate} "
                   f"+{base['max_latency_regression']:.0%})\n")
        if not base["same_machine"]:
            out.append("- note: the baseline was recorded on a different machine; absolute times may not compare.")
        if any(base.get("unmatched", {}).values()):
            u = base["unmatched"]
            out.append(f"- note: {u['only_in_baseline']} baseline row(s) have no counterpart here and "
                       f"{u['only_in_this_run']} row(s) here are new (other variants or batch sizes): not compared.")
        if base.get("baseline_threads") not in (None, s["threads"]):
            out.append(f"- note: the baseline ran with {base['baseline_threads']} thread(s), this run with "
                       f"{s['threads']}.")
        out.append(_table(["variant", "graph", "batch", "baseline p50", "p50", "change", "baseline vs eager",
                           "vs eager", "status"],
                          [[r["variant"], r["graph"], str(r["batch"]), _f(r["baseline_p50"]), _f(r["p50"]),
                            _f(r["change"], "+.1%"), _f(r["baseline_ratio_vs_eager"], ".2f") + "x",
                            _f(r["ratio_vs_eager"], ".2f") + "x",
                            "**regressed**" if r["regressed"] else ("ok" if r["gated"] else "info")]
                           for r in base["rows"]]))
        if base["tasks"]:
            out.append(_table(["variant", "baseline score", "score"],
                              [[t["variant"], _f(t["baseline_score"], ".4f"), _f(t["score"], ".4f")]
                               for t in base["tasks"]]))
    if png_name:
        out.append(f"\n![latency vs parity and by batch size]({png_name})\n")
    return "\n".join(out) + "\n"


# ---- PNG -----------------------------------------------------------------------------------

def png_bytes(report: dict[str, Any]) -> bytes:
    from mmopt.bench.png import encode_png

    return encode_png(plot(report).px)


def plot(report: dict[str, Any]) -> Canvas:
    """Left: pipeline latency vs accuracy (or parity error) per variant. Right: latency by batch size."""
    c = Canvas(1500, 650)
    ids = [v["id"] for v in report["variants"]]
    color = {vid: PALETTE[i % len(PALETTE)] for i, vid in enumerate(ids)}
    gates = report.get("gates", {}).get("passed")
    title = (f"mmopt bench: {report['bundle']['factory']}  ({report['settings']['threads']} thread(s); "
             f"gates {'passed' if gates else 'FAILED' if gates is False else 'not evaluated'})")
    c.text(750, 12, title, anchor="center", scale=3 if text_width(title, 3) < 1480 else 2)
    _scatter(c, report, color, (130, 110, 680, 500))
    _by_batch(c, report, color, (890, 110, 1440, 500))
    x, y = 130, 588  # legend, wrapping onto a second line when needed
    for vid in ids:
        w = text_width(vid) + 50
        if x + w > 1480:
            x, y = 130, y + 26
        c.disc(x + 8, y + 7, 7, color[vid])
        c.text(x + 22, y, vid)
        x += w
    return c


def _scatter(c: Canvas, report: dict[str, Any], color: dict[str, tuple], box: tuple[int, int, int, int]) -> None:
    b = headline_batch(report)
    lat = {r["variant"]: r["p50"] for r in report["latency"] if r["graph"] == "pipeline" and r["batch"] == b}
    tasks = {v["id"]: v["task"]["score"] for v in report["variants"] if v.get("task")}
    if tasks:
        ys = tasks
        ylabel, ylog = f"accuracy ({next(iter(report['variants']))['task']['output']})", False
    else:
        ys = {v["id"]: max(v["parity"].get("pipeline", {}).get("max_rel", 0.0), 1e-9) for v in report["variants"]}
        ylabel, ylog = "max rel error vs eager (log)", True
    pts = [(lat[k], ys[k], k) for k in ys if k in lat and ys[k] is not None and math.isfinite(ys[k])]
    if not pts:
        c.text((box[0] + box[2]) / 2, (box[1] + box[3]) / 2, "no latency rows", GREY, anchor="center")
        return
    xlim = span([0.0] + [p[0] for p in pts], False)
    xlim = (0.0, xlim[1])
    ylim = span([p[1] for p in pts], ylog, pad=0.15)
    if tasks:  # an accuracy axis stops at 1 and shows at least a few points of range
        lo = min(ylim[0], min(p[1] for p in pts) - 0.02)
        ylim = (max(lo, 0.0), min(max(ylim[1], max(p[1] for p in pts) + 0.005), 1.0))
    ax = Axes(c, box, xlim, ylim, ylog=ylog)
    yt = log_ticks(*ylim) if ylog else nice_ticks(*ylim)
    ax.frame(f"pipeline latency vs {'accuracy' if tasks else 'parity'}, batch {b}", "p50 latency (ms)", ylabel,
             nice_ticks(*xlim), [t for t in yt if ylim[0] <= t <= ylim[1]])
    placed: list[tuple[float, float, int]] = []
    for x, y, k in sorted(pts, key=lambda p: (p[0], p[1])):
        px, py = ax.xy(x, y)
        c.disc(px, py, 8, color[k])
        label = k + (" (reference)" if k == "eager" else "")
        w = text_width(label)
        lx = px + 12 if px + 12 + w < box[2] + 60 else px - 12 - w
        ly = py - 18
        while any(abs(ly - qy) < 18 and lx < qx + qw and qx < lx + w for qx, qy, qw in placed):
            ly += 18  # stack labels of nearby points instead of overprinting them
        placed.append((lx, ly, w))
        c.text(lx, ly, label, color[k])


def _by_batch(c: Canvas, report: dict[str, Any], color: dict[str, tuple], box: tuple[int, int, int, int]) -> None:
    rows = [r for r in report["latency"] if r["graph"] == "pipeline"]
    batches = sorted({r["batch"] for r in rows})
    if not rows:
        return
    vals = [r["p50"] for r in rows]
    ylog = max(vals) / max(min(vals), 1e-9) > 20
    ylim = span(vals, ylog) if ylog else (0.0, span(vals, False)[1])
    xlog = len(batches) > 1 and batches[-1] / max(batches[0], 1) > 4
    xlim = span([max(b, 1) for b in batches], xlog, pad=0.06)
    ax = Axes(c, box, xlim, ylim, xlog=xlog, ylog=ylog)
    yt = log_ticks(*ylim) if ylog else nice_ticks(*ylim)
    ax.frame("pipeline p50 latency by batch size", "batch size", "p50 latency (ms" + (", log)" if ylog else ")"),
             [max(b, 1) for b in batches], [t for t in yt if ylim[0] <= t <= ylim[1]],
             [str(b) for b in batches])
    for vid in color:
        pts = sorted((r["batch"], r["p50"]) for r in rows if r["variant"] == vid)
        xy = [ax.xy(max(b, 1), y) for b, y in pts]
        for (x0, y0), (x1, y1) in zip(xy, xy[1:]):
            c.line(x0, y0, x1, y1, color[vid], 3)
        for x, y in xy:
            c.disc(x, y, 6, color[vid])
