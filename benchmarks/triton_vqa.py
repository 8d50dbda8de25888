"""The embedded VQA model served by a real Triton server vs the in-process pipeline: latency and throughput.

Writes benchmarks/results/triton_vqa.json. Run from the repository root (needs the triton extra and the Triton
venv: `bash .ci/triton-venv.sh`):
    python benchmarks/triton_vqa.py [--rounds 5] [--requests 200]

The fp32 bundle of mmopt/examples/vqa is exported, packaged and written by `mmopt triton --backend python`
(dynamic batching on: preferred sizes 8 / 32, no queue delay), then served by the tritonserver 2.51 of the
nvidia-pytriton wheel on 127.0.0.1 (CPU only; one instance per member, ONNX Runtime at one thread, as the
in-process pipeline). A driver in the Triton venv (its tritonclient, its numpy < 2) times, in interleaved
rounds with the starting mode rotating:
- in-process: mmopt_runtime's Package.infer on the same package's split graphs (the very graphs the members
  serve), from 1 caller and from 16 threads at once; and on its merged graph (the runtime's default), 1 caller;
- Triton: the ensemble over gRPC and HTTP from 1 client, and over gRPC from 16 concurrent clients (one client
  and one thread each), every request one real sample (batch 1) from the package's golden inputs; batch 8
  from 1 client as well.
Per mode and round: p50 / p99 of the per-request latency and throughput (samples / s of wall time). The JSON
holds the median over rounds of each and the median of the per-round ratios Triton / in-process, the server's
start and stop times, the members' executions per inference (dynamic batching at 16 clients) and memory.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "mmopt" / "examples" / "vqa" / "mmopt.toml"
CLIENTS = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=200, help="requests per mode and round")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "triton_vqa.json")
    parser.add_argument("--driver", nargs=5, metavar=("PACKAGE", "HTTP", "GRPC", "MODEL", "OUT"),
                        help=argparse.SUPPRESS)  # the timing side, run by the Triton venv's Python
    args = parser.parse_args()
    if args.driver:
        return drive(*args.driver, rounds=args.rounds, requests=args.requests)

    from mmopt import api
    from mmopt.provenance import machine, tool_versions
    from mmopt.triton import server

    wheel = server.find()
    results: dict = {"tools": tool_versions(), "machine": machine(), "config": str(CONFIG.relative_to(ROOT)),
                     "seconds": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        api.export(CONFIG, tmp / "bundle")
        results["seconds"]["export"] = round(time.perf_counter() - t, 1)
        pkg = api.package(tmp / "bundle", None, tmp / "pkg")
        t = time.perf_counter()
        repo = api.triton(pkg.folder, None, tmp / "repo", backend="python")
        results["seconds"]["mmopt triton (package given)"] = round(time.perf_counter() - t, 2)
        results["repository"] = {"ensemble": repo.plan.ensemble, "backend": "python",
                                 "max_batch_size": repo.plan.max_batch_size,
                                 "members": {c: {"model": m.name, "dynamic_batching": m.dynamic_batching,
                                                 "preferred_batch_size": m.config.get("dynamic_batching", {})
                                                 .get("preferred_batch_size")} for c, m in repo.plan.members.items()}}
        starts = []
        for _ in range(3):  # start -> ready, measured on its own: the servers below are timed, this is not
            s = server.start(repo.folder, tmp / "start", ready_timeout=120)
            starts.append((s.ready_s, s.stop()))
        results["server"] = {"tritonserver": "2.51 (nvidia-pytriton 0.7.0 wheel)", "stub_python": wheel.version,
                             "start_to_ready_s": [round(a, 3) for a, _ in starts],
                             "stop_s": [round(b, 3) for _, b in starts]}
        srv = server.start(repo.folder, tmp / "work", ready_timeout=120)
        try:
            out = tmp / "driver.json"
            r = subprocess.run([str(wheel.python), __file__, "--rounds", str(args.rounds), "--requests",
                                str(args.requests), "--driver", str(pkg.folder), srv.http_url, srv.grpc_url,
                                repo.plan.ensemble, str(out)], env={"PATH": "/usr/bin:/bin"}, timeout=3000)
            if r.returncode:
                raise SystemExit(f"the driver failed ({r.returncode}); server errors: {srv.errors()[-5:]}")
            results |= json.loads(out.read_text())
            results["server"]["rss_mb"] = _rss_mb(srv.proc.pid)
        finally:
            srv.stop()
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    for mode, row in results["modes"].items():
        ratio = results["ratios_vs_in_process"].get(mode, {})
        print(f"{mode:26s} p50 {row['p50_ms']:7.3f} ms  p99 {row['p99_ms']:7.3f} ms  {row['throughput']:8.1f}/s  "
              + "  ".join(f"{k} {v}" for k, v in ratio.items()))
    print(f"wrote {args.out}")


def _rss_mb(pid: int) -> dict:
    """Resident memory of the server and each of its python-backend stubs (one per member instance)."""
    procs = [pid] + [int(p) for p in (Path("/proc") / str(pid) / "task" / str(pid) / "children").read_text().split()]
    out = {}
    for p in procs:
        name = (Path("/proc") / str(p) / "comm").read_text().strip()
        rss = next(int(ln.split()[1]) for ln in (Path("/proc") / str(p) / "status").read_text().splitlines()
                   if ln.startswith("VmRSS"))
        out[f"{name}:{p}"] = round(rss / 1024, 1)
    out["total"] = round(sum(out.values()), 1)
    return out


# ---- the timing side: runs in the Triton venv -----------------------------------------------
def drive(package: str, http_url: str, grpc_url: str, model: str, out: str, rounds: int, requests: int) -> None:
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from mmopt.judge.latency import stats
    from mmopt.triton import client
    from mmopt_runtime import Package

    pkg = Package.load(package, merged=False)  # the split graphs: the very graphs the members serve
    merged = Package.load(package)  # the runtime's default where the package holds a merged graph
    with np.load(Path(package) / "golden.npz") as g:
        golden = {k[len("input/"):]: g[k] for k in g.files if k.startswith("input/")}
    rows = len(next(iter(golden.values())))
    samples = [{k: v[i:i + 1] for k, v in golden.items()} for i in range(rows)]
    batch8 = {k: np.concatenate([v] * (8 // rows + 1))[:8] for k, v in golden.items()}

    def sequential(call, feeds_of, n):
        lat, t0 = [], time.perf_counter_ns()
        for i in range(n):
            s = time.perf_counter_ns()
            call(feeds_of(i))
            lat.append(time.perf_counter_ns() - s)
        return lat, time.perf_counter_ns() - t0

    def concurrent(make_call, n):
        per = max(1, n // CLIENTS)
        lats: list[list[int]] = [[] for _ in range(CLIENTS)]
        calls = [make_call() for _ in range(CLIENTS)]  # a client per thread (made before the clock starts)
        go = threading.Barrier(CLIENTS + 1)

        def work(k):
            go.wait()
            for i in range(per):
                s = time.perf_counter_ns()
                calls[k](samples[(k + i) % rows])
                lats[k].append(time.perf_counter_ns() - s)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(CLIENTS)]
        for th in threads:
            th.start()
        go.wait()
        t0 = time.perf_counter_ns()
        for th in threads:
            th.join()
        return [x for lat in lats for x in lat], time.perf_counter_ns() - t0

    clients = {p: client.connect(u, p) for p, u in (("grpc", grpc_url), ("http", http_url))}

    def via(protocol, c=None):
        c = c or clients[protocol]
        return lambda feeds: client.infer(c, model, feeds)

    one = lambda i: samples[i % rows]  # noqa: E731
    modes = {
        "in-process, 1 caller": lambda: sequential(pkg.infer, one, requests),
        "in-process merged graph, 1 caller": lambda: sequential(merged.infer, one, requests),
        "triton gRPC, 1 client": lambda: sequential(via("grpc"), one, requests),
        "triton HTTP, 1 client": lambda: sequential(via("http"), one, requests),
        f"in-process, {CLIENTS} threads": lambda: concurrent(lambda: pkg.infer, requests * 2),
        f"triton gRPC, {CLIENTS} clients": lambda: concurrent(lambda: via("grpc", client.connect(grpc_url, "grpc")),
                                                              requests * 2),
        "in-process, 1 caller, batch 8": lambda: sequential(pkg.infer, lambda i: batch8, requests // 2),
        "triton gRPC, 1 client, batch 8": lambda: sequential(via("grpc"), lambda i: batch8, requests // 2),
    }
    batch = {m: 8 if "batch 8" in m else 1 for m in modes}
    for m, run in modes.items():  # warm-up: sessions, stubs, connections, the batcher
        run()
    members = [s["model_name"] for s in clients["grpc"].get_model_config(model, as_json=True)["config"]
               ["ensemble_scheduling"]["step"]]
    per_round: dict[str, list[dict]] = {m: [] for m in modes}
    names = list(modes)
    batching = {m: {"inferences": 0, "executions": 0} for m in members}
    for r in range(rounds):
        for m in names[r % len(names):] + names[:r % len(names)]:
            before = _counts(clients["grpc"], members) if m == f"triton gRPC, {CLIENTS} clients" else None
            lat, wall = modes[m]()
            st = stats(lat, batch[m])
            per_round[m].append({"p50_ms": st.p50, "p99_ms": st.p99, "throughput": len(lat) * batch[m] * 1e9 / wall,
                                 "requests": len(lat)})
            if before is not None:
                after = _counts(clients["grpc"], members)
                for k in members:
                    batching[k]["inferences"] += after[k][0] - before[k][0]
                    batching[k]["executions"] += after[k][1] - before[k][1]
    for c in clients.values():
        c.close()

    def med(m, key):
        return float(np.median([x[key] for x in per_round[m]]))

    pairs = {"triton gRPC, 1 client": "in-process, 1 caller", "triton HTTP, 1 client": "in-process, 1 caller",
             f"triton gRPC, {CLIENTS} clients": f"in-process, {CLIENTS} threads",
             "triton gRPC, 1 client, batch 8": "in-process, 1 caller, batch 8"}
    ratios = {m: {f"{k}_ratio": round(float(np.median([a[k] / b[k] for a, b in zip(per_round[m], per_round[ref])])), 3)
                  for k in ("p50_ms", "p99_ms", "throughput")} for m, ref in pairs.items()}
    result = {"rounds": rounds, "requests_per_round": {m: per_round[m][0]["requests"] for m in modes},
              "batch": batch, "clients": CLIENTS, "samples": f"{rows} golden inputs (easy-vqa evaluation split)",
              "driver": {"numpy": np.__version__, "python": sys.version.split()[0]},
              "modes": {m: {k: round(med(m, k), 4) for k in ("p50_ms", "p99_ms", "throughput")} for m in modes},
              "per_round": per_round, "ratios_vs_in_process": ratios,
              f"dynamic_batching_at_{CLIENTS}_clients": {
                  k: {**v, "mean_batch": round(v["inferences"] / max(v["executions"], 1), 2)} for k, v in batching.items()}}
    Path(out).write_text(json.dumps(result))


def _counts(grpc, members):
    stats = grpc.get_inference_statistics("", as_json=True)["model_stats"]
    return {s["name"]: (int(s.get("inference_count", 0)), int(s.get("execution_count", 0)))
            for s in stats if s["name"] in members}


if __name__ == "__main__":
    main()
