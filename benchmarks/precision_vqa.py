"""Precision variants of the embedded VQA model: size, parity, full test-split accuracy, CPU latency.

Writes benchmarks/results/precision_vqa.json. Run from the repository root:
    python benchmarks/precision_vqa.py [--rounds 30]

Variants (one bundle): eager PyTorch fp32, ONNX Runtime fp32, fp16 everywhere, the int8 policy (image
encoder static int8, text encoder and fusion head chosen by `auto` on this CPU), static int8 everywhere,
and dynamic int8 on the text encoder and fusion head. Accuracy is over the whole easy-vqa test split
(9,673 questions) for every variant on the same batches; parity is each variant's logits against eager
fp32 on those batches. Latency: the recomposed pipeline on ONNX Runtime CPU vs eager PyTorch, both at one
thread, batch 1 and 32, median of shuffled interleaved repeats. fp16 is scored on its CPU emulation and
timed as written (ONNX Runtime computes it in fp32 on CPU: no speed-up expected).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "mmopt" / "examples" / "vqa" / "mmopt.toml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "precision_vqa.json")
    args = parser.parse_args()

    from mmopt.api import export, quantize, tool_versions
    from mmopt.bench.precision import compare
    from mmopt.capture import split as capture_split
    from mmopt.checkpoint import build_model
    from mmopt.spec import load_spec

    results: dict = {"tools": tool_versions(), "config": str(CONFIG.relative_to(ROOT)), "seconds": {}}
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle"
        t = time.perf_counter()
        export(CONFIG, bundle)
        results["seconds"]["export"] = round(time.perf_counter() - t, 1)
        runs = {"fp16": {"image": "fp16", "text": "fp16", "fusion": "fp16"},
                "int8 all": {"image": "int8", "text": "int8", "fusion": "int8"},
                "int8-dynamic (text, fusion)": {"text": "int8-dynamic", "fusion": "int8-dynamic"},
                "int8 policy": {"image": "int8", "text": "auto", "fusion": "auto"}}
        policies, conversions = {}, {}
        for name, policy in runs.items():
            t = time.perf_counter()
            r = quantize(bundle, precision=policy, sensitivity=name == "int8 policy")
            results["seconds"][f"quantize {name}"] = round(time.perf_counter() - t, 1)
            policies[name] = r.policy
            conversions[name] = {
                "artifacts": {c: r.manifest.artifact(c, p).config for c, p in r.policy.items() if p != "fp32"},
                "accuracy_on_evaluation": r.accuracy["scores"].get(r.label) if r.accuracy else None}
            if name == "int8 policy":
                results["policy_search"] = r.manifest.results.get("policy_search")
                results["sensitivity"] = r.sensitivity
        spec = load_spec(CONFIG)
        model = build_model(spec)
        split = capture_split(model, spec)
        t = time.perf_counter()
        report = compare(bundle, spec, model, split,
                         {"eager fp32": None, "onnx fp32": {}, **policies}, batches=(1, 32),
                         rounds=args.rounds, threads=1, samples=None)
        results["seconds"]["compare"] = round(time.perf_counter() - t, 1)
        results.update(report)
        for name, conv in conversions.items():
            results["variants"][name]["conversion"] = conv
    fp32 = results["variants"]["onnx fp32"]["latency_ms"]
    for name, row in results["variants"].items():
        row["latency_vs_onnx_fp32"] = {b: round(ms / fp32[b], 3) for b, ms in row["latency_ms"].items()}
        acc = row.get("accuracy")
        print(f"{name:30s} acc {acc * 100:6.2f}%  cos {row.get('parity_vs_eager', {}).get('cos_min', 1):.5f}  "
              f"b1 {row['latency_ms']['1']:7.3f} ms ({row['latency_vs_eager']['1']:.2f}x eager)  "
              f"b32 {row['latency_ms']['32']:7.3f} ms ({row['latency_vs_eager']['32']:.2f}x eager, "
              f"{row['latency_vs_onnx_fp32']['32']:.2f}x onnx fp32)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
