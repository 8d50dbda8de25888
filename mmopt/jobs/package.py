"""``mmopt package``: one policy of a bundle as a deployment package that ``mmopt-run`` (the torch-free runtime,
``mmopt_runtime``) loads, verifies, self-tests and serves.

The package is a folder, plus a ``.tar.gz`` of it:
- one ONNX graph per component at the chosen precision (always: the fallback, and what ONNX Runtime runs),
  and, where there is more than one call, ``merged.onnx``: the same graphs joined by the wiring into one
  (``mmopt.stages.merge``), checked against the split pipeline, which the runtime prefers on ONNX Runtime;
- zero or more TensorRT engine sets under ``engines/<set id>/``: the engines ``mmopt build`` made in the bundle
  (and in copies of it built on other devices, ``engine_bundles``) from exactly these graphs, one set per
  (TensorRT version, compute capability, platform, version- / hardware-compatibility flags), each with what the
  runtime checks before it loads one (``mmopt_runtime.engines`` has its decision order);
- ``golden.npz``: a few real samples (from [evaluation], else [calibration], else the opt-size capture's
  random inputs) with the eager model's outputs for them, and ``package.json``'s ``golden.tolerance``, the
  policy's pipeline gate;
- ``package.json``: wiring, IO names, dtypes, dynamic axes with min / opt / max, every file's sha256, the
  parity the policy was verified at in the bundle, and lineage back to the bundle.

Before anything is replaced, the staged package is loaded by the runtime itself and must pass its own
golden self-test. The folder is written through the bundle store's transaction (``mmopt.store``: one writer at a
time, staged as a hidden sibling, swapped in whole, a killed run repaired by the next). The archive is written
whole from the stage into a hidden sibling and moved into place right after the folder: a kill between the two
leaves the new folder beside the old archive (the next run rewrites both).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import time
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from mmopt import __version__
from mmopt.errors import BundleError, UsageError
from mmopt.manifest import Manifest
from mmopt.progress import Progress
from mmopt.store import Kind, transaction, writers_left
from mmopt_runtime import signing
from mmopt_runtime.engines import HARDWARE_LEVELS, set_id, set_key
from mmopt_runtime.package import FORMAT, KIND, MANIFEST, Package, PackageError, sha256_file

GOLDEN_ROWS = 4
RESERVED = (MANIFEST, "golden.npz", "package.sig")  # names a component's data file may not take


@dataclasses.dataclass
class PackageResult:
    folder: Path
    archive: Path
    manifest: dict[str, Any]
    selftest: dict[str, Any]
    seconds: float
    merged: dict[str, Any]  # {"file", "vs_split": max abs difference} or {"reason": why there is none}
    engine_notes: list[str] = dataclasses.field(default_factory=list)  # engines left out, and why


def package(bundle: str | Path, policy: dict[str, str] | None, out: str | Path, config: str | Path | None = None,
            trust_checkpoint: bool = False, progress: Progress | None = None,
            sign_key: str | Path | None = None, engine_bundles: list[str | Path] = ()) -> PackageResult:
    from mmopt import reference
    from mmopt.judge.parity import scores_of, tolerance_for

    progress = progress or Progress()
    t0 = time.perf_counter()
    bundle, out = Path(bundle), Path(out).resolve()
    manifest = Manifest.read_verified(bundle)
    unknown = sorted(set(policy or {}) - set(manifest.components))
    if unknown:
        raise UsageError(f"-p {unknown[0]}=...: no component '{unknown[0]}'; the bundle's components are "
                         f"{', '.join(manifest.components)}.")
    chosen = {c: (policy or {}).get(c, "fp32") for c in manifest.components}
    artifacts = {}
    for comp, prec in chosen.items():
        try:
            artifacts[comp] = manifest.artifact(comp, prec)
        except BundleError as e:
            raise UsageError(f"-p {comp}={prec}: {e} Convert it first (`mmopt quantize {bundle} -p {comp}={prec}`), "
                             "or package another precision.") from None
    archive = out.with_name(out.name + ".tar.gz")
    if sign_key is not None:
        _signing_ready(Path(sign_key))
    found, engine_notes = find_engines([bundle, *map(Path, engine_bundles)], artifacts)
    check_out(out, bundle)
    ref = reference.load(bundle, manifest, config, trust_checkpoint)
    spec, split = ref.spec, ref.split

    _sweep_archives(archive)
    tmp_archive = archive.with_name(f".{archive.name}.{os.getpid()}.partial")
    try:
        # the store's writer: one writer at a time, staged beside OUT, swapped in whole, repaired after a kill
        with transaction(out, log=progress.log, kind=PACKAGE) as stage:
            with progress.task(f"package {' '.join(f'{c}={p}' for c, p in chosen.items())}", 3) as advance:
                files = {}
                external: dict[str, dict[str, str]] = {}
                for comp, art in artifacts.items():
                    src = manifest.file(bundle, art)
                    shutil.copy2(src, stage / art.file)
                    files[art.file] = sha256_file(stage / art.file)
                    if files[art.file] != art.sha256:
                        raise BundleError(f"{src}: changed since the bundle was verified (sha256 differs from its "
                                          "manifest). Run `mmopt verify` and re-export.")
                    external[comp] = {}
                    for loc, data in external_data(src, comp).items():  # a graph over 2 GB keeps its weights beside it
                        rel = (PurePosixPath(art.file).parent / loc).as_posix()
                        if rel in files or rel in RESERVED:
                            raise UsageError(f"{data}: external data '{loc}' of component '{comp}' has the name of "
                                             "another packaged file; re-export with distinct data file names.")
                        (stage / rel).parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(data, stage / rel)
                        files[rel] = sha256_file(stage / rel)
                        recorded = (art.extra or {}).get("external_data") or {}
                        if recorded.get("file") == rel and recorded.get("sha256") != files[rel]:
                            raise BundleError(f"{data}: changed since the bundle was verified (sha256 differs from the "
                                              f"external data its manifest records for '{art.id}'). Re-export.")
                        external[comp][loc] = rel
                advance(1, doing="golden samples")
                golden_in, source = golden_inputs(spec, split)
                golden_out = _eager(ref.model, split, golden_in)
                buf = io.BytesIO()
                np.savez(buf, **{f"input/{k}": v for k, v in golden_in.items()},
                         **{f"output/{k}": v for k, v in golden_out.items()})
                (stage / "golden.npz").write_bytes(buf.getvalue())
                files["golden.npz"] = sha256_file(stage / "golden.npz")
                advance(1, doing="self-test with the runtime")
                doc = {"kind": KIND, "format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "policy": chosen,
                       "model": {"inputs": [t.to_json() for t in split.model_inputs],
                                 "outputs": [t.to_json() for t in split.model_outputs],
                                 "output_sources": dict(split.output_sources)},
                       "components": {c: {"file": artifacts[c].file, "precision": chosen[c], "kind": s.kind,
                                          **({"external_data": external[c]} if external[c] else {}),
                                          "inputs": [t.to_json() for t in s.inputs],
                                          "outputs": [t.to_json() for t in s.outputs],
                                          "calls": [[key, dict(src)] for key, src in s.calls()]}
                                      for c, s in _ordered(split.components).items()},
                       "files": files,
                       "golden": {"file": "golden.npz", "samples": int(next(iter(golden_in.values())).shape[0]),
                                  "source": source, "tolerance": tolerance_for(spec, split, chosen)("pipeline"),
                                  "scores": sorted(scores_of(spec, split, "pipeline"))},
                       "verified": {"parity": (manifest.results.get("parity") or {}).get(_parity_key(chosen)),
                                    "accuracy": _accuracy(manifest, chosen)},
                       "lineage": {"bundle": str(bundle.resolve()), "bundle_fingerprint": manifest.fingerprint(),
                                   "artifacts": {c: {"id": a.id, "sha256": a.sha256} for c, a in artifacts.items()},
                                   "factory": spec.factory, "mmopt": __version__}}
                doc["engines"] = add_engines(stage, doc, found)
                merged = add_merged(stage, doc)
                (stage / MANIFEST).write_text(json.dumps(doc, indent=1) + "\n")
                try:  # on ONNX Runtime: the reference the merged graph is checked against (engines: on the device)
                    split_pkg = Package.load(stage, merged=False, backend="onnxruntime")
                except PackageError as e:
                    raise BundleError(f"the package failed its own self-test before it was written: {e}") from None
                selftest = split_pkg.selftest_result
                if doc["merged"] is not None:
                    merged, served = check_merged(stage, doc, split_pkg, golden_in)
                    selftest = served or selftest
                if sign_key is not None:  # last: the signature covers every file as it will ship
                    try:
                        signing.sign(stage, sign_key)
                    except signing.SignatureError as e:
                        raise UsageError(str(e)) from None
                advance(1)
            # the archive from the staged folder, into a hidden sibling; moved into place just after the folder
            with tarfile.open(tmp_archive, "w:gz") as tar:
                tar.add(stage, arcname=out.name)
        os.replace(tmp_archive, archive)
    except BaseException:
        tmp_archive.unlink(missing_ok=True)
        raise
    return PackageResult(out, archive, doc, selftest, time.perf_counter() - t0, merged, engine_notes)


def find_engines(bundles: list[Path], artifacts: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """The TensorRT engines ``mmopt build`` made from exactly the graphs being packaged (``artifacts``: component
    -> ONNX artifact), in ``bundles[0]`` and in copies of it built on other devices, grouped into engine sets
    by what decides where an engine runs. Returns (the sets, each {key fields, components: component ->
    (engine path, sidecar)}, and notes on engines left out). An extra bundle that adds no engine is refused."""
    sets: dict[tuple, dict[str, Any]] = {}
    notes: list[str] = []
    for i, b in enumerate(bundles):
        try:
            m = Manifest.read_verified(b)
        except BundleError as e:
            if not i:
                raise
            raise UsageError(f"--engines {b}: {str(e).split(' Create one with', 1)[0]} Give a copy of the bundle "
                             "that `mmopt build` ran in on the target device.") from None
        added = 0
        for comp, art in artifacts.items():
            eng = m.find(comp, art.precision, stage="engine")
            if eng is None:
                continue
            side = eng.extra or {}
            try:
                key = set_key(side)
                source = side["source_onnx"]["sha256"]
            except (KeyError, TypeError) as e:
                notes.append(f"{b}: engine {eng.file} left out: its record lacks {e}; rebuild it with `mmopt build`")
                continue
            version, _, cc, platform, _, hw = key
            if not (re.fullmatch(r"\d+(\.\d+)*", str(version)) and re.fullmatch(r"\d+\.\d+", str(cc)) and
                    re.fullmatch(r"[a-z0-9_]+-[a-z0-9_]+", str(platform)) and hw in HARDWARE_LEVELS):
                notes.append(f"{b}: engine {eng.file} left out: its record's TensorRT version {version!r}, compute "
                             f"capability {cc!r}, platform {platform!r} or hardware compatibility {hw!r} is not one "
                             "`mmopt build` writes; rebuild it")
                continue
            if source != art.sha256:
                notes.append(f"{b}: engine {eng.file} left out: it was built from another {comp} graph than the "
                             f"{art.precision} one packaged; rebuild it with `mmopt build`")
                continue
            added += 1
            s = sets.setdefault(key, {"key": key, "side": side, "components": {}})
            if comp in s["components"]:  # the same bundle twice, or two copies built on one kind of device
                notes.append(f"{b}: engine {eng.file} left out: set {set_id(key)} has one for {comp} already, "
                             f"from {s['components'][comp][0]}")
                continue
            s["components"][comp] = (m.file(b, eng), side)
        if i and not added:
            raise UsageError(f"--engines {b}: holds no TensorRT engine built from the graphs being packaged "
                             f"({', '.join(f'{c}={a.precision}' for c, a in artifacts.items())}). Copy the bundle to "
                             "the device, run `mmopt build` there, and pass that copy.")
    return list(sets.values()), notes


def add_engines(stage: Path, doc: dict[str, Any], found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copy each set's engines into ``stage/engines/<set id>/``, hashed into ``doc["files"]`` and checked against
    the sha256 their build recorded; the manifest's ``engines`` list."""
    out, ids = [], set()
    for s in found:
        sid, side = set_id(s["key"]), s["side"]
        if sid in ids:  # two GPU names with one slug: told apart by the key's digest
            sid = f"{sid}-{hashlib.sha256(repr(s['key']).encode()).hexdigest()[:6]}"
        ids.add(sid)
        entry = {"id": sid, "tensorrt": {"version": side["tensorrt"]["version"]},
                 "gpu": {"name": side["gpu"]["name"], "compute_capability": side["gpu"]["compute_capability"]},
                 "platform": side["platform"], "l4t": side.get("l4t"),
                 "build_options": {"version_compatible": bool(side["build_options"]["version_compatible"]),
                                   "hardware_compatibility": side["build_options"]["hardware_compatibility"]},
                 "components": {}}
        for comp, (path, meta) in s["components"].items():
            rel = f"engines/{sid}/{comp}.engine"
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, stage / rel)
            digest = sha256_file(stage / rel)
            if digest != meta.get("engine", {}).get("sha256"):
                raise BundleError(f"{path}: sha256 differs from the one its build recorded (changed since `mmopt "
                                  "build`). Rebuild it.")
            doc["files"][rel] = digest
            entry["components"][comp] = {"file": rel, "onnx_sha256": doc["files"][doc["components"][comp]["file"]],
                                         "built_at": meta.get("built_at")}
        out.append(entry)
    return out


