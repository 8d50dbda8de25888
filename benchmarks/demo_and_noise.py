"""Two measured targets of the one-home refactor, written to benchmarks/results/demo_and_noise.json:

1. `mmopt demo` from a clean shell: wall time of the whole command (export, three quantize runs, bench of
   every variant on the full test split), run as a user runs it, in a fresh process each time.
2. bench's latency gate on noise: the demo bundle benched twice in a row, the second run gated against
   the first as its baseline, while CPU-burning processes (one per core) load the machine during the second run. The
   default gate (`--gate-on ratio`: each variant's ratio to eager measured in the same run, failing only
   beyond the run's bootstrap spread) must pass; the raw p50 changes are recorded beside it, with what
   `--gate-on p50` would have said.

Run from the repository root: python benchmarks/demo_and_noise.py [--demo-runs 2]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _burn(stop: float) -> None:
    x = 0
    while time.time() < stop:
        x += 1


def demo_seconds(work: Path, runs: int) -> list[float]:
    out = []
    for i in range(runs):
        t = time.perf_counter()
        r = subprocess.run(["mmopt", "demo", "-o", str(work / f"demo{i}")], capture_output=True, text=True,
                           env={**os.environ, "COLUMNS": "160"})
        if r.returncode != 0:
            raise SystemExit(f"mmopt demo failed:\n{r.stdout}\n{r.stderr}")
        out.append(round(time.perf_counter() - t, 1))
    return out


def noise(bundle: Path, work: Path) -> dict:
    from mmopt.api import bench

    common = dict(backends=["onnxruntime"], batches=[1, 8, 32], repeats=30, check=False)
    first = bench(bundle, work / "first", **common).report
    stop = time.time() + 600
    burners = [mp.Process(target=_burn, args=(stop,), daemon=True) for _ in range(os.cpu_count() or 2)]
    for b in burners:  # every core busy for the whole second run: bench competes for each one
        b.start()
    try:
        r = bench(bundle, work / "second", baseline=work / "first" / "report.json", **common).report
    finally:
        for b in burners:
            b.terminate()
    gate_rows = [{k: x[k] for k in ("variant", "batch", "p50_change", "change", "ratio_ci95", "baseline_ratio_ci95",
                                    "regressed")} for x in r["baseline"]["rows"] if x["gated"]]
    by = {(x["variant"], x["batch"]): x for x in first["latency"] if x["graph"] == "pipeline"}
    raw = {f"{x['variant']} b{x['batch']}": round(x["p50"] / by[(x["variant"], x["batch"])]["p50"] - 1, 3)
           for x in r["latency"] if x["graph"] == "pipeline" and (x["variant"], x["batch"]) in by}
    ratio = {f"{x['variant']} b{x['batch']}": [by[(x["variant"], x["batch"])]["ratio_vs_eager"], x["ratio_vs_eager"]]
             for x in r["latency"] if x["graph"] == "pipeline" and (x["variant"], x["batch"]) in by}
    return {"gate_on_ratio_passed": r["gates"]["passed"], "failures": r["gates"]["failures"],
            "raw_p50_change_under_load": raw, "would_fail_at_10pct_on_raw_p50": sorted(k for k, v in raw.items() if v > 0.10),
            "ratio_vs_eager_first_then_loaded": ratio, "gate_rows": gate_rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-runs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "demo_and_noise.json")
    args = parser.parse_args()
    from mmopt.provenance import machine, tool_versions

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        seconds = demo_seconds(work, args.demo_runs)
        print(f"mmopt demo: {seconds} s")
        result = {"machine": machine(), "tools": tool_versions(), "demo_seconds": seconds,
                  "demo_seconds_median": sorted(seconds)[len(seconds) // 2], "noise": noise(work / "demo0", work)}
    n = result["noise"]
    print(f"bench twice, second under load: gate --gate-on ratio passed={n['gate_on_ratio_passed']}; raw p50 "
          f"beyond +10% on {len(n['would_fail_at_10pct_on_raw_p50'])} rows")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
