"""Precision variants of the embedded VQA model: size, parity, full test-split accuracy, CPU latency.

Writes benchmarks/results/precision_vqa.json. Run from the repository root:
    python benchmarks/precision_vqa.py [--rounds 30]

Conversions (one bundle): fp16 everywhere, static int8 in TensorRT's form (everywhere, then the image
encoder's again alone: bench measures the bundle's int8 graphs, i.e. int8 everywhere), dynamic int8 on the text encoder and fusion head, and
the CPU int8 policy (image encoder int8-cpu, text encoder and fusion head chosen by `auto` on this CPU).
Every variant is measured by `mmopt bench` itself (api.bench, the code `mmopt demo` uses): one variant per
precision in the bundle and one per mixed policy quantize judged. Accuracy is over the whole easy-vqa test
split (9,673 questions) for every variant on the same batches; "vs_eager" is each variant's logits against
eager fp32 on those batches. Latency: the recomposed pipeline on ONNX Runtime CPU vs eager PyTorch, both at
one thread, batch 1 and 32, medians and paired ratios of interleaved repeats. fp16 is scored on its CPU
emulation and timed as written (ONNX Runtime computes it in fp32 on CPU: no speed-up expected).
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

    from mmopt.api import bench, export, quantize
    from mmopt.provenance import tool_versions

    results: dict = {"tools": tool_versions(), "config": str(CONFIG.relative_to(ROOT)), "seconds": {}}
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle"
        t = time.perf_counter()
        export(CONFIG, bundle)
        results["seconds"]["export"] = round(time.perf_counter() - t, 1)
        runs = {"fp16": {"image": "fp16", "text": "fp16", "fusion": "fp16"},
                "int8 all (TensorRT form)": {"image": "int8", "text": "int8", "fusion": "int8"},
                "int8 image (TensorRT form)": {"image": "int8"},
                "int8-dynamic (text, fusion)": {"text": "int8-dynamic", "fusion": "int8-dynamic"},
                "int8-cpu policy": {"image": "int8-cpu", "text": "auto", "fusion": "auto"}}
        conversions = {}
        for name, policy in runs.items():
            t = time.perf_counter()
            r = quantize(bundle, precision=policy, sensitivity=name == "int8-cpu policy")
            results["seconds"][f"quantize {name}"] = round(time.perf_counter() - t, 1)
            conversions[name] = {
                "policy": r.policy,
                "artifacts": {c: r.manifest.artifact(c, p).config for c, p in r.policy.items() if p != "fp32"},
                "accuracy_on_evaluation": r.accuracy["scores"].get(r.label) if r.accuracy else None}
            if name == "int8-cpu policy":
                results["policy_search"] = r.manifest.results.get("policy_search")
                results["sensitivity"] = r.sensitivity
        t = time.perf_counter()
        report = bench(bundle, None, backends=["onnxruntime"], batches=[1, 32], threads=1, repeats=args.rounds,
                       eval_samples=None, check=False).report
        results["seconds"]["bench"] = round(time.perf_counter() - t, 1)
        results["conversions"] = conversions
        results["variants"] = {}
        for v in report["variants"]:
            lat = {r["batch"]: r for r in report["latency"] if r["graph"] == "pipeline" and r["variant"] == v["id"]}
            results["variants"][v["id"]] = {
                "precisions": v.get("precisions"), "bytes": v.get("bytes"), "accuracy": v["task"]["score"],
                "vs_eager": v["task"].get("vs_eager", {"cos_min": 1.0, "max_abs": 0.0}), "parity": v["parity"], "failed": v["failed"],
                "latency_ms": {str(b): r["p50"] for b, r in lat.items()},
                "latency_vs_eager": {str(b): r["ratio_vs_eager"] for b, r in lat.items()},
                "latency_vs_eager_ci95": {str(b): r["ratio_ci95"] for b, r in lat.items()}}
        results["evaluation"] = {k: report["variants"][0]["task"][k] for k in ("metric", "output", "samples")}
        results["latency"] = {"batches": [1, 32], "threads": 1, "repeats": args.rounds, "how": "mmopt bench"}
        results["image_encoder_int8_forms"] = image_int8_forms(bundle, args.rounds * 2)
    fp32 = results["variants"]["onnxruntime/fp32"]["latency_ms"]
    for name, row in results["variants"].items():
        row["latency_vs_onnx_fp32"] = {b: round(ms / fp32[b], 3) for b, ms in row["latency_ms"].items()}
        print(f"{name:48s} acc {row['accuracy'] * 100:6.2f}%  cos {row['vs_eager']['cos_min']:.5f}  "
              f"b1 {row['latency_ms']['1']:7.3f} ms ({row['latency_vs_eager']['1']:.2f}x eager)  "
              f"b32 {row['latency_ms']['32']:7.3f} ms ({row['latency_vs_eager']['32']:.2f}x eager, "
              f"{row['latency_vs_onnx_fp32']['32']:.2f}x onnx fp32)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"wrote {args.out}")


def image_int8_forms(bundle: Path, rounds: int) -> dict:
    """The image encoder alone in each int8 form: fp32; mmopt's TensorRT-form Q/DQ (symmetric int8,
    inputs of Conv/Gemm only: ORT cannot fuse it); onnxruntime's quantizer with its usual CPU settings
    (uint8 activations, outputs quantized, every conv int8); and mmopt's int8-cpu (that, plus 7-bit
    weights and the RGB stem conv in fp32, placed so ORT keeps its pool fp32)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

    from mmopt.examples.vqa import data
    from mmopt.judge.latency import median_ms
    from mmopt.stages import graph, ranges

    fp32 = graph.named(onnx.load(str(bundle / "image.onnx")))
    name = fp32.graph.input[0].name
    feeds = [{name: b["pixel_values"]} for _, b in zip(range(8), data.calibration_batches())]
    floats = ranges.float_tensors(fp32)
    names = sorted({t for n in fp32.graph.node if n.op_type in ("Conv", "Gemm") for t in [*n.input, *n.output]
                    if t in floats})
    lo, hi = {n: 0.0 for n in names}, {n: 0.0 for n in names}
    sess = ranges.session(fp32, names)
    for f in feeds:
        got = ranges.run_all(sess, f)
        for n in names:
            lo[n], hi[n] = min(lo[n], float(got[n].min())), max(hi[n], float(got[n].max()))
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(fp32, f"{tmp}/fp32.onnx")
        save_tensors_data(TensorsData(CalibrationMethod.MinMax, {n: TensorData(lowest=np.float32(lo[n]),
                                                                              highest=np.float32(hi[n]))
                                                                for n in names}), f"{tmp}/cache.json")
        quantize_static(f"{tmp}/fp32.onnx", f"{tmp}/cpu.onnx", None, quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["Conv", "Gemm"], per_channel=False,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, calibration_cache_path=f"{tmp}/cache.json")
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
        graphs = {"fp32": f"{tmp}/fp32.onnx", "int8 TensorRT form (mmopt artifact)": str(bundle / "image.int8.onnx"),
                  "int8 onnxruntime quantizer CPU settings (u8, per-tensor, outputs quantized)": f"{tmp}/cpu.onnx",
                  "int8-cpu (mmopt artifact)": str(bundle / "image.int8-cpu.onnx")}
        sessions = {k: ort.InferenceSession(p, so, providers=["CPUExecutionProvider"]) for k, p in graphs.items()}
        x = feeds[0]
        out = {}
        for b in (1, 32):
            xb = {name: x[name][:b]}
            ms = median_ms({k: (lambda s=s: s.run(None, xb)) for k, s in sessions.items()}, rounds=rounds)
            out[str(b)] = {k: round(v, 4) for k, v in ms.items()}
    return {"latency_ms": out, "threads": 1, "note": image_int8_forms.__doc__.split("\n\n")[0].strip()}


if __name__ == "__main__":
    main()
