"""Pruning the embedded VQA model's image encoder: MACs, size, accuracy and CPU latency, before and after.

Writes benchmarks/results/prune_vqa.json. Run from the repository root (needs the prune extra):
    pip install -e '.[prune]' && python benchmarks/prune_vqa.py [--keep 0.3] [--steps 300] [--rounds 40]

`mmopt prune` (api.prune) keeps --keep of the image encoder's MACs with channels aligned to 8 and recovers
it by distillation on the training-split calibration data (no labels); the report's accuracy is the full
easy-vqa test split (9,673 questions) for the original, the pruned model before recovery and after it, on
the same batches. Both configs are then exported (parity of each graph against its own eager model) and
the image graphs compared: initializer shapes and bytes, file size, channel alignment. Latency: the image
encoder's ONNX graph, original vs pruned, fp32 and int8-cpu, ONNX Runtime CPU at one thread, batch 1 and
32, medians of interleaved rounds, ratios pruned / original from the same run. The pruned + int8-cpu
pipeline's accuracy comes from `mmopt quantize` (full test split).

Pipelines: both bundles are also converted to the demo's CPU int8 policy (int8-cpu image encoder, text and
fusion chosen by `auto`), and the whole recomposed pipelines (fp32, int8-cpu image, that mixed policy; original
and pruned) are timed together with eager PyTorch, all at one thread, interleaved, batch 1 and 32, so the
"fastest verified variant" claim is judged on the model users deploy, not on one graph.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VQA = ROOT / "mmopt" / "examples" / "vqa"


def image_graph(path: Path) -> dict:
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    init = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    out_channels = [int(init[n.input[1]].shape[0]) for n in convs if n.input[1] in init]
    return {"file_bytes": path.stat().st_size, "initializer_bytes": int(sum(a.nbytes for a in init.values())),
            "initializer_values": int(sum(a.size for a in init.values())), "conv_out_channels": out_channels}


def time_images(graphs: dict[str, Path], rounds: int) -> dict:
    from mmopt.judge import latency
    from mmopt.ort import session

    sessions = {k: session(str(p), threads=1) for k, p in graphs.items()}
    out = {}
    for batch in (1, 32):
        x = np.random.default_rng(0).uniform(-1, 1, (batch, 3, 64, 64)).astype(np.float32)
        calls = {k: (lambda s=s: s.run(None, {s.get_inputs()[0].name: x})) for k, s in sessions.items()}
        out[f"batch {batch}"] = {k: round(v, 4) for k, v in latency.median_ms(calls, rounds=rounds).items()}
    return out


def time_pipelines(bundles: dict[str, Path], policies: dict[str, dict[str, dict[str, str]]], model,
                   rounds: int) -> dict:
    """p50 ms of each bundle's pipeline per policy and of the eager model, interleaved, at one thread."""
    import contextlib

    import torch

    from mmopt.judge import latency
    from mmopt.manifest import Manifest
    from mmopt.precision.convert import open_pipeline
    from mmopt.reference import load

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    out = {}
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory() as scratch:
        pipes = {}
        for name, bundle in bundles.items():
            manifest = Manifest.read_verified(bundle)
            split = load(bundle, manifest).split
            for label, policy in policies[name].items():
                files = {c: bundle / manifest.artifact(c, p).file for c, p in policy.items()}
                pipe, _ = stack.enter_context(open_pipeline(split.components, split.output_sources, files, policy,
                                                            Path(scratch), threads=1))
                pipes[f"{name} {label}"] = pipe
        for batch in (1, 32):
            feeds = {"pixel_values": rng.uniform(-1, 1, (batch, 3, 64, 64)).astype(np.float32),
                     "input_ids": rng.integers(2, 28, (batch, 8)).astype(np.int64),
                     "attention_mask": np.ones((batch, 8), dtype=bool)}
            tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}
            calls = {k: (lambda p=p: p.infer(feeds)) for k, p in pipes.items()}

            def eager():
                with torch.inference_mode():
                    return model(**tensors)

            calls["eager original fp32"] = eager
            ms = latency.median_ms(calls, rounds=rounds)
            out[f"batch {batch}"] = {k: {"ms": round(v, 4), "vs eager": round(v / ms["eager original fp32"], 3)}
                                     for k, v in ms.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "prune_vqa.json")
    args = parser.parse_args()

    from mmopt import api
    from mmopt.provenance import tool_versions

    results: dict = {"tools": tool_versions(), "keep_macs": args.keep, "steps": args.steps, "seconds": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for f in ("mmopt.toml", "vqa.safetensors"):
            shutil.copy(VQA / f, tmp / f)
        t = time.perf_counter()
        pruned = api.prune(tmp / "mmopt.toml", {"image": args.keep}, tmp / "mmopt.pruned.toml", align=8,
                           steps=args.steps)
        results["seconds"]["prune + recovery + 2 scorings"] = round(time.perf_counter() - t, 1)
        report = {k: v for k, v in pruned.report.items() if k not in ("plan",)}
        for c in report["components"].values():
            c["history"] = len(c["history"])  # pruning steps recorded in the report file itself
        results["prune_report"] = report
        t = time.perf_counter()
        api.export(tmp / "mmopt.toml", tmp / "b0")
        api.export(pruned.config, tmp / "b1")
        results["seconds"]["two exports"] = round(time.perf_counter() - t, 1)
        results["image_graph"] = {"original": image_graph(tmp / "b0" / "image.onnx"),
                                  "pruned": image_graph(tmp / "b1" / "image.onnx")}
        results["aligned_to_8"] = all(c % 8 == 0 for c in results["image_graph"]["pruned"]["conv_out_channels"])
        q = {}
        for name in ("b0", "b1"):
            r = api.quantize(tmp / name, precision={"image": "int8-cpu"}, sensitivity=False)
            q[name] = r.accuracy["scores"][r.label] if r.accuracy else None
        results["int8_cpu_pipeline_accuracy"] = {"original": q["b0"], "pruned": q["b1"]}
        mixed = {"image": "int8-cpu", "text": "auto", "fusion": "auto"}  # the demo's CPU int8 policy
        policies, acc = {}, {}
        for name in ("b0", "b1"):
            r = api.quantize(tmp / name, precision=mixed, sensitivity=False)
            acc[name] = {"fp32": None, "image int8-cpu": q[name],
                         f"mixed {r.label}": r.accuracy["scores"][r.label] if r.accuracy else None}
            policies[name] = {"fp32": {c: "fp32" for c in r.policy}, "image int8-cpu":
                              {c: ("int8-cpu" if c == "image" else "fp32") for c in r.policy},
                              f"mixed {r.label}": dict(r.policy)}
        from mmopt.reference import load
        from mmopt.manifest import Manifest

        original = load(tmp / "b0", Manifest.read_verified(tmp / "b0")).model
        renamed = {"b0": "original", "b1": "pruned"}
        results["pipeline_accuracy"] = {renamed[k]: v for k, v in acc.items()}
        for name, key in (("original", "original"), ("pruned", "after_recovery")):  # eager = its fp32 graphs
            results["pipeline_accuracy"][name]["fp32"] = report["accuracy"][key]
        results["pipeline_latency"] = time_pipelines({renamed[k]: tmp / k for k in ("b0", "b1")},
                                                     {renamed[k]: v for k, v in policies.items()}, original,
                                                     args.rounds)
        graphs = {"original fp32": tmp / "b0" / "image.onnx", "pruned fp32": tmp / "b1" / "image.onnx",
                  "original int8-cpu": tmp / "b0" / "image.int8-cpu.onnx",
                  "pruned int8-cpu": tmp / "b1" / "image.int8-cpu.onnx"}
        ms = time_images(graphs, args.rounds)
        results["image_latency_ms"] = ms
        results["image_latency_ratio_pruned_vs_original"] = {
            b: {"fp32": round(v["pruned fp32"] / v["original fp32"], 3),
                "int8-cpu": round(v["pruned int8-cpu"] / v["original int8-cpu"], 3),
                "pruned int8-cpu vs original fp32": round(v["pruned int8-cpu"] / v["original fp32"], 3)}
            for b, v in ms.items()}
    acc = results["prune_report"]["accuracy"]
    results["accuracy_drop_points"] = round(100 * (acc["original"] - acc["after_recovery"]), 2)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({k: results[k] for k in ("accuracy_drop_points", "image_latency_ratio_pruned_vs_original",
                                              "int8_cpu_pipeline_accuracy", "aligned_to_8", "seconds",
                                              "pipeline_accuracy", "pipeline_latency")}, indent=1))


if __name__ == "__main__":
    main()
