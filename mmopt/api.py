"""What the CLI calls, and what a script imports: one function per command. Wiring only: each job is
``mmopt.jobs.<command>``. The API never imports the CLI."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mmopt.jobs.bench import BenchResult, bench as bench_job, settings_from
from mmopt.jobs.export import ExportResult, export as export_job
from mmopt.jobs.quantize import QuantizeResult, quantize as quantize_job
from mmopt.manifest import Artifact, Manifest
from mmopt.progress import Progress

__all__ = ["BenchResult", "ExportResult", "QuantizeResult", "bench", "build", "export", "inspect_bundle",
           "preflight", "quantize", "verify_bundle"]


def export(config: str | Path, out_dir: str | Path, trust_checkpoint: bool = False,
           progress: Progress | None = None) -> ExportResult:
    """mmopt.toml -> a verified bundle of one ONNX graph per component, written atomically (and converted
    by the config's [precision] table, in the same transaction, when it has one)."""
    return export_job(config, out_dir, trust_checkpoint, progress)


def prune(config: str | Path, targets: dict[str, float], out: str | Path, align: int = 8, steps: int = 300,
          trust_checkpoint: bool = False, progress: Progress | None = None, target: str = "macs",
          sparse_2_4: bool = False) -> Any:
    """Structurally prune components (channels, whole attention heads) to a share of their MACs or, with
    ``target="latency"``, of their exported graph's latency; optionally 2:4 sparse; recover by distillation on
    [calibration] data; write a pruned config beside ``config`` (with its weights and a JSON report): see
    mmopt.jobs.prune. Needs the ``prune`` extra (Torch-Pruning)."""
    from mmopt.jobs.prune import prune as prune_job

    return prune_job(config, targets, out, align, steps, trust_checkpoint, progress, target, sparse_2_4)


def package(bundle: str | Path, policy: dict[str, str] | None, out: str | Path, config: str | Path | None = None,
            trust_checkpoint: bool = False, progress: Progress | None = None,
            sign_key: str | Path | None = None, engine_bundles: list[str | Path] = ()) -> Any:
    """One policy of ``bundle`` (component -> precision; fp32 where missing) as a deployment package for the
    torch-free runtime (``mmopt-run``): graphs, TensorRT engine sets (the bundle's, and those of copies of it
    built on other devices: ``engine_bundles``), golden samples, hashes, lineage; self-tested before it is
    written; signed with ``sign_key`` (a PEM elliptic-curve private key) where given. See mmopt.jobs.package."""
    from mmopt.jobs.package import package as package_job

    return package_job(bundle, policy, out, config, trust_checkpoint, progress, sign_key, engine_bundles)


def triton(source: str | Path, policy: dict[str, str] | None, out: str | Path, **options: Any) -> Any:
    """A package (or a bundle, packaged first) as an NVIDIA Triton model repository: one model per component
    and an ensemble wired like the pipeline, validated with Triton's schema before it is written atomically.
    ``options``: backend ("native" | "python"), name, batching, instances, kind ("gpu" | "cpu"),
    queue_delay_us, config, trust_checkpoint, public_key (a signed package's), progress. Needs the ``triton``
    extra. See mmopt.jobs.triton."""
    from mmopt.jobs.triton import triton as triton_job

    return triton_job(source, policy, out, **options)


def check_triton(repo: str | Path) -> Any:
    """A Triton model repository (mmopt's, or edited by hand) checked with Triton's schema and meaning:
    ``TritonRepositoryError`` lists every problem. Needs the ``triton`` extra."""
    from mmopt.jobs.triton import check

    return check(repo)


def quantize(bundle: str | Path, config: str | Path | None = None, progress: Progress | None = None,
             precision: dict[str, str] | None = None, trust_checkpoint: bool = False,
             sensitivity: bool = True) -> QuantizeResult:
    """Convert an exported bundle's components to the [precision] policy (fp16 / int8 / int8-cpu / int8-dynamic).

    ``config`` defaults to the mmopt.toml the bundle was exported from (recorded in its manifest);
    ``precision`` overrides the config's [precision] table (component -> precision). Writes
    ``<component>.<precision>.onnx`` beside the fp32 graphs, checked against eager PyTorch and, with an
    [evaluation] table, scored on the task. A failure leaves the bundle exactly as it was.
    """
    from mmopt import reference

    # A tampered bundle fails here, before minutes of model building; the stage re-checks under the lock.
    ref = reference.load(bundle, Manifest.read_verified(bundle), config, trust_checkpoint)
    return quantize_job(bundle, ref.spec, ref.model, ref.split, precision, progress or Progress(), sensitivity)


def bench(bundle: str | Path, out: str | Path | None = "bench-report", *, baseline: str | Path | None = None,
          config: str | Path | None = None, check: bool = True, progress: Progress | None = None,
          trust_checkpoint: bool = False, **settings: Any) -> BenchResult:
    """Parity, task score, latency and memory of eager PyTorch and every artifact of ``bundle`` on every
    backend here; optional comparison with a ``baseline`` report. Writes report.json / .md / .png into
    ``out`` and, with ``check``, raises ``GateError`` after writing when a gate fails. ``settings`` are
    the fields of ``mmopt.jobs.bench.BenchSettings`` (backends, batches, threads, repeats, warmup, inputs,
    eval_samples, budget_s, max_latency_regression, gate_on)."""
    result = bench_job(bundle, out, settings_from(**settings), baseline, config, progress, trust_checkpoint)
    if check:
        result.raise_for_gates()
    return result


def build(bundle: str | Path, precision: str | None = None, options: Any = None,
          progress: Progress | None = None) -> list[Artifact]:
    """TensorRT engines for the bundle's graphs (``mmopt.trt.BuildOptions``), on this GPU."""
    from mmopt.jobs.build import build_engines

    return build_engines(bundle, precision, options, progress)


def preflight() -> Any:
    """What ``build`` needs (TensorRT and a GPU), checked before a long export: ``TensorRTUnavailable``."""
    from mmopt.jobs.build import preflight as check

    return check()


def inspect_bundle(bundle: str | Path) -> Manifest:
    return Manifest.read(bundle)


def verify_bundle(bundle: str | Path) -> tuple[Manifest, list[tuple[str, str]]]:
    """Re-check every artifact's sha256; returns the manifest and [(file, problem)]."""
    return Manifest.read_checked(bundle)
