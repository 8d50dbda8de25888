"""Render a bench report: JSON (the record), Markdown (a CI step summary) and a PNG. Computes nothing:
every figure comes from the report dict that ``mmopt.jobs.bench`` (with ``mmopt.bench.gates``) built.

Files are written atomically (temporary name, then rename), so a CI step never reads half a report.
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

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
    """The report for a CI step summary: one section per part, in the order a reader checks them."""
    out = _md_header(report) + _md_parity(report) + _md_task(report) + _md_latency(report) + _md_memory(report)
    if report.get("baseline"):
        out += _md_baseline(report)
    if png_name:
        out.append(f"\n![latency vs parity and by batch size]({png_name})\n")
    return "\n".join(out) + "\n"


def _md_header(report: dict[str, Any]) -> list[str]:
    gates = report.get("gates", {"passed": None, "failures": []})
    verdict = {True: "passed", False: "FAILED", None: "not evaluated"}[gates["passed"]]
    s, m = report["settings"], report["machine"]
    gpu = m["gpu"]["name"] if m.get("gpu") else "no GPU"
    out = [f"## mmopt bench: gates {verdict}\n",
           f"Bundle `{report['bundle']['path']}` ({report['bundle']['factory']}, fingerprint "
           f"`{report['bundle']['fingerprint']}`) on {m['cpus']} CPUs, {gpu}; {s['threads']} thread(s), "
           f"{s['repeats']} interleaved repeats after {s['warmup']} warm-up, {s['inputs']} inputs.\n"]
    out += [f"- skipped **{sk['backend']}**: {sk['reason']}" for sk in report.get("skipped", [])]
    out += [f"- note: {note}" for note in report.get("notes", [])]
    if gates["failures"]:
        out.append("\n### Gate failures\n")
        out += [f"- {f}" for f in gates["failures"]]
    return out


def _md_parity(report: dict[str, Any]) -> list[str]:
    rows = []
    for v in report["variants"]:
        for graph, p in v["parity"].items():
            rows.append([v["id"], graph, str(p["outputs"]), _f(p["cos_min"], ".6f"), _f(p["max_abs"], ".2e"),
                         _f(p["max_rel"], ".2e"), _f(p["argmax"]), "pass" if not p["failed"] else
                         f"**{p['failed']} failed**"])
    return ["\n### Parity vs eager PyTorch (worst over min/opt/max shapes and outputs)\n",
            _table(["variant", "graph", "outputs", "cos min", "max abs", "max rel", "argmax", "status"], rows)
            if rows else "Only eager ran: nothing to compare.\n"]


def _md_task(report: dict[str, Any]) -> list[str]:
    tasks = [v for v in report["variants"] if v.get("task")]
    if not tasks:
        return []
    ref, t0 = tasks[0]["task"]["score"], tasks[0]["task"]
    return [f"\n### Task score ({t0['metric']} of `{t0['output']}`, {t0['samples']} samples)\n",
            _table(["variant", "score", "vs eager"],
                   [[v["id"], _f(v["task"]["score"], ".4f"), _f(v["task"]["score"] - ref, "+.4f")] for v in tasks])]


def _md_latency(report: dict[str, Any]) -> list[str]:
    lat = report["latency"]
    pipe = [r for r in lat if r["graph"] == "pipeline"]
    has_h2d = any("h2d_ms" in r for r in pipe)
    out = ["\n### Pipeline latency (ms per call; ratio = paired median vs eager on the same device)\n",
           _table(["variant", "batch", "p50", "p90", "p99", "mean", "std", "samples/s", "vs eager"]
                  + (["h2d p50"] if has_h2d else []),
                  [[r["variant"], str(r["batch"]), _f(r["p50"]), _f(r["p90"]), _f(r["p99"]), _f(r["mean"]),
                    _f(r["std"]), _f(r["throughput"], ".0f"), _f(r["ratio_vs_eager"], ".2f") + "x"]
                   + ([_f(r.get("h2d_ms"))] if has_h2d else []) for r in pipe])]
    b = headline_batch(report)
    comp = [r for r in lat if r["graph"] != "pipeline" and r["batch"] == b]
    if comp:
        out.append(f"\n### Component latency at batch {b} (ms)\n")
        out.append(_table(["variant", "component", "p50", "p90", "p99", "std", "vs eager"],
                          [[r["variant"], r["graph"], _f(r["p50"]), _f(r["p90"]), _f(r["p99"]), _f(r["std"]),
                            _f(r["ratio_vs_eager"], ".2f") + "x"] for r in comp]))
    return out


def _md_memory(report: dict[str, Any]) -> list[str]:
    mem = report.get("memory", {})
    return [f"\n### Memory\n\nProcess peak RSS {_f(mem.get('rss_peak_mb'), '.0f')} MB"
            + (f", GPU peak allocated (torch) {_f(mem.get('gpu_peak_allocated_mb'), '.0f')} MB"
               if "gpu_peak_allocated_mb" in mem else "") + ". Per variant, growth on loading:\n",
            _table(["variant", "host RSS +MB", "GPU +MB"],
                   [[v["id"], _f(v["memory"].get("host_rss_delta_mb"), ".1f"),
                     _f(v["memory"].get("gpu_used_delta_mb"), ".1f")] for v in report["variants"]])]


def _md_baseline(report: dict[str, Any]) -> list[str]:
    base, s = report["baseline"], report["settings"]
    gate = ("pipeline p50 within" if base.get("gate_on") == "p50" else
            "each variant's pipeline ratio to eager, beyond this run's 95% spread, within")
    out = [f"\n### Against baseline `{base['path']}` ({base['created']}; gate: {gate} "
           f"+{base['max_latency_regression']:.0%})\n"]
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
    return out


# ---- PNG -----------------------------------------------------------------------------------

def png_bytes(report: dict[str, Any]) -> bytes:
    """Left: pipeline latency vs accuracy (or parity error) per variant. Right: latency by batch size.
    Drawn with matplotlib's Agg canvas (no pyplot, no global backend); one legend names the variants, so
    no label is ever printed over another."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 6.5), dpi=100)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    ids = [v["id"] for v in report["variants"]]
    cycle = [f"C{i}" for i in range(10)]
    color = {vid: cycle[i % len(cycle)] for i, vid in enumerate(ids)}
    _scatter(left, report, color)
    _by_batch(right, report, color)
    gates = report.get("gates", {}).get("passed")
    fig.suptitle(f"mmopt bench: {report['bundle']['factory']}  ({report['settings']['threads']} thread(s); "
                 f"gates {'passed' if gates else 'FAILED' if gates is False else 'not evaluated'})", fontsize=15)
    handles = [right.plot([], [], "o-", color=color[v], label=v + (" (reference)" if v == "eager" else ""))[0]
               for v in ids]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(ids), 4), frameon=False, fontsize=11)
    rows = -(-len(ids) // 4)
    fig.tight_layout(rect=(0, 0.06 + 0.04 * rows, 1, 0.95))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _scatter(ax: Any, report: dict[str, Any], color: dict[str, str]) -> None:
    b = headline_batch(report)
    lat = {r["variant"]: r["p50"] for r in report["latency"] if r["graph"] == "pipeline" and r["batch"] == b}
    tasks = {v["id"]: v["task"]["score"] for v in report["variants"] if v.get("task")}
    if tasks:
        ys = tasks
        ylabel = f"accuracy ({next(iter(report['variants']))['task']['output']})"
    else:
        ys = {v["id"]: max(v["parity"].get("pipeline", {}).get("max_rel", 0.0), 1e-9) for v in report["variants"]}
        ylabel = "max rel error vs eager"
        ax.set_yscale("log")
    pts = [(lat[k], ys[k], k) for k in ys if k in lat and ys[k] is not None and math.isfinite(ys[k])]
    ax.set_title(f"pipeline latency vs {'accuracy' if tasks else 'parity'}, batch {b}")
    ax.set_xlabel("p50 latency (ms)")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if not pts:
        ax.text(0.5, 0.5, "no latency rows", ha="center", va="center", transform=ax.transAxes, color="grey")
        return
    for x, y, k in pts:
        ax.scatter([x], [y], s=90, color=color[k], zorder=3, edgecolors="white", linewidths=0.8)
    ax.set_xlim(left=0, right=max(p[0] for p in pts) * 1.15)
    if tasks:  # an accuracy axis stops at 1 and shows at least a few points of range
        lo, hi = min(p[1] for p in pts), max(p[1] for p in pts)
        ax.set_ylim(max(0.0, lo - max(0.02, (hi - lo) * 0.3)), min(1.0, hi + 0.005) if hi < 1 else 1.002)


def _by_batch(ax: Any, report: dict[str, Any], color: dict[str, str]) -> None:
    rows = [r for r in report["latency"] if r["graph"] == "pipeline"]
    ax.set_title("pipeline p50 latency by batch size")
    ax.set_xlabel("batch size")
    ax.grid(True, alpha=0.3, which="both")
    if not rows:
        return
    batches = sorted({max(r["batch"], 1) for r in rows})
    vals = [r["p50"] for r in rows]
    ylog = max(vals) / max(min(vals), 1e-9) > 20
    ax.set_ylabel("p50 latency (ms" + (", log)" if ylog else ")"))
    if ylog:
        from matplotlib.ticker import FuncFormatter

        ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")  # 0.5, 2, 10 rather than 5x10^-1
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
    if len(batches) > 1 and batches[-1] / batches[0] > 4:
        ax.set_xscale("log", base=2)
    for vid in color:
        pts = sorted((max(r["batch"], 1), r["p50"]) for r in rows if r["variant"] == vid)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color[vid], linewidth=2.2, markersize=6)
    ax.set_xticks(batches)
    ax.set_xticklabels([str(b) for b in batches])
    if not ylog:
        ax.set_ylim(bottom=0)
