"""The deployment package of the embedded VQA model on ONNX Runtime CPU: merged vs split graphs, fp32 and the
best CPU policy, against one whole-model ONNX Runtime export of the same eager model; and the runtime's
import + load + self-test time as a whole process.

    python benchmarks/package_vqa.py [--rounds 200]

The bundle is exported and converted here (image=int8-cpu, and the demo's mixed policy: int8-cpu image, text
and fusion chosen by `auto`); each policy is packaged with `mmopt package`. The whole-model graph is the
eager model exported by torch's dynamo exporter and simplified with the same onnxsim pass the bundle's graphs
get (benchmarks/peers.py, whole_model_onnx). Every path runs at one thread, on the same real inputs (easy-vqa
test questions), timed interleaved in one process (mmopt.judge.latency); ratios are medians over rounds of
path / whole-model from the same round. Packages are timed through ``Package.infer``, input checks
included, as users call it. Writes benchmarks/results/package_vqa.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
CONFIG = ROOT / "mmopt" / "examples" / "vqa" / "mmopt.toml"
BATCHES = (1, 8, 32)


def feeds_at(batch: int) -> dict[str, np.ndarray]:
    """``batch`` real test questions (the evaluation reader), padded to one length."""
    from mmopt.data import read
    from mmopt.spec import load_spec

    spec = load_spec(CONFIG)
    for inputs, _ in read(spec, "evaluation", batch):
        if next(iter(inputs.values())).shape[0] >= batch:
            return {k: np.ascontiguousarray(v[:batch]) for k, v in inputs.items()}
    raise SystemExit(f"the evaluation data has no batch of {batch}")


def process_seconds(folder: Path, repeats: int = 5) -> dict:
    """``mmopt-run selftest`` as a whole process (interpreter start, import, verify, load, self-test)."""
    code = "import sys; from mmopt_runtime.cli import main; sys.exit(main(['selftest', sys.argv[1]]))"
    times, load_ms = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, check=True)
        times.append(time.perf_counter() - t)
        load_ms.append(json.loads(r.stdout)["load_ms"])
    return {"process_s_median": round(statistics.median(times), 3), "load_and_selftest_ms_median":
            round(statistics.median(load_ms), 1), "repeats": repeats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "package_vqa.json")
    args = parser.parse_args()

    from mmopt import api
    from mmopt.judge import latency
    from mmopt.provenance import machine, tool_versions
    from mmopt.reference import load
    from mmopt.manifest import Manifest
    from mmopt.precision.convert import policy_label
    from mmopt_runtime import Package
    from peers import session, whole_model_onnx

    results: dict = {"tools": tool_versions(), "machine": machine(), "threads": 1, "rounds": args.rounds}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bundle = api.export(CONFIG, tmp / "bundle").bundle
        image = api.quantize(bundle, precision={"image": "int8-cpu"}, sensitivity=False)
        mixed = api.quantize(bundle, precision={"image": "int8-cpu", "text": "auto", "fusion": "auto"},
                             sensitivity=False)
        policies = {"fp32": {}, "image int8-cpu": {"image": "int8-cpu"}, f"mixed {mixed.label}": dict(mixed.policy)}
        manifest = Manifest.read_verified(bundle)
        scores = dict((manifest.results.get("accuracy") or {}).get("scores") or {})
        for r in (image, mixed):  # each quantize run scores its own policy (the manifest keeps the last)
            scores.update((r.accuracy or {}).get("scores") or {})
        scores[policy_label({c: "fp32" for c in manifest.components})] = scores.get("onnx fp32")
        ref = load(bundle, manifest)
        whole = session(whole_model_onnx(ref.model, ref.split, tmp / "whole.onnx"), 1)
        whole_out = [o.name for o in whole.get_outputs()]
        pkgs, info = {}, {}
        for label, policy in policies.items():
            r = api.package(bundle, policy, tmp / f"pkg-{len(info)}")
            info[label] = {"policy": r.manifest["policy"], "merged": r.merged,
                           "accuracy": scores.get(policy_label(r.manifest["policy"]))}
            pkgs[f"{label} merged"] = Package.load(r.folder)
            pkgs[f"{label} split"] = Package.load(r.folder, merged=False)
            info[label]["runtime_process"] = process_seconds(r.folder)
        results["accuracy_scored"] = sorted(scores)
        results["policies"] = info
        results["batches"] = {}
        for batch in BATCHES:
            feeds = feeds_at(batch)
            want = dict(zip(whole_out, whole.run(None, feeds)))
            calls = {"whole-model ort": latency.Timed(lambda: whole.run(whole_out, feeds), batch)}
            for name, p in pkgs.items():
                got = p.infer(feeds)
                assert got.keys() == want.keys()
                calls[name] = latency.Timed(lambda p=p: p.infer(feeds), batch)
            samples = latency.interleaved(calls, args.rounds)
            results["batches"][str(batch)] = {
                name: {"p50_ms": round(latency.stats(s, batch).p50, 4),
                       "vs_whole_model": round(latency.paired_ratio(s, samples["whole-model ort"]), 3)}
                for name, s in samples.items()}
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({b: {k: v["vs_whole_model"] for k, v in r.items()} for b, r in results["batches"].items()},
                     indent=1))
    print(json.dumps({k: {"accuracy": v["accuracy"], **v["runtime_process"]} for k, v in info.items()}, indent=1))


if __name__ == "__main__":
    main()
