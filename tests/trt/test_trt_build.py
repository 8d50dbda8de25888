"""``build_engines`` around TensorRT: preflight, sources, sidecars, manifest, atomicity. No TensorRT here:
the engine writer is a fake (``fake_engine_writer``) that returns placeholder bytes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mmopt.errors import BundleError, UsageError
from mmopt.manifest import Manifest
from mmopt.jobs import build
from mmopt.trt import device
from mmopt_runtime.trt import api
from mmopt.jobs.build import BuildEnvironment, build_engines, preflight, source_artifacts
from mmopt.trt.errors import OnnxParseError, TensorRTUnavailable
from mmopt.trt.options import BuildOptions
from trt_fake_bundle import FAKE_ENV, FakeEngineWriter, add_int8_dynamic_text, make_bundle

@pytest.fixture
def bundle(tmp_path):
    return make_bundle(tmp_path / "bundle")


@pytest.fixture
def fake(monkeypatch):
    writer = FakeEngineWriter()
    monkeypatch.setattr(build, "preflight", lambda: FAKE_ENV)
    monkeypatch.setattr(api, "build_engine", writer)
    return writer


def test_preflight_without_tensorrt_or_gpu_says_how_to_build_on_the_target(monkeypatch):
    monkeypatch.setattr(device, "current_gpu", lambda index=0: None)
    with pytest.raises(TensorRTUnavailable) as e:
        preflight()
    msg, err = str(e.value), e.value
    assert err.exit_code == 1
    assert "TensorRT cannot be imported" in msg and "no NVIDIA GPU is visible" in msg
    for hint in ("target device", "identical GPU and software image", "JetPack", "pip install -e '.[tensorrt]'",
                 "copy the bundle", "mmopt build BUNDLE"):
        assert hint in msg


def test_preflight_names_only_what_is_missing(monkeypatch):
    monkeypatch.setattr(api, "tensorrt_version", lambda: "10.3.0")
    monkeypatch.setattr(device, "current_gpu", lambda index=0: None)
    with pytest.raises(TensorRTUnavailable) as e:
        preflight()
    assert "no NVIDIA GPU" in str(e.value) and "cannot be imported" not in str(e.value)
    monkeypatch.setattr(device, "current_gpu", lambda index=0: FAKE_ENV.gpu)
    assert preflight().gpu.name == "FAKE Orin"


def test_build_refuses_before_reading_the_bundle(tmp_path, monkeypatch):
    monkeypatch.setattr(device, "current_gpu", lambda index=0: None)
    with pytest.raises(TensorRTUnavailable):
        build_engines(tmp_path / "does-not-exist", "fp16")


def test_engines_sidecars_and_manifest_entries(bundle, fake, tmp_path):
    cache = tmp_path / "cache" / "trt.cache"
    opts = BuildOptions(workspace_mib=512, timing_cache=cache, profiles=({"batch": 1},), sparse_weights=True,
                        hardware_compatibility="ampere+", version_compatible=True, optimization_level=4)
    arts = build_engines(bundle, "fp16", opts)
    assert [a.file for a in arts] == ["image.fp16.engine", "text.fp16.engine"]
    assert [c[:2] for c in fake.calls] == [("image.fp16.onnx", ["captured", "batch=1"]),
                                           ("text.fp16.onnx", ["captured", "batch=1"])]
    assert fake.calls[1][2] == b"[image.fp16.onnx]"  # the cache made by one build feeds the next
    assert cache.read_bytes() == b"[image.fp16.onnx][text.fp16.onnx]"

    m = Manifest.read_verified(bundle)
    art = m.by_id("image/engine/fp16")
    assert (art.stage, art.parent, art.precision) == ("engine", "image/precision/fp16", "fp16")
    side = json.loads((bundle / "image.fp16.engine.json").read_text())
    assert side == art.extra
    assert side["engine"]["sha256"] == art.sha256 and side["engine"]["bytes"] == art.bytes
    assert side["source_onnx"] == {"artifact": "image/precision/fp16", "file": "image.fp16.onnx",
                                   "sha256": m.by_id("image/precision/fp16").sha256}
    assert side["tensorrt"] == {"version": "10.3.0.30"}
    assert side["gpu"] == {"name": "FAKE Orin", "compute_capability": "8.7", "integrated": True}
    assert (side["platform"], side["l4t"]) == ("linux-aarch64", "R36.3.0")
    assert [p["name"] for p in side["profiles"]] == ["captured", "batch=1"]
    assert side["profiles"][1]["shapes"]["pixel_values"] == {"min": [1, 3, 8, 8], "opt": [1, 3, 8, 8],
                                                             "max": [1, 3, 8, 8]}
    assert side["graph_precision"]["requested"] == "fp16" and side["graph_precision"]["found"] == "fp16"
    assert side["build_options"] == {**opts.to_json()} and side["build_options"]["strongly_typed"] is True
    assert side["timing_cache"]["sha256_before"] is None and len(side["timing_cache"]["sha256"]) == 64
    assert isinstance(side["build_seconds"], float) and side["built_at"].endswith("+00:00")
    assert side["warnings"] == ["a TensorRT warning"]
    assert m.tools["tensorrt"] == "10.3.0.30"


def test_every_precision_when_none_is_given_and_rebuilds_replace_entries(bundle, fake):
    assert [a.id for a in build_engines(bundle, None, BuildOptions(timing_cache=None))] == [
        "image/engine/fp32", "image/engine/fp16", "text/engine/fp32", "text/engine/fp16"]
    build_engines(bundle, "fp32", BuildOptions(timing_cache=None))
    m = Manifest.read(bundle)
    assert sum(a.stage == "engine" for a in m.artifacts) == 4
    # a second run must build from ONNX graphs, never from engines the first run added
    assert all(name.endswith(".onnx") for name, _, _ in fake.calls)
    assert fake.calls[-1][2] is None  # timing cache disabled


def test_a_failed_build_leaves_the_bundle_exactly_as_it_was(bundle, fake, monkeypatch):
    build_engines(bundle, "fp16", BuildOptions(timing_cache=None))
    before = {p.name: (p.read_bytes(), p.stat().st_ino) for p in bundle.iterdir()}
    monkeypatch.setattr(api, "build_engine", FakeEngineWriter(fail_on="text.fp16.onnx"))
    with pytest.raises(RuntimeError, match="fake build failure"):
        build_engines(bundle, "fp16", BuildOptions(timing_cache=None))
    after = {p.name: (p.read_bytes(), p.stat().st_ino) for p in bundle.iterdir()}
    assert after == before  # staged files are hard links: engines must be replaced, never written through
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".bundle.")]


def test_source_selection_errors(bundle):
    m = Manifest.read(bundle)
    with pytest.raises(BundleError, match="no int8 ONNX graph for component.s. image, text. It has: image/fp16"):
        source_artifacts(m, "int8")
    with pytest.raises(UsageError, match="TensorRT does not import"):
        source_artifacts(m, "int8-dynamic")


def test_ops_tensorrt_cannot_import_are_named_before_any_build(bundle, fake):
    add_int8_dynamic_text(bundle)
    m = Manifest.read(bundle)
    assert "int8-dynamic" not in {a.precision for a in source_artifacts(m, None)}
    # force the graph in as if it were the fp16 one: the pre-check must name node and op type
    shutil.copy(bundle / "text.int8-dynamic.onnx", bundle / "text.fp16.onnx")
    m.add(bundle, "text", "precision", "fp16", "text.fp16.onnx", parent="text/export/fp32")
    m.write(bundle)
    with pytest.raises(OnnxParseError) as e:
        build_engines(bundle, "fp16", BuildOptions(timing_cache=None))
    assert "node '/text/MatMulInteger_3' (MatMulInteger, domain ai.onnx)" in str(e.value)
    assert fake.calls == []


def test_option_and_profile_errors_come_before_building(bundle, fake, monkeypatch):
    with pytest.raises(UsageError, match="outside the captured range"):
        build_engines(bundle, "fp16", BuildOptions(profiles=({"batch": 99},), timing_cache=None))
    with pytest.raises(UsageError, match="--hardware-compat must be one of"):
        build_engines(bundle, "fp16", BuildOptions(hardware_compatibility="turing+"))
    old = BuildEnvironment("10.3.0", device.GpuInfo("Tesla T4", "7.5"), "linux-x86_64")
    monkeypatch.setattr(build, "preflight", lambda: old)
    with pytest.raises(UsageError, match="ampere\\+ needs an Ampere or newer GPU to build on"):
        build_engines(bundle, "fp16", BuildOptions(hardware_compatibility="ampere+", timing_cache=None))
    assert fake.calls == []


def test_precision_warnings_when_the_graph_does_not_hold_the_precision(bundle, fake):
    m = Manifest.read(bundle)  # register the fp32 graph as "fp16": no float16 tensors inside
    m.add(bundle, "image", "precision", "fp16", "image.onnx", parent="image/export/fp32")
    m.write(bundle)
    (art,) = [a for a in build_engines(bundle, "fp16", BuildOptions(timing_cache=None)) if a.component == "image"]
    assert art.extra["graph_precision"]["found"] == "fp32"
    assert "holds no float16 tensors" in art.extra["warnings"][0]