def _signing_ready(key: Path) -> None:
    """Before any work: model-signing imports and the key is an unencrypted PEM elliptic-curve private key
    (signing comes last)."""
    if not key.is_file():
        raise UsageError(f"--sign-key {key}: no such file. Give a PEM elliptic-curve private key (e.g. `openssl "
                         "ecparam -name prime256v1 -genkey -noout -out key.pem`; its public half, for the devices: "
                         "`openssl ec -in key.pem -pubout -out public.pem`).")
    try:
        signing._lib()
    except signing.SignatureError as e:
        raise UsageError(f"--sign-key: {e}") from None
    from cryptography.hazmat.primitives.asymmetric import ec  # model-signing's own dependency
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        loaded = load_pem_private_key(key.read_bytes(), password=None)
    except (ValueError, TypeError) as e:  # not PEM, encrypted, or unsupported
        raise UsageError(f"--sign-key {key}: cannot sign with it ({e}). Give an unencrypted PEM elliptic-curve "
                         "private key.") from None
    if not isinstance(loaded, ec.EllipticCurvePrivateKey):
        raise UsageError(f"--sign-key {key}: not an elliptic-curve key ({type(loaded).__name__}); model-signing's "
                         "key mode signs with elliptic-curve keys (e.g. `openssl ecparam -name prime256v1 -genkey -noout -out "
                         "key.pem`).")


