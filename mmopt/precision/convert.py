"""Converting one component to a precision, running the converted graphs, and judging a policy's pipeline:
what the quantize job (``mmopt.jobs.quantize``) and the ``auto`` search (``mmopt.precision.search``) both use.

A policy maps every component to a precision. Its pipeline runs on ONNX Runtime CPU, fp16 graphs as
their CPU emulation (ONNX Runtime would silently compute fp16 in fp32), and is judged against eager
PyTorch on random inputs at min / opt / max and on real calibration batches, by the one gate rule.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import onnx

from mmopt import calibration
from mmopt.errors import ConfigError, Unconvertible, describe
from mmopt.judge.compare import Check
from mmopt.judge.parity import REAL_BATCHES, VERIFY_SEED, scores_of, verify, verify_real
from mmopt.manifest import external_data, sha256_file
from mmopt.reference import eager_io
from mmopt.runners.onnxrt import OnnxRuntimeRunner
from mmopt.runners.pipeline import Pipeline
from mmopt.spec import ModelSpec
from mmopt.stages import fp16 as fp16_stage, graph
from mmopt.stages import int8 as int8_stage
from mmopt.stages.export import save

STATIC = {"int8", "int8-cpu"}  # calibrated Q/DQ forms


def artifact_file(component: str, precision: str) -> str:
    return f"{component}.onnx" if precision == "fp32" else f"{component}.{precision}.onnx"


def policy_label(policy: dict[str, str]) -> str:
    return " ".join(f"{c}={p}" for c, p in policy.items())


def parity_key(policy: dict[str, str]) -> str:
    used = {p for p in policy.values() if p != "fp32"}
    return used.pop() if len(used) == 1 else "mixed"


def pipeline_key(files: dict[str, Path], emulated: set[str], device: str = "cpu") -> tuple:
    """What identifies a pipeline's outputs for ``judge.accuracy``'s memo: its graphs' sha256 (and their
    external data), which components run as the fp16 CPU emulation, and the device."""
    key = []
    for comp, path in files.items():
        data = external_data(path)
        key.append((comp, sha256_file(path), sha256_file(data) if data.exists() else None, comp in emulated))
    return ("onnx", device, tuple(sorted(key)))


class CheckingRunner(OnnxRuntimeRunner):
    """ONNX Runtime CPU for parity and accuracy runs, interleaved with eager PyTorch in one process:
    one thread unless told, and no spinning workers (they starved PyTorch's threads ~10x on 2 cores)."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("config", {"session.intra_op.allow_spinning": "0"})
        kwargs["threads"] = kwargs.get("threads") or 1  # robust on a shared machine, like the eager reference
        super().__init__(*args, **kwargs)


class EmulatedFp16Runner(CheckingRunner):
    """Runs ``fp16_stage.emulate(graph)``. ORT's ENABLE_ALL level crashes on some of these graphs
    (segfault in session creation, onnxruntime 1.32); EXTENDED keeps every cast and is safe."""

    level = "ORT_ENABLE_EXTENDED"


@contextlib.contextmanager
def open_pipeline(split_components: dict, output_sources: dict[str, str], files: dict[str, Path],
                  policy: dict[str, str], scratch: Path, threads: int | None = None,
                  emulate_fp16: bool = True) -> Iterator[tuple[Pipeline, dict[str, OnnxRuntimeRunner]]]:
    """Runners for ``files`` (fp16 graphs as their CPU emulation unless told otherwise) and their pipeline.
    The pipeline's ``memo_key`` (its graphs' sha256 and how fp16 runs) lets ``judge.accuracy`` score the
    same graphs once per process."""
    with contextlib.ExitStack() as stack:
        runners = {}
        emulated = {c for c in files if policy.get(c) == "fp16" and emulate_fp16}
        for comp, path in files.items():
            cls = OnnxRuntimeRunner if threads else CheckingRunner  # given threads: timed as users run it
            if comp in emulated:
                emu = Path(scratch) / f"{comp}.fp16.emulated.onnx"
                if not emu.exists():
                    save(fp16_stage.emulate(onnx.load(str(path))), emu)
                path, cls = emu, EmulatedFp16Runner
            spec = split_components[comp]
            runners[comp] = stack.enter_context(cls(path, spec.inputs, spec.outputs, name=comp, threads=threads))
        pipe = Pipeline(split_components, output_sources, runners)
        pipe.memo_key = pipeline_key(files, emulated)  # type: ignore[attr-defined]
        yield pipe, runners


def judge(model: Any, spec: ModelSpec, split: Any, runners: dict, policy: dict[str, str],
          cal: calibration.CalibrationData | None) -> list[Check]:
    """Parity per component and for the pipeline: random inputs at min / opt / max, then real batches."""
    checks = verify(model, spec, split, runners, policy)
    if cal is not None:
        checks += verify_real(model, spec, split, runners, policy, cal.batches[:REAL_BATCHES])
    return checks


def _cases(model: Any, spec: ModelSpec, split: Any, comp: str, cal: calibration.CalibrationData | None):
    """(feeds, eager refs) of ``comp``: random at the three sizes, plus real calibration batches."""
    cases = [eager_io(model, spec, split, size, VERIFY_SEED + 100 + i)[2][comp]
             for i, size in enumerate(("min", "opt", "max"))]
    if cal is not None:
        cases += cal.feeds[comp][:REAL_BATCHES]
    return cases


def convert_component(comp: str, precision: str, proto: onnx.ModelProto, model: Any, spec: ModelSpec,
                      split: Any, cal: calibration.CalibrationData | None) -> tuple[onnx.ModelProto, dict, dict]:
    """One component to ``precision``: (graph, manifest config, fp32 islands). ``Unconvertible`` when this
    graph cannot take ``precision`` (the caller keeps it at fp32, or ``auto`` skips the candidate)."""
    held = graph.subgraph_nodes(proto)
    if held:
        ops = ", ".join(sorted({f"{n.op_type} ('{n.name}')" for n in held})[:3])
        raise Unconvertible(f"{comp}: {precision} cannot convert a graph holding subgraphs ({ops}; e.g. "
                            "nn.EmbeddingBag exports as a Loop), so it stays fp32")
    try:
        return _convert(comp, precision, proto, model, spec, split, cal)
    except refusals() as e:  # ONNX Runtime or onnx refused the converted graph; mmopt's own bugs propagate
        raise Unconvertible(f"{comp}: {precision} conversion failed ({describe(e)}), so it stays fp32") from e


def refusals() -> tuple[type[BaseException], ...]:
    """What ONNX Runtime and onnx raise when a graph is invalid for them."""
    import onnxruntime.capi.onnxruntime_pybind11_state as ort_errors

    names = ("Fail", "InvalidArgument", "InvalidGraph", "NotImplemented", "RuntimeException", "EPFail")
    return (onnx.checker.ValidationError, onnx.shape_inference.InferenceError,
            *(getattr(ort_errors, n) for n in names if hasattr(ort_errors, n)))


def _convert(comp: str, precision: str, proto: onnx.ModelProto, model: Any, spec: ModelSpec,
             split: Any, cal: calibration.CalibrationData | None) -> tuple[onnx.ModelProto, dict, dict]:
    exclude = spec.exclude.get(comp, ())
    if exclude:
        int8_stage.check_exclude(proto, exclude, comp, spec.path)
    if precision == "fp16":
        cases = _cases(model, spec, split, comp, cal)
        stats = [f for f, _ in cases] + ([f for f, _ in cal.feeds[comp]] if cal else [])
        res = fp16_stage.to_fp16(proto, stats, cases, spec.tolerances["fp16"], comp,
                                 scores=scores_of(spec, split, comp))
        ops = {n.name: n.op_type for n in res.proto.graph.node}
        islands = {n: f"{ops.get(n, '?')}: {why}" for n, why in res.islands.items()}
        config = {"converter": "onnxruntime.transformers.float16 (keep_io_types) + joined fp32 islands",
                  "range_samples": cal.samples if cal else "random inputs (no [calibration])",
                  "fp32_islands": islands, "parity_rounds": res.rounds}
        return res.proto, config, islands
    if precision in STATIC:
        if cal is None:
            raise ConfigError(f"{spec.path}: {comp} = \"{precision}\" needs a [calibration] table naming real data.")
        res = int8_stage.quantize_static_qdq(proto, [f for f, _ in cal.feeds[comp]], spec.calibration.method,
                                             exclude, cal.samples,
                                             form="cpu" if precision == "int8-cpu" else "tensorrt")
        _require_quantized(comp, precision, res.config)
        return res.proto, {**res.config, "calibration_source": cal.source}, {}
    res = int8_stage.quantize_dynamic_int8(proto, exclude)
    _require_quantized(comp, precision, res.config)
    return res.proto, res.config, {}


def _require_quantized(comp: str, precision: str, config: dict) -> None:
    """A graph with nothing int8 in it is no int8 artifact: it is not written or benched under that name."""
    if not config.get("quantized_nodes"):
        what = {"int8-dynamic": "int8-dynamic quantizes MatMul / Gemm only (convolutions need int8 or int8-cpu "
                                "with [calibration])",
                "int8-cpu": "int8-cpu quantizes Conv / MatMul / Gemm, keeping <= 4-channel stem convolutions "
                            "in fp32",
                "int8": "int8 quantizes the inputs of Conv / MatMul / Gemm"}[precision]
        raise Unconvertible(f"{comp}: {precision} found nothing to quantize ({what}; none here outside "
                            "[precision.exclude]), so it stays fp32")


class Converter:
    """``get(comp, precision)``: the converted graph of a component (graph, manifest config, fp32 islands),
    converted once per run from its fp32 parent however often the policy and the search ask."""

    def __init__(self, fp32_files: dict[str, Path], model: Any, spec: ModelSpec, split: Any,
                 cal: calibration.CalibrationData | None):
        self.fp32_files, self.model, self.spec, self.split, self.cal = fp32_files, model, spec, split, cal
        self._done: dict[tuple[str, str], tuple] = {}

    def get(self, comp: str, precision: str) -> tuple[onnx.ModelProto, dict, dict]:
        if (comp, precision) not in self._done:
            parent = onnx.load(str(self.fp32_files[comp]))
            self._done[(comp, precision)] = convert_component(comp, precision, parent, self.model, self.spec,
                                                              self.split, self.cal)
        return self._done[(comp, precision)]

