"""Which backends can run here, the variants to bench, and opening a variant's runners: one per
component plus its whole-model callable.

Variants: eager, then per backend one per artifact precision (components without it at fp32) and one
per mixed policy that ``mmopt quantize`` judged and recorded (``results.policies``). On ONNX Runtime CPU
an fp16 graph is judged on its CPU emulation (ONNX Runtime would silently compute it in fp32, hiding
fp16's error) and timed as written.

``eager`` (CPU PyTorch) is always present: it is the parity reference and the latency baseline of
the CPU group. GPU backends (``eager-cuda``, ``onnxruntime-cuda``, ``tensorrt``) form their own group
with ``eager-cuda`` as baseline. A backend asked for by name that cannot run here is an error
(exit 2); one merely not available under the default ``auto`` is listed as skipped with the reason.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from mmopt.capture import Split
from mmopt.errors import BackendUnavailable, UsageError
from mmopt.manifest import Artifact, Manifest
from mmopt.runners.base import Runner
from mmopt.runners.eager import EagerRunner
from mmopt.runners.pipeline import Pipeline
from mmopt.spec import precision_rank
from mmopt.store import confine

BACKENDS = ("onnxruntime", "onnxruntime-cuda", "tensorrt", "eager-cuda")
ALIASES = {"ort": "onnxruntime", "ort-cpu": "onnxruntime", "onnxruntime-cpu": "onnxruntime", "cpu": "onnxruntime",
           "ort-cuda": "onnxruntime-cuda", "cuda": "onnxruntime-cuda", "trt": "tensorrt", "eager": "eager"}


def gpu_present() -> bool:
    if torch.cuda.is_available():
        return True
    return Path("/dev/nvidiactl").exists() and Path("/dev/nvidia0").exists()


def unavailable(backend: str, manifest: Manifest) -> str | None:
    """Why ``backend`` cannot run here with this bundle, or None when it can."""
    if backend == "onnxruntime":
        return None
    if backend == "eager-cuda":
        return None if torch.cuda.is_available() else "PyTorch sees no CUDA device"
    if backend == "onnxruntime-cuda":
        from mmopt.ort import available_devices

        if "cuda" not in available_devices():
            return "onnxruntime here has no CUDAExecutionProvider (install onnxruntime-gpu on a GPU machine)"
        return None if gpu_present() else "no NVIDIA GPU is visible"
    if backend == "tensorrt":
        try:
            import mmopt.runners.tensorrt  # noqa: F401
        except ModuleNotFoundError as e:
            return f"the TensorRT runner cannot be imported ({e.name} is not installed)"
        from mmopt_runtime.trt import api as trt_api
        from mmopt.trt.errors import TensorRTUnavailable

        try:
            trt_api.load()
        except TensorRTUnavailable as e:
            return getattr(e, "reason", None) or str(e).splitlines()[0]
        if not gpu_present():
            return "no NVIDIA GPU is visible"
        if not any(a.stage == "engine" for a in manifest.artifacts):
            return "the bundle has no TensorRT engines (build them on this GPU with `mmopt build`)"
        return None
    raise UsageError(f"unknown backend '{backend}'")


def resolve(requested: list[str] | None, manifest: Manifest) -> tuple[list[str], list[dict[str, str]]]:
    """(backends to run, [{backend, reason}] skipped). ``None`` / ``["auto"]`` = all that run here."""
    names = [ALIASES.get(b.lower(), b.lower()) for b in (requested or ["auto"])]
    if "auto" in names:
        run, skipped = [], []
        for b in BACKENDS:
            why = unavailable(b, manifest)
            (skipped.append({"backend": b, "reason": f"not available here: {why}"}) if why else run.append(b))
        return run, skipped
    unknown = [b for b in names if b not in BACKENDS and b != "eager"]
    if unknown:
        raise UsageError(f"--backend {', '.join(unknown)}: unknown. Choose from auto, eager, "
                         f"{', '.join(BACKENDS)} (aliases: {', '.join(sorted(ALIASES))}).")
    problems = [f"{b}: {why}" for b in dict.fromkeys(names) if b != "eager" and (why := unavailable(b, manifest))]
    if problems:
        raise BackendUnavailable("requested backend not available here:\n  " + "\n  ".join(problems)
                                 + "\nDrop it from --backend (or use --backend auto to skip what is missing).")
    return [b for b in dict.fromkeys(names) if b != "eager"], []


@dataclass
class Variant:
    """One thing benched: eager on a device, or one precision of the bundle on one backend."""

    id: str
    backend: str  # eager | onnxruntime | tensorrt
    device: str  # cpu | cuda
    precision: str
    artifacts: dict[str, Artifact] = field(default_factory=dict)

    @property
    def is_eager(self) -> bool:
        return self.backend == "eager"

    @property
    def precisions(self) -> dict[str, str]:
        return {c: a.precision for c, a in self.artifacts.items()}

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "backend": self.backend, "device": self.device, "precision": self.precision,
                "artifacts": {c: a.id for c, a in self.artifacts.items()},
                "precisions": self.precisions, "bytes": sum(a.bytes for a in self.artifacts.values())}


def variants(manifest: Manifest, backends: list[str]) -> list[Variant]:
    comps = list(manifest.components)
    out = [Variant("eager", "eager", "cpu", "fp32")]
    if "eager-cuda" in backends:
        out.append(Variant("eager-cuda", "eager", "cuda", "fp32"))
    for backend, device in (("onnxruntime", "cpu"), ("onnxruntime-cuda", "cuda"), ("tensorrt", "cuda")):
        if backend not in backends:
            continue
        stage = "engine" if backend == "tensorrt" else None
        pool = [a for a in manifest.artifacts if (a.stage == "engine") == (stage == "engine")]
        for prec in sorted({a.precision for a in pool}, key=precision_rank):
            # a component without this precision keeps its fp32 artifact
            chosen = {c: manifest.find(c, prec, stage) or manifest.find(c, "fp32", stage) for c in comps}
            if all(chosen.values()):
                out.append(Variant(f"{backend}/{prec}", backend.split("-")[0], device, prec, chosen))
        if backend == "tensorrt":
            continue
        for policy in manifest.results.get("policies", {}).values():  # mixed policies quantize judged
            if len({p for p in policy.values() if p != "fp32"}) < 2:
                continue  # one precision (the rest fp32) is that precision's variant above
            found = {c: manifest.find(c, policy.get(c, "fp32")) for c in comps}
            if all(found.values()):
                name = "+".join(f"{c}={p}" for c, p in policy.items() if p != "fp32")
                out.append(Variant(f"{backend}/{name}", backend.split("-")[0], device, "mixed", found))
    return out


@dataclass
class Opened:
    """A variant ready to run: component runners and ``whole(feeds)`` (the full model / pipeline) as timed,
    and ``judged`` / ``judged_whole``, what parity and the task score run (the fp16 CPU emulation where
    that differs, else the same runners)."""

    variant: Variant
    components: dict[str, Runner]
    whole: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
    whole_runner: Runner | None = None
    judged: dict[str, Runner] = field(default_factory=dict)
    judged_whole: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None

    def __post_init__(self) -> None:
        self.judged = self.judged or self.components
        self.judged_whole = self.judged_whole or self.whole


@contextlib.contextmanager
def open_variant(v: Variant, bundle: Path, model: torch.nn.Module, split: Split,
                 threads: int | None, scratch: Path) -> Iterator[Opened]:
    from mmopt.precision.convert import open_pipeline, pipeline_key
    from mmopt.judge.accuracy import eager_predictor
    from mmopt.stages.export import component_module

    with contextlib.ExitStack() as stack:
        comps: dict[str, Runner] = {}
        if v.is_eager:
            m = model if v.device == "cpu" else copy.deepcopy(model)
            full = stack.enter_context(EagerRunner(m, split.model_inputs, split.model_outputs, v.device,
                                                   name="model"))
            for c, cs in split.components.items():
                comps[c] = stack.enter_context(EagerRunner(component_module(model, split, c, "opt"), cs.inputs,
                                                           cs.outputs, v.device, positional=True, name=c))
            # the task score runs the one eager predictor (one thread, memoised with quantize's scores)
            judged = eager_predictor(model, split) if v.device == "cpu" else None
            yield Opened(v, comps, lambda feeds: full.infer(feeds, check=False), full, judged_whole=judged)
            return
        files = {c: confine(bundle, a.file, f"artifact '{a.id}' file") for c, a in v.artifacts.items()}
        for c, a in v.artifacts.items():
            cs = split.components[c]
            if v.backend == "onnxruntime":
                from mmopt.runners.onnxrt import OnnxRuntimeRunner

                # Idle ORT pool threads spin by default; interleaved with PyTorch (and with the other
                # components' pools) that steals the cores the next runner needs, so bench turns it off.
                spin = {"session.intra_op.allow_spinning": "0"} if (threads or 0) > 1 else {}
                r: Runner = OnnxRuntimeRunner(files[c], cs.inputs, cs.outputs, v.device, threads, name=c,
                                              config=spin)
            else:
                from mmopt.runners.tensorrt import TensorRTRunner

                r = TensorRTRunner(files[c], cs.inputs, cs.outputs, name=c, sidecar=a.extra or None)
            comps[c] = stack.enter_context(r)
        pipe = Pipeline(split.components, split.output_sources, comps)
        if v.backend == "onnxruntime":
            pipe.memo_key = pipeline_key(files, set(), v.device)  # type: ignore[attr-defined]
        if v.backend == "onnxruntime" and v.device == "cpu" and "fp16" in v.precisions.values():
            judged_pipe, judged = stack.enter_context(open_pipeline(split.components, split.output_sources, files,
                                                                    v.precisions, scratch))
            yield Opened(v, comps, pipe.infer, judged=judged, judged_whole=judged_pipe.infer)
            return
        yield Opened(v, comps, pipe.infer)
