"""A deployment package, loaded on a device: verified, self-tested, then served.

Needs numpy and onnxruntime only (no torch, no onnx, no mmopt build code). ``Package.load(folder)``:

1. reads ``package.json``, checks its structure and wiring, and reads every listed file once: a plain
   relative path inside the package (no ``..``, no absolute path, no symlink out), present, with the recorded
   sha256. Any mismatch refuses the package, naming the file or field;
2. opens one ONNX Runtime session per component from the bytes it hashed and checks each graph's inputs
   and outputs against the manifest;
3. runs the golden self-test: the package's own pipeline on the recorded inputs must match the recorded
   eager outputs within the policy's tolerance (``mmopt_runtime.compare``, the gate mmopt itself uses).

Between 2 and 3 it decides what runs each component (``mmopt_runtime.engines``: an engine set that matches
this GPU and TensorRT exactly, else a version-compatible one, else engines built here from the ONNX graphs into
a cache where full TensorRT is present, else ONNX Runtime, saying why), and the self-test runs on that.

Only then does ``infer`` serve. Where everything runs on ONNX Runtime and the package holds a merged graph
(``merged``: the components joined into one by the wiring), that one graph runs in one session: the split
pipeline's per-call overhead is paid once.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from mmopt_runtime import engines, signing
from mmopt_runtime.compare import failures, measure
from mmopt_runtime.errors import MmoptError
from mmopt_runtime.feeds import axis_problems
from mmopt_runtime.paths import escape
from mmopt_runtime.ort import fast_run, io_problems, session
from mmopt_runtime.pipeline import Pipeline, manifest_calls

KIND = "mmopt-package"
FORMAT = 1
MANIFEST = "package.json"
DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64, "int64": np.int64,
          "int32": np.int32, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_}


class PackageError(MmoptError):
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
    if not isinstance(rel, str) or not rel:
        raise PackageError(f"{where}: {rel!r} is not a file name inside the package. Rebuild it with `mmopt package`.")
    full, problem = escape(root, rel, "package")
    if problem:
        raise PackageError(f"{where}: {rel!r} {problem}. The manifest was edited or is not from mmopt: rebuild the "
                           "package.")
    return full


class _Graph:
    """One component's ONNX graph on ONNX Runtime, checked against the manifest's inputs and outputs. The
    session is made from the very bytes whose sha256 was checked, never from the path, and so is its external
    data (``external``: location -> the hashed bytes of the file the manifest lists): a file swapped after the
    check is never loaded, and data the manifest does not list is never read from disk (not even from the
    working directory), so such a graph fails to load."""

    def __init__(self, name: str | None, path: Path, data: bytes, spec: dict[str, Any], threads: int | None,
                 external: dict[str, bytes] | None = None, device: str = "cpu"):
        self.what = "the merged graph" if name is None else f"component '{name}'"  # None: the merged graph
        try:
            self.session = session(data, device, threads=threads, config={"session.intra_op.allow_spinning": "0"},
                                   external=external)
        except Exception as e:
            hint = "" if "upgrade onnxruntime" in str(e) else (
                " Its external data files, if it has any, must be listed in the manifest "
                "(components.<c>.external_data): rebuild the package.")
            raise PackageError(f"{path}: ONNX Runtime cannot load {self.what} ({e}).{hint}") from None
        self.name = name
        self.outputs = [t["name"] for t in spec["outputs"]]
        problems = io_problems(self.session, {t["name"]: (t["dtype"], len(t["shape"])) for t in spec["inputs"]},
                               {t["name"]: (t["dtype"], len(t["shape"])) for t in spec["outputs"]})
        if problems:
            raise PackageError(f"{path}: is not {self.what}: {'; '.join(problems)}. Rebuild the "
                               "package with `mmopt package`.")
        self._run = fast_run(self.session)  # Package.check_inputs has checked the model's feeds

    def infer(self, feeds: dict[str, np.ndarray], check: bool = False) -> dict[str, np.ndarray]:
        try:
            return dict(zip(self.outputs, self._run(self.outputs, feeds, None)))
        except Exception as e:  # onnxruntime's Fail / InvalidArgument: an input the graph cannot take
            raise PackageError(f"{self.what}: ONNX Runtime failed on these inputs ({e}).") from None


def _engine_runners(plan: engines.Plan, manifest: dict[str, Any], device: int, backend: str) -> dict[str, Any]:
    """An ``EngineRunner`` per component the plan puts on TensorRT, each on its own cuda-python stream. Where
    TensorRT refuses one (deserialisation, I/O that does not match the manifest), "auto" moves every component
    back to ONNX Runtime and the plan says why; "tensorrt" refuses the package."""
    if not plan.engines:
        return {}
    from mmopt_runtime.trt import memory
    from mmopt_runtime.trt.runner import EngineRunner

    runners: dict[str, Any] = {}
    try:
        for c, (engine, host_code) in plan.engines.items():
            spec = manifest["components"][c]
            mem = memory.cuda_python_memory(device)
            try:
                runners[c] = EngineRunner(engine, f"component '{c}' engine", mem, [t["name"] for t in spec["inputs"]],
                                          [t["name"] for t in spec["outputs"]], allow_host_code=host_code,
                                          what="the package manifest",
                                          fix="Rebuild the package from a bundle whose engines were built from "
                                              "its graphs.")
            except BaseException:
                mem.close()
                raise
    except BaseException as e:  # the engines already made go on every failure, an interrupt included
        for r in runners.values():
            r.close()
        if not isinstance(e, Exception):
            raise
        what = e if isinstance(e, MmoptError) else f"{type(e).__name__}: {e}"  # TensorRT's own errors too
        if backend == "tensorrt":
            raise PackageError(f"--backend tensorrt: {plan.source}: {what}") from None
        plan.why.append(f"{plan.source} cannot be loaded here ({what}): ONNX Runtime runs every component")
        plan.backend, plan.engines, plan.source, plan.tensorrt = "onnxruntime", {}, "", None
        return {}
    return runners


class Package:
    """A verified package. ``Package.load(folder)`` refuses anything that does not check out."""

    def __init__(self, root: Path, manifest: dict[str, Any], pipeline: Pipeline, load_ms: float):
        self.root, self.manifest, self.pipeline, self.load_ms = root, manifest, pipeline, load_ms
        self.inputs = {t["name"]: t for t in manifest["model"]["inputs"]}
        self.selftest_result: dict[str, Any] | None = None
        self.graph = "split"  # or "merged": what ``infer`` runs
        self.signed = False  # whether a signature was verified with the given public key
        self.plan = engines.Plan("onnxruntime")  # what runs each component (TensorRT engines, or ONNX Runtime)
        self._engines: list[Any] = []  # EngineRunners to close
        self._accepted: set[tuple] = set()  # feed signatures check_inputs passed unchanged

    @classmethod
    def load(cls, folder: str | os.PathLike, threads: int | None = 1, selftest: bool = True,
             merged: bool = True, public_key: str | os.PathLike | None = None, backend: str = "auto",
             device: int = 0, engine_cache: str | os.PathLike | None = None,
             log: Any = None) -> "Package":
        """Verify, load and (by default) self-test the package at ``folder``.

        ``backend``: "auto" runs TensorRT engines where they can run here (``mmopt_runtime.engines`` has the
        decision order; ``pkg.plan`` says what was chosen and why) and ONNX Runtime otherwise; "tensorrt"
        refuses instead of falling back; "onnxruntime" never tries TensorRT; "onnxruntime-cuda" runs the graphs
        on ONNX Runtime's CUDA provider (onnxruntime-gpu). ``device``: the GPU's index;
        ``engine_cache``: where engines built here are kept (default ``~/.cache/mmopt/engines``); ``log``: a
        callable told when an engine is being built here (it takes minutes).
        On ONNX Runtime, where the package holds a merged graph (the components joined into one, checked
        against the split pipeline when packaged), that one graph runs, in one session; ``merged=False``
        runs the split graphs instead. With ``public_key`` the package must be signed with its private key
        (``mmopt_runtime.signing``), checked before anything else is read; a signed package without
        ``public_key`` is refused."""
        t0 = time.perf_counter()
        root = Path(folder)
        if backend not in engines.BACKENDS:
            raise PackageError(f"backend {backend!r}: use one of {', '.join(engines.BACKENDS)}.")
        try:
            signed = signing.verify(root, public_key)
        except signing.SignatureError as e:
            raise PackageError(str(e)) from None
        manifest = read_manifest(root, signed)
        check_structure(root, manifest)
        data = verify_files(root, manifest)
        try:
            plan = engines.plan(manifest, data, backend, device, None if engine_cache is None else Path(engine_cache),
                                log)
        except engines.NoEngine as e:
            raise PackageError(f"{root}: {e}") from None
        runners = _engine_runners(plan, manifest, device, backend)
        try:
            return cls._serve(root, manifest, data, plan, runners, signed, threads, selftest, merged, t0)
        except BaseException:
            for r in runners.values():  # an ONNX graph or the self-test failed: the engines and their memory go
                r.close()
            raise

    @classmethod
    def _serve(cls, root: Path, manifest: dict[str, Any], data: dict[str, bytes], plan: Any, runners: dict[str, Any],
               signed: Any, threads: int | None, selftest: bool, merged: bool, t0: float) -> "Package":
        one = manifest.get("merged") if merged and not runners else None
        if one is not None:
            model = manifest["model"]
            graph = _Graph(None, confined(root, one["file"], "merged.file"), data[one["file"]], model, threads,
                           device=plan.ort_device)
            steps = [("merged", graph.infer, tuple((t["name"], f"input:{t['name']}") for t in model["inputs"]),
                      {t["name"]: f"merged:{t['name']}" for t in model["outputs"]})]
            outputs = {t["name"]: f"merged:{t['name']}" for t in model["outputs"]}
        else:
            graphs = {c: runners.get(c) or _Graph(c, confined(root, spec["file"], f"components.{c}.file"),
                                                  data[spec["file"]], spec, threads,
                                                  {loc: data[rel] for loc, rel in spec.get("external_data", {}).items()},
                                                  plan.ort_device)
                      for c, spec in manifest["components"].items()}
            steps = [(key, graphs[c].infer, sources, outs)
                     for key, c, sources, outs in manifest_calls(manifest["components"])]
            outputs = manifest["model"]["output_sources"]
        pkg = cls(root, manifest, Pipeline(steps, outputs), 0.0)
        pkg.graph = "merged" if one is not None else "split"
        pkg.signed = signed is not None
        pkg.plan, pkg._engines = plan, list(runners.values())
        pkg._golden = data[manifest["golden"]["file"]]
        if selftest:
            pkg.selftest()
        pkg.load_ms = (time.perf_counter() - t0) * 1000
        return pkg

    def check_inputs(self, feeds: dict[str, Any]) -> dict[str, np.ndarray]:
        """The feeds as the arrays the graphs take: every model input present, dtype as recorded, static axes
        as recorded, dynamic axes within the exported min..max. Integer values are not held to the config's
        ``range``: that is where random inputs are drawn (VQA's excludes the padding id real data holds); an id
        a graph cannot take fails in ONNX Runtime, by component.

        Feeds of a signature (names, dtypes, shapes, contiguity) that passed before unchanged pass again without
        the walk: at batch 1 the checks would otherwise cost a few percent of a small model's latency."""
        try:
            key = tuple((n, a.dtype, a.shape, a.flags.c_contiguous) for n, a in feeds.items())
        except AttributeError:  # not arrays: checked and converted below
            key = None
        if key in self._accepted:
            return dict(feeds)
        out = self._check(feeds)
        if key is not None and len(self._accepted) < 256 and all(out[n] is feeds[n] for n in out):
            self._accepted.add(key)
        return out

    def _check(self, feeds: dict[str, Any]) -> dict[str, np.ndarray]:
        missing = sorted(set(self.inputs) - set(feeds))
        extra = sorted(set(feeds) - set(self.inputs))
        if missing or extra:
            raise PackageError(f"inputs: missing {missing}, unexpected {extra}; the package takes "
                               f"{', '.join(self.inputs)}.")
        out, sizes = {}, {}
        for name, t in self.inputs.items():
            a = np.asarray(feeds[name])
            want = DTYPES[t["dtype"]]
            if a.dtype != want:
                ok = np.can_cast(a.dtype, want, casting="safe") if t["dtype"] != "bool" else \
                    (np.issubdtype(a.dtype, np.integer) and bool(np.isin(a, (0, 1)).all()))
                if not ok:
                    raise PackageError(f"input '{name}': dtype {a.dtype}, the package takes {t['dtype']} (no lossy "
                                       "conversion is made).")
                a = a.astype(want)
            if a.ndim != len(t["shape"]):
                raise PackageError(f"input '{name}': rank {a.ndim}, the package takes {t['shape']}.")
            problems = axis_problems(f"input '{name}'", t["shape"], t["shapes"]["min"], t["shapes"]["max"], a.shape)
            if problems:
                raise PackageError("; ".join(problems) + ".")
            for dim, n in zip(t["shape"], a.shape):
                if isinstance(dim, str) and sizes.setdefault(dim, (n, name))[0] != n:
                    raise PackageError(f"input '{name}': {dim} = {n}, but input '{sizes[dim][1]}' has {dim} = "
                                       f"{sizes[dim][0]}.")
            out[name] = np.ascontiguousarray(a)
        return out

    def infer(self, feeds: dict[str, Any]) -> dict[str, np.ndarray]:
        return self.pipeline.infer(self.check_inputs(feeds))

    def close(self) -> None:
        """Free the TensorRT engines and their device memory (ONNX Runtime sessions go with the object)."""
        for r in self._engines:
            r.close()
        self._engines = []

    def __enter__(self) -> "Package":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def selftest(self) -> dict[str, Any]:
        """The pipeline on the golden inputs against the golden eager outputs, gated by the policy's
        tolerance. Raises ``PackageError`` listing every failing output."""
        golden = self.manifest["golden"]
        where = self.root / golden["file"]
        try:
            with np.load(io.BytesIO(self._golden), allow_pickle=False) as data:  # the bytes that were hashed
                inputs = {k[len("input/"):]: data[k] for k in data.files if k.startswith("input/")}
                outputs = {k[len("output/"):]: data[k] for k in data.files if k.startswith("output/")}
        except Exception as e:
            raise PackageError(f"{where}: not a golden .npz of arrays ({e}). Rebuild the package.") from None
        model_outputs = {t["name"] for t in self.manifest["model"]["outputs"]}
        if set(outputs) != model_outputs or not inputs:
            raise PackageError(f"{where}: holds outputs {sorted(outputs)} and {len(inputs)} inputs; the self-test needs "
                               f"every model output ({sorted(model_outputs)}) and the inputs. Rebuild the package.")
        rows_in = {int(np.shape(a)[0]) if np.ndim(a) else 0 for a in inputs.values()}
        if rows_in != {golden["samples"]} or golden["samples"] < 1:
            raise PackageError(f"{where}: {sorted(rows_in)} samples, the manifest says {golden['samples']}.")
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
            on = (f"with {self.plan.source} on TensorRT {self.plan.tensorrt}" if self.plan.engines
                  else "on ONNX Runtime")
            fix = ("check the engines (rebuild them on this device), or serve the ONNX graphs with "
                   "--backend onnxruntime" if self.plan.engines else "check the onnxruntime version and the hardware, "
                   "or rebuild the package")
            raise PackageError(f"{self.root}: the golden self-test fails {on}, so this package does not compute what "
                               f"was verified on this device:\n" + "\n".join(bad) + f"\nDo not serve it: {fix}.")
        self.selftest_result = {"passed": True, "signed": self.signed, "graph": self.graph,
                                "backend": self.plan.to_json(), "samples": golden["samples"], "outputs": rows}
        return self.selftest_result

    def bench(self, rounds: int = 50) -> dict[str, Any]:
        """Median latency (ms) of the pipeline at the exported min / opt / max batch, on random inputs."""
        if rounds < 1:
            raise PackageError(f"bench: --rounds {rounds}; give at least 1.")
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
        return {"backend": self.plan.to_json(), "graph": self.graph, "rounds": rounds, "latency": out}


def read_manifest(root: Path, signed: dict[str, str] | None = None) -> dict[str, Any]:
    """``package.json``, read once; with ``signed`` (the verified signature's digests) its bytes must be the
    signed ones, so every hash it lists is the signer's."""
    path = root / MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise PackageError(f"{root}: no {MANIFEST}: not an mmopt package. Make one with `mmopt package`.") from None
    except OSError as e:
        raise PackageError(f"{path}: cannot be read ({e.strerror}).") from None
    if signed is not None and hashlib.sha256(raw).hexdigest() != signed.get(MANIFEST):
        raise PackageError(f"{path}: is not the manifest the signature covers (it changed after the signature was "
                           "checked, or was never signed). Do not serve this package: copy it again.")
    try:
        manifest = json.loads(raw.decode(), parse_constant=_no_constants)
    except ValueError as e:  # also UnicodeDecodeError
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


def _no_constants(name: str) -> Any:
    if name == "Infinity":  # int8's absolute-error gate is off: max_abs inf
        return math.inf
    raise ValueError(f"{name} is not a number a package may hold")


HEX64 = re.compile(r"^[0-9a-f]{64}$")
TOLERANCE = ("max_abs", "max_rel", "min_cosine", "min_argmax", "max_norm_change")


def check_structure(root: Path, manifest: dict[str, Any]) -> None:
    """The manifest's shape, every field the runtime reads, and the wiring: each call's sources are its graph's
    inputs and each reads a model input or an output of a call before it; the model outputs resolve; the
    golden tolerance is a real gate (every key a number, none NaN). Refusals name the field."""
    where = root / MANIFEST

    def bad(field: str, why: str) -> PackageError:
        return PackageError(f"{where}: field '{field}' {why}. Rebuild the package with `mmopt package`.")

    def tensors(value: Any, field: str) -> list[dict[str, Any]]:
        if not isinstance(value, list) or not value:
            raise bad(field, "is not a list of tensors")
        for i, t in enumerate(value):
            ok = isinstance(t, dict) and isinstance(t.get("name"), str) and t.get("dtype") in DTYPES and \
                isinstance(t.get("shape"), list) and isinstance(t.get("shapes"), dict) and \
                all(isinstance(t["shapes"].get(k), list) and len(t["shapes"][k]) == len(t["shape"])
                    for k in ("min", "opt", "max"))
            if not ok:
                raise bad(f"{field}[{i}]", "is not a tensor (name, dtype, shape, shapes min / opt / max)")
        return value

    model = manifest["model"]
    names = {t["name"] for t in tensors(model.get("inputs"), "model.inputs")}
    tensors(model.get("outputs"), "model.outputs")
    if not isinstance(manifest["files"], dict) or not all(isinstance(k, str) and isinstance(v, str) and HEX64.match(v)
                                                          for k, v in manifest["files"].items()):
        raise bad("files", "is not a table of file -> sha256")
    made: dict[str, set[str]] = {}
    for c, spec in manifest["components"].items():
        if not isinstance(spec, dict) or not isinstance(spec.get("file"), str):
            raise bad(f"components.{c}", "is not a component with a file")
        ext = spec.get("external_data", {})
        if not isinstance(ext, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ext.items()):
            raise bad(f"components.{c}.external_data", "is not a table of location -> packaged file")
        ins = {t["name"] for t in tensors(spec.get("inputs"), f"components.{c}.inputs")}
        outs = {t["name"] for t in tensors(spec.get("outputs"), f"components.{c}.outputs")}
        calls = spec.get("calls")
        if not isinstance(calls, list) or not calls:
            raise bad(f"components.{c}.calls", "is not a list of calls")
        for i, call in enumerate(calls):
            if not (isinstance(call, list) and len(call) == 2 and isinstance(call[0], str) and
                    isinstance(call[1], dict) and re.fullmatch(rf"{re.escape(c)}(@[2-9]|@[1-9][0-9]+)?", call[0])):
                raise bad(f"components.{c}.calls[{i}]", f"is not [\"{c}\" or \"{c}@k\", {{input: source}}]")
            key, sources = call
            if key in made:
                raise bad(f"components.{c}.calls[{i}]", f"repeats the call '{key}'")
            if set(sources) != ins:
                raise bad(f"components.{c}.calls[{i}]", f"feeds {sorted(sources)}, the graph takes {sorted(ins)}")
            made[key] = outs
    for c, spec in manifest["components"].items():
        for i, (key, sources) in enumerate(spec["calls"]):
            for n, src in sources.items():
                kind, _, out = str(src).partition(":")
                if not ((kind == "input" and out in names) or (kind in made and out in made[kind] and kind != key)):
                    raise bad(f"components.{c}.calls[{i}].{n}", f"reads '{src}', which is no model input and no "
                                                                "output of another call")
    sources = model.get("output_sources")
    def resolves(source: Any) -> bool:
        kind, _, out = str(source).partition(":")
        return (kind == "input" and out in names) or (kind in made and out in made[kind])

    if not isinstance(sources, dict) or set(sources) != {t["name"] for t in model["outputs"]} or \
            not all(resolves(v) for v in sources.values()):
        raise bad("model.output_sources", "does not map every model output to a model input or an output of a call")
    one = manifest.get("merged")
    if one is not None and not (isinstance(one, dict) and isinstance(one.get("file"), str)):
        raise bad("merged", "is not {file} (or null: no merged graph)")
    _check_engine_sets(manifest, bad)
    golden = manifest["golden"]
    if not isinstance(golden.get("file"), str) or not isinstance(golden.get("samples"), int) or \
            not isinstance(golden.get("scores", []), list):
        raise bad("golden", "is not {file, samples, tolerance, scores}")
    tol = golden.get("tolerance")
    if not isinstance(tol, dict) or set(TOLERANCE) - set(tol) or not all(
            isinstance(tol[k], (int, float)) and not isinstance(tol[k], bool) and not math.isnan(tol[k])
            for k in TOLERANCE) or not (-1 <= tol["min_cosine"] <= 1 and 0 <= tol["min_argmax"] <= 1) or \
            any(math.isinf(tol[k]) for k in TOLERANCE if k not in ("max_abs", "max_rel")):
        raise bad("golden.tolerance", f"is not a gate: {', '.join(TOLERANCE)}, each a number (not NaN; "
                                      "min_cosine in [-1, 1], min_argmax in [0, 1])")


def _check_engine_sets(manifest: dict[str, Any], bad: Any) -> None:
    """``engines``: a list of engine sets, each with what ``mmopt_runtime.trt.compat.decide`` reads and an engine
    per component built from that component's packaged graph (its sha256 recorded)."""
    from mmopt_runtime.trt.compat import parse_cc, parse_version

    sets = manifest.get("engines", [])
    if not isinstance(sets, list):
        raise bad("engines", "is not a list of engine sets")
    ids = set()
    for i, es in enumerate(sets):
        f = f"engines[{i}]"
        try:
            ok = isinstance(es["id"], str) and bool(es["id"]) and isinstance(es["platform"], str) and \
                isinstance(es["gpu"]["name"], str) and isinstance(es["gpu"]["compute_capability"], str) and \
                isinstance(es["tensorrt"]["version"], str) and bool(parse_cc(es["gpu"]["compute_capability"])) and \
                bool(parse_version(es["tensorrt"]["version"])) and \
                isinstance(es["build_options"]["version_compatible"], bool) and \
                es["build_options"]["hardware_compatibility"] in engines.HARDWARE_LEVELS and \
                isinstance(es["components"], dict) and bool(es["components"])
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise bad(f, "is not an engine set (id, tensorrt.version, gpu.name and compute_capability, platform, "
                         "build_options.version_compatible and hardware_compatibility, components)")
        if es["id"] in ids:
            raise bad(f"{f}.id", f"repeats the engine set '{es['id']}'")
        ids.add(es["id"])
        for c, e in es["components"].items():
            where = f"{f}.components.{c}"
            if c not in manifest["components"]:
                raise bad(where, "names no component of the package")
            if not (isinstance(e, dict) and isinstance(e.get("file"), str) and isinstance(e.get("onnx_sha256"), str)):
                raise bad(where, "is not {file, onnx_sha256}")
            if e["onnx_sha256"] != manifest["files"].get(manifest["components"][c]["file"]):
                raise bad(f"{where}.onnx_sha256", "is not the sha256 of that component's packaged graph: the engine "
                                                  "was built from another graph")


def verify_files(root: Path, manifest: dict[str, Any]) -> dict[str, bytes]:
    """Every listed file inside the package with its recorded sha256; every file the package uses listed.
    Returns the bytes that were hashed: they are what gets loaded."""
    files = manifest["files"]
    used = [spec["file"] for spec in manifest["components"].values()] + [manifest["golden"]["file"]] + \
        [rel for spec in manifest["components"].values() for rel in spec.get("external_data", {}).values()] + \
        ([manifest["merged"]["file"]] if manifest.get("merged") else []) + \
        [e["file"] for es in manifest.get("engines", []) for e in es["components"].values()]
    unlisted = [f for f in used if f not in files]
    if unlisted:
        raise PackageError(f"{root / MANIFEST}: uses {unlisted} without a sha256 in 'files'. Rebuild the package.")
    data = {}
    for rel, digest in files.items():
        path = confined(root, rel, f"files.{rel}")
        try:
            data[rel] = path.read_bytes()
        except FileNotFoundError:
            raise PackageError(f"{path}: listed in the package but missing. Copy the whole package again.") from None
        except OSError as e:
            raise PackageError(f"{path}: cannot be read ({e.strerror}).") from None
        if hashlib.sha256(data[rel]).hexdigest() != digest:
            raise PackageError(f"{path}: sha256 differs from the package manifest: the file was changed or "
                               "corrupted in transfer. Copy the package again; do not serve this one.")
    return data
