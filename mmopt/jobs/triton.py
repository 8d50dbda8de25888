"""``mmopt triton``: a package as an NVIDIA Triton Inference Server model repository, validated before it is
written.

The source is a package (``mmopt package``) or a bundle, which is packaged first into a temporary folder by
the package job (so the repository holds exactly what a package holds: the policy's graphs, verified and
self-tested by the device runtime). Everything in the repository comes from the package manifest, the one
home of wiring, IO specs, dims and hashes (``mmopt.triton.config`` turns it into configs):

    <name>_<component>/config.pbtxt, 1/model.onnx   one member per component (native: onnxruntime_onnx;
                                                     python: 1/model.py running the graph in ONNX Runtime)
    <name>/config.pbtxt, 1/                          the ensemble: model inputs -> steps -> model outputs
    mmopt-triton.json                                what was written, from which package, each file's sha256

The repository is written through the bundle store's transaction (``mmopt.store``: one writer at a time,
staged in a hidden sibling, swapped in whole, a killed run repaired by the next), checked with Triton's schema
and meaning (``mmopt.triton.validate``) before the swap; a folder that is not a repository mmopt wrote is never
replaced.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

from mmopt import __version__
from mmopt.errors import BundleError, TritonRepositoryError, UsageError
from mmopt.jobs.package import manifest_kind, package as package_job
from mmopt.progress import Progress
from mmopt.store import Kind, is_bundle, transaction
from mmopt.triton import config as triton_config, validate
from mmopt_runtime.paths import escape
from mmopt_runtime.package import KIND as PACKAGE_KIND, MANIFEST as PACKAGE_MANIFEST, Package, PackageError, \
    confined, sha256_file

KIND = "mmopt-triton-repository"
FORMAT = 1
REPOSITORY = Kind("Triton repository", validate.MARKER, lambda p: is_repository(p), "model_repository")


@dataclasses.dataclass
class TritonResult:
    folder: Path
    plan: triton_config.Plan
    report: validate.Report
    package: dict[str, Any]  # the package manifest it was built from
    staged_package: bool  # the source was a bundle, packaged into a temporary folder first
    seconds: float


def triton(source: str | Path, policy: dict[str, str] | None, out: str | Path, *, backend: str = "native",
           name: str | None = None, batching: bool = True, instances: int = 1, kind: str | None = None,
           queue_delay_us: int = 0, config: str | Path | None = None, trust_checkpoint: bool = False,
           public_key: str | Path | None = None, progress: Progress | None = None,
           tensorrt: str | None = None, platform: str = "linux-x86_64") -> TritonResult:
    """``tensorrt``, ``platform``: the Triton server's TensorRT version and platform: the package's engines that
    load there become ``tensorrt_plan`` members (one plan per compute capability); the other components stay
    ONNX."""
    validate.schema()  # the optional extra, before minutes of packaging
    triton_config.check_options(backend, kind, instances, queue_delay_us, name)
    if tensorrt is not None and backend != "native":
        raise UsageError(f"--tensorrt {tensorrt} --backend {backend}: TensorRT plans are served by Triton's TensorRT "
                         "backend; use --backend native.")
    if tensorrt is not None and kind == "cpu":
        raise UsageError(f"--tensorrt {tensorrt} --kind cpu: TensorRT plans run on GPU instances; leave --kind out "
                         "(gpu).")
    progress = progress or Progress()
    t0 = time.perf_counter()
    if Path(out).is_symlink():
        raise UsageError(f"-o {out}: is a symlink; give the real folder.")
    source, out = Path(source), Path(out).resolve()
    what = source_kind(source)
    if what == "package" and (config is not None or trust_checkpoint):
        raise UsageError("--config / --trust-checkpoint are for a bundle source; a package already holds its golden "
                         "samples.")
    if what == "bundle" and public_key is not None:
        raise UsageError("--public-key checks a signed package; a bundle is packaged here, unsigned.")
    check_out(out, source)
    with tempfile.TemporaryDirectory(prefix="mmopt-triton-") as tmp:
        folder = source
        if what == "bundle":
            folder = package_job(source, policy, Path(tmp) / "package", config, trust_checkpoint, progress).folder
        try:
            # hashes, structure, the signature where there is one, and the golden self-test on the split graphs:
            # the members serve those (a package's merged graph is for one-process serving)
            pkg = Package.load(folder, merged=False, public_key=public_key, backend="onnxruntime")
        except PackageError as e:
            raise BundleError(f"the package cannot be served: {e}") from None
        if what == "package":
            check_policy(policy, pkg.manifest["policy"], source)
        engines = triton_config.plan_engines(pkg.manifest, tensorrt, platform) if tensorrt is not None else None
        plan = triton_config.plan(pkg.manifest, name, backend, batching, instances, kind, queue_delay_us, engines)
        # the store's writer: one writer at a time, staged beside OUT, swapped in whole, repaired after a kill;
        # an error naming the stage names OUT instead
        with transaction(out, log=progress.log, kind=REPOSITORY) as stage:
            with progress.task(f"triton repository ({backend})", 2) as advance:
                write(stage, plan, pkg, source if what == "package" else None, engines, tensorrt)
                advance(1, doing="validate")
                report = validate.check(stage)
                advance(1)
    report.root = out
    return TritonResult(out, plan, report, pkg.manifest, what == "bundle", time.perf_counter() - t0)


def check(repo: str | Path) -> validate.Report:
    """A repository (mmopt's, or edited by hand) checked with Triton's schema and meaning."""
    return validate.check(repo)


def check_policy(policy: dict[str, str] | None, held: dict[str, str], source: Path) -> None:
    """-p with a package source may only restate the one policy the package holds."""
    unknown = sorted(set(policy or {}) - set(held))
    if unknown:
        raise UsageError(f"-p {unknown[0]}=...: no component '{unknown[0]}'; the package's components are "
                         f"{', '.join(held)}.")
    differ = {c: p for c, p in (policy or {}).items() if held[c] != p}
    if differ:
        raise UsageError(f"-p {' -p '.join(f'{c}={p}' for c, p in differ.items())}: {source} is a package of one "
                         f"policy ({_label(held)}); give its bundle to package another.")


def _label(policy: dict[str, str]) -> str:
    return " ".join(f"{c}={p}" for c, p in policy.items())


def source_kind(source: Path) -> str:
    if not source.is_dir():
        raise UsageError(f"{source}: no such folder; give a bundle (`mmopt export`) or a package (`mmopt package`).")
    if manifest_kind(source / PACKAGE_MANIFEST) == PACKAGE_KIND:
        return "package"
    if is_bundle(source):
        return "bundle"
    if is_repository(source):
        raise UsageError(f"{source}: is a Triton repository mmopt wrote; check it with `mmopt triton {source} "
                         "--check`, or give the bundle or package it came from.")
    raise UsageError(f"{source}: is neither an mmopt bundle (manifest.json, from `mmopt export`) nor a package "
                     "(package.json, from `mmopt package`). Give one of those folders.")




def is_repository(folder: Path) -> bool:
    return manifest_kind(folder / validate.MARKER) == KIND


def check_out(out: Path, source: Path) -> None:
    src = source.resolve()
    if out == src or src in out.parents:
        raise UsageError(f"-o {out}: a repository cannot be written inside its source {source}. Choose a folder "
                         "beside it.")
    if out in src.parents:
        raise UsageError(f"-o {out}: holds the source {source}; replacing it would remove the source. Choose "
                         "another folder.")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not is_repository(out))):
        raise UsageError(f"-o {out}: exists and is not a Triton repository mmopt wrote (no {validate.MARKER}); "
                         "refusing to replace it. Choose a new or empty folder.")
    if out.is_dir() and is_repository(out):
        marker = json.loads((out / validate.MARKER).read_text())
        ours = {validate.MARKER, str(marker.get("ensemble")),
                *(str(m.get("model")) for m in (marker.get("members") or {}).values() if isinstance(m, dict))}
        others = sorted(p.name for p in out.iterdir() if p.name not in ours)
        if others:
            raise UsageError(f"-o {out}: also holds {', '.join(others)}, which mmopt did not write there; writing the "
                             "repository again replaces the whole folder and would remove them. Move them out, or "
                             "write this model to its own folder (one repository per `mmopt triton` run; "
                             "tritonserver takes several --model-repository flags).")


def write(stage: Path, plan: triton_config.Plan, pkg: Package, source: Path | None,
          engines: dict[str, dict[str, tuple[str, str, bool]]] | None = None, tensorrt: str | None = None) -> None:
    """The repository's files into ``stage``: each member's graph or TensorRT plans (each file's sha256 checked
    against the package), model.py for the python flavour, every config, the ensemble's empty version folder,
    the marker."""
    files: dict[str, str] = {}
    script = resources.files("mmopt.triton").joinpath("python_model.py").read_bytes()
    for comp, member in plan.members.items():
        version = stage / member.name / "1"
        version.mkdir(parents=True)
        plans = (engines or {}).get(comp, {})
        placed = [(version / name, rel) for name, rel, _ in plans.values()]
        for path, rel in placed:
            shutil.copy2(confined(pkg.root, rel, f"engines file {rel}"), path)
        for path, listed in placed or place_onnx(pkg, comp, version):
            files[path.relative_to(stage).as_posix()] = sha256_file(path)
            if files[path.relative_to(stage).as_posix()] != pkg.manifest["files"][listed]:
                raise BundleError(f"{pkg.root / listed}: changed since the package was verified (sha256 differs "
                                  "from package.json). Copy the package again or rebuild it.")
        if plan.backend == "python":
            (version / "model.py").write_bytes(script)
            files[f"{member.name}/1/model.py"] = sha256_file(version / "model.py")
        header = (f"{member.name}: component '{comp}' at {pkg.manifest['policy'][comp]}, written by mmopt triton "
                  f"{__version__}.\nEdit instance_group / dynamic_batching as needed; `mmopt triton <repository> "
                  "--check` validates the result.")
        if member.note:
            header += f"\n{member.note}."
        (stage / member.name / validate.CONFIG).write_text(triton_config.render(member.config, header))
    (stage / plan.ensemble / "1").mkdir(parents=True)
    header = (f"{plan.ensemble}: the whole model ({_label(pkg.manifest['policy'])}) as one Triton model, written by "
              f"mmopt triton {__version__}: model inputs -> {' -> '.join(m.name for m in plan.members.values())} "
              "by the package's wiring.")
    (stage / plan.ensemble / validate.CONFIG).write_text(triton_config.render(plan.ensemble_config, header))
    marker = {"kind": KIND, "format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "mmopt": __version__, "backend": plan.backend, "ensemble": plan.ensemble, "tensorrt": tensorrt,
              "max_batch_size": plan.max_batch_size,
              "members": {c: {"model": m.name, "dynamic_batching": m.dynamic_batching, "note": m.note}
                          for c, m in plan.members.items()},
              "package": {"source": str(source.resolve()) if source else None, "signature_verified": pkg.signed,
                          "policy": pkg.manifest["policy"],
                          "model": {k: pkg.manifest["model"][k] for k in ("inputs", "outputs")},
                          "golden": {k: pkg.manifest["golden"].get(k) for k in ("tolerance", "scores")},
                          "lineage": pkg.manifest.get("lineage")},
              "files": files}
    (stage / validate.MARKER).write_text(json.dumps(marker, indent=1) + "\n")


def place_onnx(pkg: Package, comp: str, version: Path) -> list[tuple[Path, str]]:
    """Component ``comp``'s graph as Triton's ONNX Runtime backend wants it: ``model.onnx``, or a ``model.onnx/``
    folder holding ``model.onnx`` and the external data files the package lists for it. Returns each placed
    file with the package file it came from (for the hash check)."""
    spec = pkg.manifest["components"][comp]
    src = confined(pkg.root, spec["file"], f"components.{comp}.file")
    external = spec.get("external_data", {})
    if not external:
        shutil.copy2(src, version / "model.onnx")
        return [(version / "model.onnx", spec["file"])]
    folder = version / "model.onnx"
    folder.mkdir()
    shutil.copy2(src, folder / "model.onnx")
    placed = [(folder / "model.onnx", spec["file"])]
    for loc, rel in external.items():
        dest, problem = escape(folder, loc, "model.onnx folder")
        if problem:
            raise BundleError(f"{src}: names external data '{loc}', which {problem}.")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(confined(pkg.root, rel, f"components.{comp}.external_data"), dest)
        placed.append((dest, rel))
    return placed