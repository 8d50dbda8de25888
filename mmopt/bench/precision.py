"""Precision variants of one bundle side by side: sizes, task accuracy, parity on real data, CPU latency.

A variant is a policy (component -> precision) whose artifacts are already in the bundle, or ``None``
for eager PyTorch. Accuracy and parity come from one pass over the evaluation data (every variant sees
the same samples; parity is against eager fp32's outputs). Latency is the recomposed pipeline on
ONNX Runtime CPU (intra-op threads as given) against eager PyTorch at the same thread count, all
variants timed in a shuffled, interleaved order, median per variant. fp16 graphs are scored on their
CPU emulation (ONNX Runtime would silently compute them in fp32) but timed as written.
"""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmopt.calibration import iterate
from mmopt.manifest import Manifest
from mmopt.judge.latency import median_ms
from mmopt.precision import artifact_file, open_pipeline, policy_label


def _files(bundle: Path, manifest: Manifest, policy: dict[str, str]) -> dict[str, Path]:
    return {c: manifest.file(Path(bundle), manifest.artifact(c, p)) for c, p in policy.items()}


def _sample(spec: Any, rows: int) -> dict[str, np.ndarray]:
    """The first ``rows`` evaluation (else calibration) inputs, batches joined when one is smaller."""
    parts, got = [], 0
    source = (spec.evaluation.source, "evaluation.source", True) if spec.evaluation else \
        (spec.calibration.source, "calibration.source", False)
    for inputs, _ in iterate(spec, *source):
        parts.append(inputs)
        got += len(next(iter(inputs.values())))
        if got >= rows:
            break
    return {k: np.concatenate([p[k] for p in parts])[:rows] for k in parts[0]}


def compare(bundle: str | Path, spec: Any, model: torch.nn.Module, split: Any,
            variants: dict[str, dict[str, str] | None], batches: tuple[int, ...] = (1, 32), rounds: int = 20,
            threads: int = 1, samples: int | None | str = "config") -> dict[str, Any]:
    """One row per variant: precision, bytes, accuracy, parity vs eager, latency and ratio vs eager."""
    from mmopt.judge import accuracy as ev

    bundle = Path(bundle)
    manifest = Manifest.read_verified(bundle)
    comps = list(split.components)
    rows: dict[str, dict[str, Any]] = {}
    for name, policy in variants.items():
        policy = None if policy is None else {c: policy.get(c, "fp32") for c in comps}
        row: dict[str, Any] = {"precision": policy or {c: "eager fp32" for c in comps}}
        if policy is not None:
            row["files"] = {c: artifact_file(c, p) for c, p in policy.items()}
            row["bytes"] = {c: manifest.artifact(c, p).bytes for c, p in policy.items()}
            row["total_bytes"] = sum(row["bytes"].values())
            row["policy"] = policy_label(policy)
        rows[name] = row
    old = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as scratch, contextlib.ExitStack() as stack:
        scored, timed = {}, {}
        for name, policy in variants.items():
            if policy is None:
                scored[name] = timed[name] = ev.eager_predictor(model, threads)
                continue
            policy = rows[name]["precision"]
            pipe, _ = stack.enter_context(open_pipeline(split.components, split.output_sources,
                                                        _files(bundle, manifest, policy), policy, Path(scratch)))
            scored[name] = pipe.infer
            if "fp16" in policy.values():
                real, _ = stack.enter_context(open_pipeline(split.components, split.output_sources,
                                                            _files(bundle, manifest, policy), policy, Path(scratch),
                                                            threads=threads, emulate_fp16=False))
                timed[name] = real.infer
            else:
                fast, _ = stack.enter_context(open_pipeline(split.components, split.output_sources,
                                                            _files(bundle, manifest, policy), policy, Path(scratch),
                                                            threads=threads))
                timed[name] = fast.infer
        eager_name = next((n for n, p in variants.items() if p is None), None)
        if spec.evaluation is not None:
            acc = ev.evaluate(spec, scored, samples=samples, parity_to=eager_name)
            for name in rows:
                rows[name]["accuracy"] = acc["scores"][name]
                if eager_name is not None:
                    rows[name]["parity_vs_eager"] = acc["parity"][name]
            evaluated = {k: acc[k] for k in ("metric", "source", "samples")}
        else:
            evaluated = None
        torch.set_num_threads(threads)
        try:
            for b in batches:
                feeds = _sample(spec, b)
                ms = median_ms({n: (lambda f=fn: f(feeds)) for n, fn in timed.items()}, rounds=rounds)
                for name in rows:
                    lat = rows[name].setdefault("latency_ms", {})
                    lat[str(b)] = round(ms[name], 4)
                    if eager_name is not None:
                        rows[name].setdefault("latency_vs_eager", {})[str(b)] = round(ms[name] / ms[eager_name], 3)
        finally:
            torch.set_num_threads(old)
    return {"variants": rows, "evaluation": evaluated,
            "latency": {"batches": list(batches), "threads": threads, "rounds": rounds,
                        "how": "median of shuffled interleaved repeats; pipeline = ONNX Runtime CPU per component"}}