def add_merged(stage: Path, doc: dict[str, Any]) -> dict[str, Any]:
    """The components joined into one graph (``mmopt.stages.merge``), written into ``stage`` and named in
    ``doc["merged"]``; or ``doc["merged"] = None`` and why."""
    import onnx

    from mmopt.stages.merge import MergeError, merge

    doc["merged"] = None
    calls = sum(len(spec["calls"]) for spec in doc["components"].values())
    if calls < 2:
        return {"reason": "one component call: its graph already is the whole model"}
    name = next(n for n in ("merged.onnx", *(f"merged.{i}.onnx" for i in range(2, 99))) if n not in doc["files"])
    size = sum(len(spec["calls"]) * sum((stage / f).stat().st_size
                                        for f in [spec["file"], *spec.get("external_data", {}).values()])
               for spec in doc["components"].values())
    if size > 2 ** 31 - 1:  # before loading anything: the joined graph could not be one protobuf anyway
        return {"reason": f"the joined graph would be {size / 2 ** 30:.1f} GiB, over protobuf's 2 GiB"}
    try:
        proto = merge(doc["components"], doc["model"],
                      {c: onnx.load(str(stage / spec["file"])) for c, spec in doc["components"].items()})
        onnx.save(proto, str(stage / name))
    except MergeError as e:
        return {"reason": str(e)}
    except Exception as e:  # onnx raising on what merge did not foresee: the split graphs still serve
        return {"reason": f"onnx could not join the graphs ({type(e).__name__}: {e})"}
    doc["files"][name] = sha256_file(stage / name)
    doc["merged"] = {"file": name}
    return {"file": name}


