"""A deployment package, loaded on a device: verified, self-tested, then served.

Needs numpy and onnxruntime only (no torch, no onnx, no mmopt build code). ``Package.load(folder)``:

1. reads ``package.json`` and checks every listed file: a plain relative path inside the package (no ``..``,
   no absolute path, no symlink out), present, with the recorded sha256. Any mismatch refuses the package,
   naming the file;
2. opens one ONNX Runtime session per component graph and checks each graph's inputs and outputs against the
   manifest;
3. runs the golden self-test: the package's own pipeline on the recorded inputs must match the recorded
   eager outputs within the policy's tolerance (``mmopt_runtime.compare``, the gate mmopt itself uses).

Only then does ``infer`` serve. TensorRT engine sets are not in this format yet: every package runs its
ONNX graphs on ONNX Runtime.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from mmopt_runtime.compare import failures, measure
from mmopt_runtime.pipeline import Pipeline

KIND = "mmopt-package"
FORMAT = 1
MANIFEST = "package.json"
DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64, "int64": np.int64,
          "int32": np.int32, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_}
ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
             "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
             "tensor(bool)": "bool"}


class PackageError(Exception):
    """The package cannot be trusted or served; the message names the file or field and what to do."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def confined(root: Path, rel: Any, field: str) -> Path:
    """``root / rel`` when ``rel`` is a plain relative path that stays inside ``root`` (symlinks resolved)."""
    where = f"{root / MANIFEST}: field '{field}'"
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise PackageError(f"{where}: {rel!r} is not a file name inside the package. Rebuild it with `mmopt package`.")
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts or str(pure) != rel:
        raise PackageError(f"{where}: {rel!r} is not a plain path inside the package (absolute, '..' or not "
                           "normalised). The manifest was edited or is not from mmopt: rebuild the package.")
    full = (root / rel).resolve()
    if root.resolve() not in full.parents:
        raise PackageError(f"{where}: {rel!r} resolves to {full}, outside the package (through a symlink).")
    return full


