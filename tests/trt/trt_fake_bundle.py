"""A tiny two-component bundle (image + text encoders) with fp32 and fp16 ONNX graphs, for TensorRT tests.

The graphs are real, valid ONNX (ONNX Runtime runs them) so graph inspection and manifests behave as
with an exported model; no TensorRT is needed to make them.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mmopt.manifest import Manifest, sha256_file
from mmopt.spec import ComponentSpec, TensorSpec
from mmopt.trt import device
from mmopt_runtime.trt import api
from mmopt.jobs.build import BuildEnvironment

IMAGE = ComponentSpec(
    "image", "encoder", "image_encoder",
    (TensorSpec("pixel_values", "float32", ("batch", 3, 8, 8),
                {"min": (1, 3, 8, 8), "opt": (4, 3, 8, 8), "max": (8, 3, 8, 8)}),),
    (TensorSpec("image_emb", "float32", ("batch", 4), {"min": (1, 4), "opt": (4, 4), "max": (8, 4)}),),
    {"pixel_values": "input:pixel_values"})
TEXT = ComponentSpec(
    "text", "encoder", "text_encoder",
    (TensorSpec("input_ids", "int64", ("batch", "seq"), {"min": (1, 2), "opt": (4, 6), "max": (8, 12)}, (0, 9)),),
    (TensorSpec("text_hidden", "float32", ("batch", "seq", 4),
                {"min": (1, 2, 4), "opt": (4, 6, 4), "max": (8, 12, 4)}),),
    {"input_ids": "input:input_ids"})
COMPONENTS = {"image": IMAGE, "text": TEXT}


def _image_graph(fp16: bool) -> onnx.ModelProto:
    wt = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float16 if fp16 else np.float32)
    nodes = [helper.make_node("Cast", ["pixel_values"], ["x"], name="cast_in", to=TensorProto.FLOAT16)] if fp16 \
        else [helper.make_node("Identity", ["pixel_values"], ["x"], name="id_in")]
    nodes += [helper.make_node("ReduceMean", ["x", "axes"], ["pooled"], name="pool", keepdims=0),
              helper.make_node("MatMul", ["pooled", "w"], ["y"], name="proj")]
    nodes += [helper.make_node("Cast", ["y"], ["image_emb"], name="cast_out", to=TensorProto.FLOAT)] if fp16 \
        else [helper.make_node("Identity", ["y"], ["image_emb"], name="id_out")]
    graph = helper.make_graph(
        nodes, "image",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("image_emb", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(wt, "w"), numpy_helper.from_array(np.array([2, 3], np.int64), "axes")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _text_graph(fp16: bool, extra_nodes: list | None = None) -> onnx.ModelProto:
    table = np.random.default_rng(1).standard_normal((10, 4)).astype(np.float16 if fp16 else np.float32)
    out = "h16" if fp16 else "text_hidden"
    nodes = [helper.make_node("Gather", ["table", "input_ids"], [out], name="embed")]
    if fp16:
        nodes.append(helper.make_node("Cast", ["h16"], ["text_hidden"], name="cast_out", to=TensorProto.FLOAT))
    graph = helper.make_graph(
        nodes + (extra_nodes or []), "text",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("text_hidden", TensorProto.FLOAT, ["batch", "seq", 4])],
        [numpy_helper.from_array(table, "table")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def make_bundle(folder: str | Path, precisions: tuple[str, ...] = ("fp32", "fp16")) -> Path:
    """Write the bundle into ``folder`` (created) and return it."""
    folder = Path(folder).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    config = folder.parent / f"{folder.name}.mmopt.toml"  # a manifest records the config it came from
    config.write_text('[model]\nfactory = "fake:model"\n')
    manifest = Manifest(model={"config": str(config), "config_sha256": sha256_file(config), "checkpoint": None,
                               "checkpoint_sha256": None, "factory": "fake:model", "output_sources": {"image_emb": "image:image_emb",
                                                                          "text_hidden": "text:text_hidden"}},
                        model_inputs=[IMAGE.inputs[0], TEXT.inputs[0]],
                        model_outputs=[IMAGE.outputs[0], TEXT.outputs[0]], components=dict(COMPONENTS))
    for prec in precisions:
        fp16 = prec == "fp16"
        for name, graph in (("image", _image_graph(fp16)), ("text", _text_graph(fp16))):
            file = f"{name}.onnx" if prec == "fp32" else f"{name}.{prec}.onnx"
            onnx.save(graph, str(folder / file))
            stage = "export" if prec == "fp32" else "precision"
            parent = None if prec == "fp32" else f"{name}/export/fp32"
            manifest.add(folder, name, stage, prec, file, parent=parent)
    manifest.write(folder)
    return folder


def add_int8_dynamic_text(folder: Path) -> None:
    """An ``int8-dynamic`` text graph holding a MatMulInteger node (an op TensorRT cannot import)."""
    extra = [helper.make_node("MatMulInteger", ["a", "b"], ["c"], name="/text/MatMulInteger_3")]
    g = _text_graph(False, extra)
    g.graph.input.extend([helper.make_tensor_value_info("a", TensorProto.UINT8, [2, 2]),
                          helper.make_tensor_value_info("b", TensorProto.UINT8, [2, 2])])
    onnx.save(g, str(folder / "text.int8-dynamic.onnx"))
    m = Manifest.read(folder)
    m.add(folder, "text", "precision", "int8-dynamic", "text.int8-dynamic.onnx", parent="text/export/fp32")
    m.write(folder)


# ---- a fake engine writer: TensorRT cannot exist on development / CI machines -------------------

FAKE_ENV = BuildEnvironment("10.3.0.30", device.GpuInfo("FAKE Orin", "8.7", 0, True, "fake"), "linux-aarch64",
                            "R36.3.0")


class FakeEngineWriter:
    """Stands in for api.build_engine (TensorRT cannot exist here): records calls, returns fake bytes."""

    def __init__(self, fail_on: str | None = None):
        self.calls: list[tuple[str, list[str], bytes | None]] = []
        self.options: list[Any] = []  # the BuildOptions of each call, for tests that check the CLI passed them
        self.fail_on = fail_on

    def __call__(self, onnx_path, profiles, options, timing_cache):
        name = Path(onnx_path).name
        self.calls.append((name, [p.name for p in profiles], timing_cache))
        self.options.append(options)
        if name == self.fail_on:
            raise RuntimeError(f"fake build failure on {name}")
        cache = None if timing_cache is None else timing_cache + f"[{name}]".encode()
        return api.BuiltEngine(f"FAKE ENGINE from {name}".encode(), cache, "new" if not timing_cache else "reused",
                               {"in": "FLOAT"}, {"out": "FLOAT"}, ["a TensorRT warning"])


# ---- a package of the fake bundle, with engine sets of fake engines ---------------------------------

def fake_engine_set(version: str, cc: str, platform: str, vc: bool = False, hw: str = "none",
                    gpu: str = "FAKE Orin") -> tuple:
    """The key ``mmopt.jobs.package.find_engines`` groups engines by, and the build record they share."""
    from mmopt_runtime.engines import set_key

    side = {"tensorrt": {"version": version}, "gpu": {"name": gpu, "compute_capability": cc}, "platform": platform,
            "l4t": None, "build_options": {"version_compatible": vc, "hardware_compatibility": hw},
            "built_at": "2026-12-01T00:00:00+00:00"}
    return set_key(side), side


def make_package(folder: str | Path, bundle: Path, sets: list[tuple] = (), components: tuple[str, ...] = ("image", "text"),
                 precision: str = "fp16") -> Path:
    """A package of the fake bundle's ``precision`` graphs (as ``mmopt package`` lays one out) holding one engine
    set per ``fake_engine_set`` in ``sets``. The engines are FAKE bytes ("FAKE ENGINE from <graph>"): TensorRT
    cannot exist here. The golden outputs are ONNX Runtime's on the graphs (no eager model exists for a fake)."""
    import io as _io

    import onnxruntime as ort

    from mmopt.jobs.package import add_engines
    from mmopt_runtime.package import FORMAT, KIND, MANIFEST

    folder = Path(folder)
    folder.mkdir(parents=True)
    m = Manifest.read(bundle)
    files, comps, golden_in, golden_out = {}, {}, {}, {}
    for name in components:
        art = m.artifact(name, precision)
        spec = COMPONENTS[name]
        (folder / art.file).write_bytes((bundle / art.file).read_bytes())
        files[art.file] = sha256_file(folder / art.file)
        comps[name] = {"file": art.file, "precision": precision, "kind": spec.kind,
                       "inputs": [t.to_json() for t in spec.inputs], "outputs": [t.to_json() for t in spec.outputs],
                       "calls": [[k, dict(src)] for k, src in spec.calls()]}
        t = spec.inputs[0]
        feed = np.zeros(t.shapes["opt"], np.float32) if t.dtype == "float32" else \
            np.arange(int(np.prod(t.shapes["opt"])), dtype=np.int64).reshape(t.shapes["opt"]) % 10
        golden_in[t.name] = feed
        sess = ort.InferenceSession(str(folder / art.file), providers=["CPUExecutionProvider"])
        golden_out[spec.outputs[0].name] = sess.run(None, {t.name: feed})[0]
    buf = _io.BytesIO()
    np.savez(buf, **{f"input/{k}": v for k, v in golden_in.items()}, **{f"output/{k}": v for k, v in golden_out.items()})
    (folder / "golden.npz").write_bytes(buf.getvalue())
    files["golden.npz"] = sha256_file(folder / "golden.npz")
    model_in = [COMPONENTS[c].inputs[0] for c in components]
    model_out = [COMPONENTS[c].outputs[0] for c in components]
    tol = {"max_abs": 1e-3, "max_rel": 1e-2, "min_cosine": 0.999, "min_argmax": 0.0, "max_norm_change": 0.05}
    doc = {"kind": KIND, "format": FORMAT, "policy": {c: precision for c in components},
           "model": {"inputs": [t.to_json() for t in model_in], "outputs": [t.to_json() for t in model_out],
                     "output_sources": {t.name: f"{c}:{t.name}" for c, t in zip(components, model_out)}},
           "components": comps, "files": files,
           "golden": {"file": "golden.npz", "samples": 4, "source": "fake", "tolerance": tol, "scores": []},
           "merged": None, "lineage": {"bundle": str(bundle)}}
    found = []
    tmp = folder.parent / f".{folder.name}-engines"
    tmp.mkdir(exist_ok=True)
    for key, side in sets:
        members = {}
        for name in components:
            data = f"FAKE ENGINE from {name}.{precision}.onnx".encode()
            path = tmp / f"{'-'.join(map(str, key))}.{name}.engine"
            path.write_bytes(data)
            members[name] = (path, {**side, "engine": {"sha256": hashlib.sha256(data).hexdigest()}})
        found.append({"key": key, "side": side, "components": members})
    doc["engines"] = add_engines(folder, doc, found)
    (folder / MANIFEST).write_text(json.dumps(doc, indent=1) + "\n")
    return folder