def check_merged(stage: Path, doc: dict[str, Any], split: Package,
                 golden: dict[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The merged graph against the split pipeline on the golden inputs, with the policy's gate: (what was
    kept, the merged package's own self-test result). On a mismatch the merged graph is dropped (the split
    graphs serve) and the reason returned, with no self-test result."""
    from mmopt_runtime.compare import failures, measure

    try:
        whole = Package.load(stage, backend="onnxruntime")  # its own golden self-test too: what ONNX Runtime serves
        want, got = split.infer(golden), whole.infer(golden)
        scores = set(doc["golden"]["scores"])
        why = [f"{n}: {'; '.join(w)}" for n in want
               for w in [failures(measure(n, want[n], got[n], n in scores), doc["golden"]["tolerance"])] if w]
        reason = f"the merged graph differs from the split pipeline ({'; '.join(why)})" if why else None
    except PackageError as e:  # e.g. an op ONNX Runtime refuses only once the graphs are joined
        reason = f"the merged graph does not run: {e}"
    if reason:
        (stage / doc["merged"]["file"]).unlink()
        del doc["files"][doc["merged"]["file"]]
        doc["merged"] = None
        (stage / MANIFEST).write_text(json.dumps(doc, indent=1) + "\n")
        return {"reason": reason}, None
    return {"file": doc["merged"]["file"],
            "vs_split": max(float(np.max(np.abs(want[n].astype(np.float64) - got[n].astype(np.float64))))
                            if want[n].size else 0.0 for n in want)}, whole.selftest_result


def external_data(path: Path, comp: str) -> dict[str, Path]:
    """The external data files ``path``'s graph names (location -> file), each a plain path beside it."""
    import onnx

    from mmopt.stages.graph import external_locations
    from mmopt_runtime.paths import escape

    proto = onnx.load(str(path), load_external_data=False)
    out = {}
    for loc in external_locations(proto):
        data, problem = escape(path.parent, loc, "graph's folder")
        if problem or not data.is_file():
            raise BundleError(f"{path}: component '{comp}' names external data '{loc}', which "
                              f"{problem or 'is missing'}. Re-export the bundle.")
        out[loc] = data
    return out


def _ordered(components: dict[str, Any]) -> dict[str, Any]:
    """Encoders first, then the fusion: the order the pipeline runs them in (the runtime orders by wiring)."""
    return {**{c: s for c, s in components.items() if s.kind == "encoder"},
            **{c: s for c, s in components.items() if s.kind != "encoder"}}


def _parity_key(policy: dict[str, str]) -> str:
    from mmopt.precision.convert import parity_key

    return parity_key(policy)


def _accuracy(manifest: Manifest, policy: dict[str, str]) -> Any:
    from mmopt.precision.convert import policy_label

    acc = manifest.results.get("accuracy") or {}
    return acc.get(policy_label(policy)) if isinstance(acc, dict) else None


def _sweep_archives(archive: Path) -> None:
    """Archives half-written by runs that are gone (``.<name>.tar.gz.<pid>.partial``) are removed."""
    for p in archive.parent.glob(f".{archive.name}.*.partial"):
        pid = p.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not _alive(int(pid)):
            p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_out(out: Path, bundle: Path) -> None:
    if out == bundle.resolve() or bundle.resolve() in out.parents:
        raise UsageError(f"-o {out}: a package cannot be written inside its bundle. Choose a folder beside it.")
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or PACKAGE.mine(out))):
        raise UsageError(f"-o {out}: exists and is not an mmopt package; refusing to replace it. Choose a new "
                         "folder.")
    archive = out.with_name(out.name + ".tar.gz")
    aside = writers_left(out, ("old",))  # a run killed mid-commit: the transaction puts its old package back
    if archive.exists() and not out.exists() and not aside:
        raise UsageError(f"-o {out}: {archive.name} exists beside it but no package does; move it away or choose "
                         "another name.")


def manifest_kind(path: Path) -> Any:
    """The ``kind`` a JSON manifest declares (None when unreadable): what mmopt wrote a folder as."""
    try:
        return json.loads(path.read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


PACKAGE = Kind("package", MANIFEST, lambda p: manifest_kind(p / MANIFEST) == KIND, "pkg")


def golden_inputs(spec: Any, split: Any) -> tuple[dict[str, np.ndarray], str]:
    """A few real full-model samples: [evaluation] data, else [calibration], else the opt-size capture."""
    from mmopt.data import read

    for kind in ("evaluation", "calibration"):
        if getattr(spec, kind) is not None:
            for inputs, _ in read(spec, kind, GOLDEN_ROWS):
                return {k: np.ascontiguousarray(v[:GOLDEN_ROWS]) for k, v in inputs.items()}, \
                    f"{kind}: {getattr(spec, kind).source}"
    run = split.runs["opt"]
    return {k: v.detach().cpu().numpy() for k, v in run.inputs.items()}, "random inputs at the opt size"


def _eager(model: Any, split: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from mmopt.runners.eager import EagerRunner

    with EagerRunner(model, split.model_inputs, split.model_outputs) as runner:
        return runner.infer(feeds, check=False)