class _Graph:
    """One component's ONNX graph on ONNX Runtime, checked against the manifest's inputs and outputs."""

    def __init__(self, name: str, path: Path, spec: dict[str, Any], threads: int | None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise PackageError(f"{path}: ONNX Runtime cannot load the graph of component '{name}' ({e}).") from None
        self.name = name
        self.inputs = {t["name"]: t for t in spec["inputs"]}
        self.outputs = [t["name"] for t in spec["outputs"]]
        have_in = {i.name: i for i in self.session.get_inputs()}
        have_out = {o.name: o for o in self.session.get_outputs()}
        problems = [f"input '{n}' missing" for n in self.inputs if n not in have_in]
        problems += [f"unexpected input '{n}'" for n in have_in if n not in self.inputs]
        problems += [f"output '{n}' missing" for n in self.outputs if n not in have_out]
        for n, t in self.inputs.items():
            if n in have_in and ORT_TYPES.get(have_in[n].type) != t["dtype"]:
                problems.append(f"input '{n}' is {have_in[n].type}, the manifest says {t['dtype']}")
        if problems:
            raise PackageError(f"{path}: is not the graph of component '{name}': {'; '.join(problems)}. Rebuild the "
                               "package with `mmopt package`.")

    def infer(self, feeds: dict[str, np.ndarray], check: bool = False) -> dict[str, np.ndarray]:
        return dict(zip(self.outputs, self.session.run(self.outputs, feeds)))


class Package:
    """A verified package. ``Package.load(folder)`` refuses anything that does not check out."""

    def __init__(self, root: Path, manifest: dict[str, Any], pipeline: Pipeline, load_ms: float):
        self.root, self.manifest, self.pipeline, self.load_ms = root, manifest, pipeline, load_ms
        self.inputs = {t["name"]: t for t in manifest["model"]["inputs"]}
        self.selftest_result: dict[str, Any] | None = None

    @classmethod
    def load(cls, folder: str | os.PathLike, threads: int | None = 1, selftest: bool = True) -> "Package":
        t0 = time.perf_counter()
        root = Path(folder)
        manifest = read_manifest(root)
        verify_files(root, manifest)
        graphs = {c: _Graph(c, confined(root, spec["file"], f"components.{c}.file"), spec, threads)
                  for c, spec in manifest["components"].items()}
        steps = [(key, graphs[c].infer, tuple(sources.items()),
                  {o["name"]: f"{key}:{o['name']}" for o in spec["outputs"]})
                 for c, spec in manifest["components"].items() for key, sources in spec["calls"]]
        pkg = cls(root, manifest, Pipeline(steps, manifest["model"]["output_sources"]), 0.0)
        if selftest:
            pkg.selftest()
        pkg.load_ms = (time.perf_counter() - t0) * 1000
        return pkg

    def check_inputs(self, feeds: dict[str, Any]) -> dict[str, np.ndarray]:
        """The feeds as the arrays the graphs take: every model input present, dtype as recorded, static axes
        as recorded, dynamic axes within the exported min..max."""
        missing = sorted(set(self.inputs) - set(feeds))
        extra = sorted(set(feeds) - set(self.inputs))
        if missing or extra:
            raise PackageError(f"inputs: missing {missing}, unexpected {extra}; the package takes "
                               f"{', '.join(self.inputs)}.")
        out = {}
        for name, t in self.inputs.items():
            a = np.asarray(feeds[name])
            want = DTYPES[t["dtype"]]
            if a.dtype != want:
                if not np.can_cast(a.dtype, want, casting="same_kind") and t["dtype"] != "bool":
                    raise PackageError(f"input '{name}': dtype {a.dtype}, the package takes {t['dtype']}.")
                a = a.astype(want)
            if a.ndim != len(t["shape"]):
                raise PackageError(f"input '{name}': rank {a.ndim}, the package takes {t['shape']}.")
            lo, hi = t["shapes"]["min"], t["shapes"]["max"]
            for axis, (dim, n) in enumerate(zip(t["shape"], a.shape)):
                if isinstance(dim, int) and n != dim:
                    raise PackageError(f"input '{name}': axis {axis} is {n}, the package takes {dim}.")
                if isinstance(dim, str) and not lo[axis] <= n <= hi[axis]:
                    raise PackageError(f"input '{name}': {dim} = {n} is outside the exported range "
                                       f"{lo[axis]}..{hi[axis]}.")
            out[name] = np.ascontiguousarray(a)
        return out

    def infer(self, feeds: dict[str, Any]) -> dict[str, np.ndarray]:
        return self.pipeline.infer(self.check_inputs(feeds))

    def selftest(self) -> dict[str, Any]:
        """The pipeline on the golden inputs against the golden eager outputs, gated by the policy's
        tolerance. Raises ``PackageError`` listing every failing output."""
        golden = self.manifest["golden"]
        with np.load(confined(self.root, golden["file"], "golden.file"), allow_pickle=False) as data:
            inputs = {k[len("input/"):]: data[k] for k in data.files if k.startswith("input/")}
            outputs = {k[len("output/"):]: data[k] for k in data.files if k.startswith("output/")}
        got = self.infer(inputs)
        tol, scores = golden["tolerance"], set(golden.get("scores", []))
        rows, bad = {}, []
        for name, ref in outputs.items():
            m = measure(name, ref, got[name], name in scores)
            why = failures(m, tol)
            rows[name] = {"cos_min": m.cos_min, "max_abs": m.max_abs, "failed": why}
            if why:
                bad.append(f"  {name}: {'; '.join(why)}")
        if bad:
            raise PackageError(f"{self.root}: the golden self-test fails, so this package does not compute what was "
                               f"verified on this device:\n" + "\n".join(bad) + "\nDo not serve it: check the "
                               "onnxruntime version and the hardware, or rebuild the package.")
        self.selftest_result = {"passed": True, "samples": golden["samples"], "outputs": rows}
        return self.selftest_result

    def bench(self, rounds: int = 50, batch: str = "opt") -> dict[str, Any]:
        """Median latency (ms) of the pipeline at the exported min / opt / max batch, on random inputs."""
        rng = np.random.default_rng(0)
        out = {}
        for size in ("min", "opt", "max"):
            feeds = {}
            for name, t in self.inputs.items():
                shape = t["shapes"][size]
                if t["dtype"] == "bool":
                    feeds[name] = np.ones(shape, np.bool_)
                elif t["dtype"].startswith(("int", "uint")):
                    lo, hi = t.get("range") or (0, 1)
                    feeds[name] = rng.integers(int(lo), int(hi) + 1, shape).astype(DTYPES[t["dtype"]])
                else:
                    feeds[name] = rng.standard_normal(shape).astype(DTYPES[t["dtype"]])
            feeds = self.check_inputs(feeds)
            for _ in range(3):
                self.pipeline.infer(feeds)
            times = []
            for _ in range(rounds):
                t0 = time.perf_counter_ns()
                self.pipeline.infer(feeds)
                times.append((time.perf_counter_ns() - t0) / 1e6)
            out[size] = {"shapes": {n: t["shapes"][size] for n, t in self.inputs.items()},
                         "p50_ms": float(np.median(times)), "p90_ms": float(np.percentile(times, 90))}
        return {"backend": "onnxruntime-cpu", "rounds": rounds, "latency": out}


def read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise PackageError(f"{root}: no {MANIFEST}: not an mmopt package. Make one with `mmopt package`.") from None
    except (OSError, ValueError) as e:
        raise PackageError(f"{path}: cannot be read as JSON ({e}). Rebuild the package.") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise PackageError(f"{path}: not an mmopt package manifest (no \"kind\": \"{KIND}\").")
    if manifest.get("format") != FORMAT:
        raise PackageError(f"{path}: package format {manifest.get('format')!r}; this runtime reads {FORMAT}. Use a "
                           "runtime of the mmopt version that made the package, or rebuild it.")
    for key in ("model", "components", "files", "golden"):
        if not isinstance(manifest.get(key), dict):
            raise PackageError(f"{path}: field '{key}' is missing or not a table. Rebuild the package.")
    return manifest


def verify_files(root: Path, manifest: dict[str, Any]) -> None:
    """Every listed file inside the package with its recorded sha256; every file the package uses listed."""
    files = manifest["files"]
    used = [spec["file"] for spec in manifest["components"].values()] + [manifest["golden"]["file"]]
    unlisted = [f for f in used if f not in files]
    if unlisted:
        raise PackageError(f"{root / MANIFEST}: uses {unlisted} without a sha256 in 'files'. Rebuild the package.")
    for rel, digest in files.items():
        path = confined(root, rel, f"files.{rel}")
        if not path.is_file():
            raise PackageError(f"{path}: listed in the package but missing. Copy the whole package again.")
        if sha256_file(path) != digest:
            raise PackageError(f"{path}: sha256 differs from the package manifest: the file was changed or "
                               "corrupted in transfer. Copy the package again; do not serve this one.")
