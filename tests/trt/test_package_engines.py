"""TensorRT engine sets in a package: ``mmopt package`` takes the engines ``mmopt build`` made from exactly the
packaged graphs (in the bundle and in copies of it built on other devices), one set per GPU / TensorRT version /
flags; the runtime picks the set that runs here, else a version-compatible one, else builds into its cache
(full TensorRT), else runs ONNX Runtime and says why; tampered engines and sets built from other graphs are
refused by name.

No TensorRT or GPU exists here: the engines are FAKE bytes from ``FakeEngineWriter``, "this device" is an
``Environment`` the test gives, and the engine cache's builder is the fake writer. The same decisions run against
NVIDIA's real bindings (full and lean) in test_api_conformance.py.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mmopt import api
from mmopt.errors import UsageError
from mmopt.jobs import build
from mmopt.jobs.build import BuildEnvironment, build_engines
from mmopt.jobs.package import find_engines
from mmopt.manifest import Manifest
from mmopt.trt import device
from mmopt.trt.options import BuildOptions
from mmopt_runtime import Package, PackageError, engines
from mmopt_runtime.trt import api as trt_api
from mmopt_runtime.trt.compat import Environment
from trt_fake_bundle import FAKE_ENV, FakeEngineWriter

TESTS = Path(__file__).resolve().parents[1]
ORIN = FAKE_ENV  # TensorRT 10.3.0.30, FAKE Orin 8.7, linux-aarch64
H200 = BuildEnvironment("11.4.0.106", device.GpuInfo("FAKE H200", "9.0", 0, False, "fake"), "linux-x86_64")
ON_ORIN = Environment("10.3.0.30", "FAKE Orin", "8.7", "linux-aarch64")
ON_H200 = Environment("11.4.0.106", "FAKE H200", "9.0", "linux-x86_64")


def built(bundle: Path, env: BuildEnvironment, monkeypatch, **options) -> None:
    """``mmopt build`` of every precision the bundle holds, as on ``env`` (FAKE engines)."""
    with monkeypatch.context() as m:
        m.setattr(build, "preflight", lambda: env)
        m.setattr(trt_api, "build_engine", FakeEngineWriter())
        build_engines(bundle, None, BuildOptions(timing_cache=None, **options))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    sys.path.insert(0, str(TESTS))
    from models.toy import CONFIG

    d = tmp_path_factory.mktemp("engines")
    for name in ("toy.py", "toydata.py"):
        shutil.copy(TESTS / "models" / name, d / name)
    (d / "mmopt.toml").write_text(CONFIG.format(checkpoint="", extra=(
        '[evaluation]\nsource = "toydata:evaluation_batches"\noutput = "output"\n')))
    api.export(d / "mmopt.toml", d / "bundle")
    yield d / "bundle"
    for mod in ("toy", "toydata"):
        sys.modules.pop(mod, None)


@pytest.fixture
def bundles(exported, tmp_path, monkeypatch):
    """The bundle built on a FAKE Orin, and a copy of it built on a FAKE H200 (version-compatible)."""
    orin, h200 = tmp_path / "orin-build", tmp_path / "h200-build"
    shutil.copytree(exported, orin)
    shutil.copytree(exported, h200)
    built(orin, ORIN, monkeypatch)
    built(h200, H200, monkeypatch, version_compatible=True)
    return orin, h200


@pytest.fixture
def pkg(bundles, tmp_path):
    orin, h200 = bundles
    return api.package(orin, None, tmp_path / "pkg", engine_bundles=[h200])


def test_the_package_holds_one_engine_set_per_device_built_from_its_graphs(pkg):
    doc = pkg.manifest
    assert [s["id"] for s in doc["engines"]] == ["trt10.3.0.30-sm8.7-fake-orin-linux-aarch64",
                                                 "trt11.4.0.106-sm9.0-fake-h200-linux-x86_64-vc"]
    orin, h200 = doc["engines"]
    assert orin["gpu"] == {"name": "FAKE Orin", "compute_capability": "8.7"} and orin["l4t"] == "R36.3.0"
    assert orin["build_options"] == {"version_compatible": False, "hardware_compatibility": "none"}
    assert h200["build_options"]["version_compatible"] is True
    for s in doc["engines"]:
        assert sorted(s["components"]) == sorted(doc["components"])
        for comp, e in s["components"].items():
            assert e["file"] == f"engines/{s['id']}/{comp}.engine"
            assert (pkg.folder / e["file"]).read_bytes() == f"FAKE ENGINE from {comp}.onnx".encode()
            assert e["onnx_sha256"] == doc["files"][doc["components"][comp]["file"]] == \
                doc["lineage"]["artifacts"][comp]["sha256"]
            assert e["file"] in doc["files"]  # hashed like every file
    assert pkg.engine_notes == []
    # packaged on this machine (no TensorRT): self-tested on ONNX Runtime, the ONNX graphs still there
    assert pkg.selftest["backend"]["backend"] == "onnxruntime"


def test_the_runtime_picks_the_exact_set_then_a_version_compatible_one_and_names_every_refusal(pkg):
    sets = pkg.manifest["engines"]
    chosen, warnings, refused = engines.choose_set(sets, ON_ORIN, lean=False)
    assert chosen["id"] == "trt10.3.0.30-sm8.7-fake-orin-linux-aarch64" and warnings == []
    assert list(refused) == ["trt11.4.0.106-sm9.0-fake-h200-linux-x86_64-vc"]
    assert any("linux-x86_64" in r for r in refused["trt11.4.0.106-sm9.0-fake-h200-linux-x86_64-vc"])
    # a later TensorRT 11 on the H200: only the version-compatible set can run
    later = Environment("11.5.0.1", "FAKE H200", "9.0", "linux-x86_64")
    chosen, _, refused = engines.choose_set(sets, later, lean=False)
    assert chosen["id"] == "trt11.4.0.106-sm9.0-fake-h200-linux-x86_64-vc"
    assert "loads only in the exact version that built it" in " ".join(refused["trt10.3.0.30-sm8.7-fake-orin-linux-aarch64"])
    # another SM: nothing runs, and each set says what did not match
    chosen, _, refused = engines.choose_set(sets, Environment("11.4.0.106", "FAKE L4", "8.9", "linux-x86_64"), False)
    assert chosen is None and sorted(refused) == sorted(s["id"] for s in sets)
    assert "compute capability 9.0" in " ".join(refused["trt11.4.0.106-sm9.0-fake-h200-linux-x86_64-vc"])
    # the lean runtime runs only version-compatible engines
    chosen, _, refused = engines.choose_set(sets, ON_ORIN, lean=True)
    assert chosen is None
    assert "lean runtime runs only version-compatible engines" in refused["trt10.3.0.30-sm8.7-fake-orin-linux-aarch64"][-1]


def test_the_plan_serves_the_chosen_sets_bytes(pkg, monkeypatch):
    monkeypatch.setattr(engines, "environment", lambda index=0: (object(), ON_H200))
    doc = pkg.manifest
    data = {rel: (pkg.folder / rel).read_bytes() for rel in doc["files"]}
    plan = engines.plan(doc, data, "auto")
    assert plan.backend == "tensorrt" and plan.source == "version-compatible engine set " \
                                                         "trt11.4.0.106-sm9.0-fake-h200-linux-x86_64-vc"
    assert plan.engines == {c: (f"FAKE ENGINE from {c}.onnx".encode(), True) for c in doc["components"]}
    assert plan.to_json()["on_tensorrt"] == sorted(doc["components"]) and plan.tensorrt == "11.4.0.106"


def test_without_tensorrt_the_runtime_serves_onnx_runtime_and_says_why(pkg):
    p = Package.load(pkg.folder)
    assert p.plan.backend == "onnxruntime" and p.plan.engines == {}
    assert p.plan.why == ["TensorRT cannot be imported: neither tensorrt nor tensorrt_lean is installed"]
    assert p.selftest_result["backend"]["why"] == p.plan.why and p.graph == "merged"
    with pytest.raises(PackageError) as e:
        Package.load(pkg.folder, backend="tensorrt")
    assert "--backend tensorrt: no TensorRT engine can run here: TensorRT cannot be imported" in str(e.value)
    assert Package.load(pkg.folder, backend="onnxruntime").plan.why == ["asked for ONNX Runtime"]
    with pytest.raises(PackageError, match="backend 'cuda': use one of auto, tensorrt, onnxruntime, onnxruntime-cuda"):
        Package.load(pkg.folder, backend="cuda")
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():  # this machine: CPU onnxruntime
        with pytest.raises(PackageError, match=r"--backend onnxruntime-cuda: onnxruntime \S+ here has no "
                                               r"CUDAExecutionProvider \(.*CPUExecutionProvider.*\)\. Install "
                                               r"onnxruntime-gpu"):
            Package.load(pkg.folder, backend="onnxruntime-cuda")


def test_mmopt_run_says_which_backend_serves(pkg):
    run = [sys.executable, "-m", "mmopt_runtime.cli", "selftest", str(pkg.folder)]
    r = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "note: ONNX Runtime serves: TensorRT cannot be imported" in r.stderr
    assert json.loads(r.stdout)["backend"]["backend"] == "onnxruntime"
    r = subprocess.run(run + ["--backend", "tensorrt"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "--backend tensorrt: no TensorRT engine can run here" in r.stderr


def test_a_tampered_engine_or_a_set_built_from_another_graph_is_refused_by_name(pkg):
    doc = json.loads((pkg.folder / "package.json").read_text())
    engine = pkg.folder / doc["engines"][0]["components"]["image"]["file"]
    data = engine.read_bytes()
    engine.write_bytes(data[:-1] + b"!")
    with pytest.raises(PackageError, match=rf"{engine}: sha256 differs from the package manifest"):
        Package.load(pkg.folder)
    engine.write_bytes(data)
    bad = json.loads(json.dumps(doc))
    bad["engines"][0]["components"]["image"]["onnx_sha256"] = "0" * 64
    (pkg.folder / "package.json").write_text(json.dumps(bad))
    with pytest.raises(PackageError, match=r"field 'engines\[0\].components.image.onnx_sha256' is not the sha256 "
                                           r"of that component's packaged graph"):
        Package.load(pkg.folder)
    bad = json.loads(json.dumps(doc))
    bad["engines"][1]["components"]["text"]["file"] = "../outside.engine"
    bad["files"]["../outside.engine"] = "0" * 64
    (pkg.folder / "package.json").write_text(json.dumps(bad))
    with pytest.raises(PackageError, match=r"field 'files.../outside.engine'.*outside"):
        Package.load(pkg.folder)
    for change, field in ((lambda s: s.pop("gpu"), r"engines\[1\]"),
                          (lambda s: s["tensorrt"].update(version="ten"), r"engines\[1\]"),
                          (lambda s: s["build_options"].update(hardware_compatibility="any"), r"engines\[1\]"),
                          (lambda s: s.update(id=doc["engines"][0]["id"]), r"engines\[1\].id"),
                          (lambda s: s["components"].update(audio=s["components"]["text"]),
                           r"engines\[1\].components.audio")):
        bad = json.loads(json.dumps(doc))
        change(bad["engines"][1])
        (pkg.folder / "package.json").write_text(json.dumps(bad))
        with pytest.raises(PackageError, match=rf"field '{field}'"):
            Package.load(pkg.folder)


def test_engines_from_other_graphs_are_left_out_and_an_extra_bundle_without_any_is_refused(bundles, exported,
                                                                                            tmp_path):
    orin, h200 = bundles
    m = Manifest.read(orin)
    arts = {c: m.artifact(c, "fp32") for c in m.components}
    stale = {**arts, "image": m.artifact("image", "fp32").__class__(**{**vars(arts["image"]), "sha256": "f" * 64})}
    sets, notes = find_engines([orin], stale)
    assert sorted(sets[0]["components"]) == sorted(c for c in m.components if c != "image")
    assert notes == [f"{orin}: engine image.fp32.engine left out: it was built from another image graph than the "
                     "fp32 one packaged; rebuild it with `mmopt build`"]
    with pytest.raises(UsageError, match=rf"--engines {exported}: holds no TensorRT engine built from the graphs"):
        api.package(orin, None, tmp_path / "pkg", engine_bundles=[exported])
    with pytest.raises(UsageError, match=rf"--engines {tmp_path / 'nope'}: .*not an mmopt bundle.*Give a copy of the "
                                         "bundle that `mmopt build` ran in"):
        api.package(orin, None, tmp_path / "pkg", engine_bundles=[tmp_path / "nope"])
    assert not (tmp_path / "pkg").exists()


def test_a_package_without_engine_sets_still_serves_everywhere(exported, tmp_path):
    r = api.package(exported, None, tmp_path / "pkg")
    assert r.manifest["engines"] == [] and Package.load(r.folder).plan.backend == "onnxruntime"


# ---- engines built on the device, cached -------------------------------------------------------------

def test_full_tensorrt_builds_missing_engines_into_a_cache_keyed_by_graph_version_and_gpu(pkg, tmp_path,
                                                                                          monkeypatch):
    """FAKE: the builder is FakeEngineWriter (TensorRT cannot exist here); what is checked is the cache."""
    writer = FakeEngineWriter()
    monkeypatch.setattr(trt_api, "build_engine", writer)
    doc = pkg.manifest
    data = {rel: (pkg.folder / rel).read_bytes() for rel in doc["files"]}
    l4 = Environment("10.3.0.30", "FAKE L4", "8.9", "linux-x86_64")  # no set matches this GPU
    monkeypatch.setattr(engines, "environment", lambda index=0: (object(), l4))
    cache, heard = tmp_path / "cache", []
    plan = engines.plan(doc, data, "auto", engine_cache=cache, log=heard.append)
    assert plan.backend == "tensorrt" and plan.source.startswith(f"engines built here into {cache}")
    assert heard == [f"building the {c} engine for FAKE L4 with TensorRT 10.3.0.30, once: it is kept in {cache}"
                     for c in doc["components"]]
    assert sorted(plan.refused) == sorted(s["id"] for s in doc["engines"])
    assert [c[0] for c in writer.calls] == [Path(doc["components"][c]["file"]).name for c in doc["components"]]
    entries = sorted(p.name for p in cache.iterdir() if not p.name.startswith("."))
    assert len(entries) == len(doc["components"])
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith(".")) == sorted(f".{e}.lock" for e in entries)
    assert all(len(e) == 40 and set(e) <= set("0123456789abcdef") for e in entries)  # the key, nothing else
    record = json.loads((cache / entries[0] / "record.json").read_text())
    assert record["onnx_sha256"] == doc["files"][doc["components"][record["component"]]["file"]]
    assert record["tensorrt"] == {"version": "10.3.0.30"} and record["gpu"]["compute_capability"] == "8.9"
    # again: found, not built
    again = engines.plan(doc, data, "auto", engine_cache=cache)
    assert again.source.startswith("engines found in the engine cache") and len(writer.calls) == len(entries)
    assert again.engines == plan.engines
    # a corrupted entry is rebuilt and replaced whole; what a killed build of it left (a stage, a tomb) goes
    (cache / entries[0] / "engine.plan").write_bytes(b"garbage")
    (cache / f".{entries[0]}.dead0001.partial").mkdir()
    (cache / f".{entries[0]}.dead0001.stale").mkdir()
    (cache / f".{entries[0]}.dead0001.stale" / "engine.plan").write_bytes(b"old")
    again = engines.plan(doc, data, "auto", engine_cache=cache)
    assert len(writer.calls) == len(entries) + 1 and again.backend == "tensorrt"
    assert engines._cached(cache / entries[0], entries[0]) is not None
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith(".")) == sorted(f".{e}.lock" for e in entries)
    # an entry that is a file (not a folder) is replaced too
    (cache / entries[1]).rename(tmp_path / "moved")
    (cache / entries[1]).write_bytes(b"not a folder")
    assert engines.plan(doc, data, "auto", engine_cache=cache).backend == "tensorrt"
    assert (cache / entries[1]).is_dir() and engines._cached(cache / entries[1], entries[1]) is not None
    # another GPU model of the same compute capability gets its own entries (its own tuning)
    monkeypatch.setattr(engines, "environment", lambda index=0: (object(), Environment("10.3.0.30", "FAKE L4 (2)",
                                                                                       "8.9", "linux-x86_64")))
    engines.plan(doc, data, "auto", engine_cache=cache)
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 2 * len(entries)
    monkeypatch.setattr(engines, "environment", lambda index=0: (object(), l4))
    monkeypatch.setattr(engines, "environment", lambda index=0: (object(), Environment("10.3.1", "FAKE L4", "8.9",
                                                                                       "linux-x86_64")))
    engines.plan(doc, data, "auto", engine_cache=cache)
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 3 * len(entries)


def test_a_build_that_fails_on_the_device_falls_back_or_refuses(pkg, tmp_path, monkeypatch):
    from mmopt_runtime.trt.errors import EngineBuildError

    def fail(*a, **k):
        raise EngineBuildError("image.onnx: TensorRT 10.3.0.30 could not build an engine")

    monkeypatch.setattr(trt_api, "build_engine", fail)
    monkeypatch.setattr(engines, "environment",
                        lambda index=0: (object(), Environment("10.3.0.30", "FAKE L4", "8.9", "linux-x86_64")))
    doc = pkg.manifest
    data = {rel: (pkg.folder / rel).read_bytes() for rel in doc["files"]}
    plan = engines.plan(doc, data, "auto", engine_cache=tmp_path / "cache")
    assert plan.backend == "onnxruntime" and "building engines here from its ONNX graphs failed: image.onnx: " \
                                                  "TensorRT 10.3.0.30 could not build an engine" in plan.why[0]
    with pytest.raises(engines.NoEngine, match=r"(?s)--backend tensorrt.*engine set trt10.3.0.30-sm8.7-fake-orin"):
        engines.plan(doc, data, "tensorrt", engine_cache=tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]  # nothing half-written


def test_cpu_only_components_stay_on_onnx_runtime(pkg, monkeypatch):
    monkeypatch.setattr(engines, "environment", lambda index=0: (object(), ON_ORIN))
    doc = json.loads(json.dumps(pkg.manifest))
    first = next(iter(doc["components"]))
    doc["components"][first]["precision"] = "int8-dynamic"
    data = {rel: (pkg.folder / rel).read_bytes() for rel in doc["files"]}
    plan = engines.plan(doc, data, "auto")
    assert first not in plan.engines and plan.engines
    assert f"{first} is int8-dynamic, an ONNX Runtime-only precision: ONNX Runtime runs it" in plan.why


# ---- Triton: a package's engine sets as tensorrt_plan members -------------------------------------------

def test_triton_serves_the_engines_that_load_in_the_servers_tensorrt_as_plans(pkg, tmp_path):
    pytest.importorskip("tritonclient.grpc", reason="the triton extra (Triton's model-config schema) is missing")
    from mmopt.triton import validate

    r = api.triton(pkg.folder, None, tmp_path / "repo", tensorrt="10.3.0.30", platform="linux-aarch64")  # Jetson
    comps = pkg.manifest["components"]
    for comp in comps:
        c = r.report.models[r.plan.members[comp].name].config
        assert c.platform == "tensorrt_plan" and dict(c.cc_model_filenames) == {"8.7": "model_sm87.plan"}
        version = r.folder / r.plan.members[comp].name / "1"
        assert sorted(p.name for p in version.iterdir()) == ["model_sm87.plan"]  # no ONNX graph beside it
        assert (version / "model_sm87.plan").read_bytes() == f"FAKE ENGINE from {comp}.onnx".encode()
    marker = json.loads((r.folder / validate.MARKER).read_text())
    assert marker["tensorrt"] == "10.3.0.30"
    # a later TensorRT 11: only the H200's version-compatible set loads there
    r = api.triton(pkg.folder, None, tmp_path / "repo11", tensorrt="11.5.0")
    c = r.report.models[r.plan.members[next(iter(comps))].name].config
    assert dict(c.cc_model_filenames) == {"9.0": "model_sm90.plan"}
    assert "--backend-config=tensorrt,version-compatible=true" in r.plan.members[next(iter(comps))].note
    # a plan changed after writing is caught by --check, like a graph
    plan = r.folder / r.plan.members[next(iter(comps))].name / "1" / "model_sm90.plan"
    plan.write_bytes(b"changed")
    with pytest.raises(Exception, match="model_sm90.plan: sha256 differs from mmopt-triton.json"):
        validate.check(r.folder)


def test_triton_tensorrt_refusals_name_what_the_package_has(pkg, tmp_path):
    pytest.importorskip("tritonclient.grpc", reason="the triton extra (Triton's model-config schema) is missing")
    with pytest.raises(UsageError, match=r"--tensorrt 9\.0\.1 --platform linux-x86_64: no engine set of the package "
                                         r"loads in TensorRT 9\.0\.1 on linux-x86_64 \(its sets: "
                                         r"trt10\.3\.0\.30-sm8\.7-fake-orin-linux-aarch64, "
                                         r"trt11\.4\.0\.106-sm9\.0-fake-h200-linux-x86_64-vc\)"):
        api.triton(pkg.folder, None, tmp_path / "repo", tensorrt="9.0.1")
    with pytest.raises(UsageError, match="on linux-x86_64"):  # the Orin's set is not for an x86 server
        api.triton(pkg.folder, None, tmp_path / "repo", tensorrt="10.3.0.30")
    with pytest.raises(UsageError, match="TensorRT plans run on GPU instances"):
        api.triton(pkg.folder, None, tmp_path / "repo", tensorrt="10.3.0.30", kind="cpu")
    with pytest.raises(UsageError, match="TensorRT plans are served by Triton's TensorRT backend"):
        api.triton(pkg.folder, None, tmp_path / "repo", backend="python", tensorrt="10.3.0.30")
    assert not (tmp_path / "repo").exists()


# ---- review cases: duplicates, ranking, partial sets, concurrency, what must be present ------------------

def test_two_devices_of_one_compute_capability_give_two_sets_and_a_repeated_copy_is_noted(bundles, exported,
                                                                                          tmp_path, monkeypatch):
    orin, _ = bundles
    nano = tmp_path / "nano-build"
    shutil.copytree(exported, nano)
    built(nano, BuildEnvironment("10.3.0.30", device.GpuInfo("FAKE Orin Nano", "8.7", 0, True, "fake"),
                                 "linux-aarch64", "R36.3.0"), monkeypatch)
    r = api.package(orin, None, tmp_path / "pkg", engine_bundles=[nano, orin])
    assert [s["id"] for s in r.manifest["engines"]] == ["trt10.3.0.30-sm8.7-fake-orin-linux-aarch64",
                                                       "trt10.3.0.30-sm8.7-fake-orin-nano-linux-aarch64"]
    assert len(r.engine_notes) == len(r.manifest["components"])  # the bundle again: each engine noted once
    assert all("has one for" in n for n in r.engine_notes)
    # on a Nano the Nano's set runs (no warning), on the AGX its own
    nano_env = Environment("10.3.0.30", "FAKE Orin Nano", "8.7", "linux-aarch64")
    chosen, warnings, _ = engines.choose_set(r.manifest["engines"], nano_env, False)
    assert chosen["id"].endswith("orin-nano-linux-aarch64") and warnings == []
    chosen, warnings, _ = engines.choose_set(r.manifest["engines"], ON_ORIN, False)
    assert chosen["id"] == "trt10.3.0.30-sm8.7-fake-orin-linux-aarch64" and warnings == []


def test_a_set_covering_more_components_wins_and_what_it_lacks_is_built_here(pkg, tmp_path, monkeypatch):
    """FAKE builder (FakeEngineWriter): TensorRT cannot exist here."""
    doc = json.loads(json.dumps(pkg.manifest))
    orin = next(s for s in doc["engines"] if "orin" in s["id"])
    first = next(iter(doc["components"]))
    partial = json.loads(json.dumps(orin))
    partial["id"] = "partial"
    del partial["components"][first]
    doc["engines"] = [partial, orin]
    chosen, _, _ = engines.choose_set(doc["engines"], ON_ORIN, False, list(doc["components"]))
    assert chosen["id"] == orin["id"]
    doc["engines"] = [partial]
    data = {rel: (pkg.folder / rel).read_bytes() for rel in doc["files"]}
    writer = FakeEngineWriter()
    monkeypatch.setattr(trt_api, "build_engine", writer)
    monkeypatch.setattr(engines, "environment", lambda index=0: (object(), ON_ORIN))
    plan = engines.plan(doc, data, "tensorrt", engine_cache=tmp_path / "cache")
    assert sorted(plan.engines) == sorted(doc["components"]) and [c[0] for c in writer.calls] == [
        Path(doc["components"][first]["file"]).name]
    assert plan.source == f"engine set partial; engines for {first} built here into {tmp_path / 'cache'} (no engine " \
                          f"for {first} in the package)"
    # the lean runtime cannot build the missing one: auto serves it on ONNX Runtime, tensorrt refuses
    monkeypatch.setattr(trt_api, "is_lean", lambda trt: True)
    for s in doc["engines"]:
        s["build_options"]["version_compatible"] = True
    plan = engines.plan(doc, data, "auto", engine_cache=tmp_path / "cache2")
    assert first not in plan.engines and plan.engines and f"ONNX Runtime runs {first}" in plan.why[0]
    with pytest.raises(engines.NoEngine, match="lean runtime .* cannot build engines"):
        engines.plan(doc, data, "tensorrt", engine_cache=tmp_path / "cache2")


def test_two_loads_build_an_engine_once_the_second_waits(pkg, tmp_path, monkeypatch):
    """Two threads load the same package into one cache at once (FAKE, slow builder): one builds, the other
    waits on the key's lock and takes the built entry."""
    import threading
    import time

    calls = []

    def slow(onnx_path, profiles, options, cache):
        calls.append(Path(onnx_path).name)
        time.sleep(0.3)
        return trt_api.BuiltEngine(b"FAKE ENGINE built here", None, "disabled", {}, {}, [])

    monkeypatch.setattr(trt_api, "build_engine", slow)
    env = Environment("10.3.0.30", "FAKE L4", "8.9", "linux-x86_64")
    doc = pkg.manifest
    data = {rel: (pkg.folder / rel).read_bytes() for rel in doc["files"]}
    comp = next(iter(doc["components"]))
    heard, out = [], []
    threads = [threading.Thread(target=lambda: out.append(engines.cached_engine(doc, data, comp, env, tmp_path / "c",
                                                                                heard.append)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == [b"FAKE ENGINE built here"] * 2 and len(calls) == 1
    assert any(h.startswith(f"waiting for another process building the {comp} engine") for h in heard)


def test_tensorrt_without_cuda_python_is_not_chosen(monkeypatch):
    from mmopt_runtime.trt import device as rt_device

    monkeypatch.setattr(trt_api, "load", lambda: object())

    def missing():
        raise ImportError("No module named 'cuda'")

    monkeypatch.setattr(rt_device, "cudart", missing)
    from mmopt_runtime.trt.errors import TensorRTUnavailable

    with pytest.raises(TensorRTUnavailable, match="cuda-python is not .* pip install cuda-python"):
        engines.environment()


def test_engine_set_fields_must_be_strings(pkg):
    doc = json.loads(json.dumps(pkg.manifest))
    doc["engines"][0]["gpu"]["compute_capability"] = 8.7
    (pkg.folder / "package.json").write_text(json.dumps(doc))
    with pytest.raises(PackageError, match=r"field 'engines\[0\]' is not an engine set"):
        Package.load(pkg.folder)


def test_set_ids_stay_distinct_and_a_set_covering_nothing_is_not_chosen(exported, tmp_path):
    """Two GPU names that slug alike get two ids (FAKE engines, a package of the fake bundle)."""
    from trt_fake_bundle import fake_engine_set, make_bundle, make_package

    fb = make_bundle(tmp_path / "fb")
    folder = make_package(tmp_path / "fp", fb, [fake_engine_set("10.3.0.30", "8.7", "linux-aarch64",
                                                                gpu="NVIDIA Jetson AGX Orin"),
                                                fake_engine_set("10.3.0.30", "8.7", "linux-aarch64",
                                                                gpu="Jetson AGX Orin")])
    doc = json.loads((folder / "package.json").read_text())
    ids = [s["id"] for s in doc["engines"]]
    assert ids[0] == "trt10.3.0.30-sm8.7-jetson-agx-orin-linux-aarch64" and ids[1].startswith(ids[0] + "-")
    assert Package.load(folder).plan.backend == "onnxruntime"  # the package is valid: ids unique, files apart
    env = Environment("10.3.0.30", "Jetson AGX Orin", "8.7", "linux-aarch64")
    assert engines.choose_set(doc["engines"], env, False, ["fusion"])[0] is None  # covers neither image nor text
