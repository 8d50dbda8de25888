"""TensorRTRunner logic around TensorRT: checks before loading, profile choice, buffers, CUDA graphs.

TensorRT and a GPU cannot exist here, so ``FakeSession`` stands in for ``api.EngineSession`` (the part
that calls TensorRT, checked against the real bindings by test_api_conformance.py) and
``FakeDeviceMemory`` for torch / cuda-python memory.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from mmopt.errors import BundleError, UsageError
from mmopt.runners import tensorrt as trt_runner
from mmopt.jobs import build
from mmopt_runtime.trt import api
from mmopt.jobs.build import build_engines
from mmopt_runtime.trt.compat import Environment
from mmopt.trt.errors import EngineIncompatible, EngineLoadError
from mmopt_runtime.trt.errors import NoProfileFits
from mmopt.trt.options import BuildOptions
from trt_fake_bundle import COMPONENTS, FAKE_ENV, FakeEngineWriter, make_bundle
from trt_scenarios import FakeDeviceMemory

HERE = Environment(FAKE_ENV.tensorrt, FAKE_ENV.gpu.name, FAKE_ENV.gpu.compute_capability, FAKE_ENV.platform)


class FakeSession:
    """Stands in for api.EngineSession: I/O and profiles from the fake bundle's spec, records every call."""

    instances: list["FakeSession"] = []

    def __init__(self, engine: bytes, allow_host_code: bool = False, name: str = "engine"):
        comp = COMPONENTS[name.split(".")[0]]
        self.engine, self.allow_host_code, self.calls = engine, allow_host_code, []
        self.io = [api.IOTensor(t.name, t.dtype, tuple(-1 if isinstance(d, str) else d for d in t.shape), True)
                   for t in comp.inputs] + \
                  [api.IOTensor(t.name, t.dtype, tuple(-1 if isinstance(d, str) else d for d in t.shape), False)
                   for t in comp.outputs]
        side = json.loads(FakeSession.bundle.joinpath(f"{name}.json").read_text())
        self.profiles = [{n: (tuple(s["min"]), tuple(s["opt"]), tuple(s["max"])) for n, s in p["shapes"].items()}
                         for p in side["profiles"]]
        self.comp, self.active_profile = comp, 0
        FakeSession.instances.append(self)

    def set_profile(self, index: int, stream: int) -> None:
        self.calls.append(("set_profile", index))
        self.active_profile = index

    def set_input_shapes(self, shapes):
        self.calls.append(("shapes", dict(shapes)))
        sizes = {d: s for t in self.comp.inputs for d, s in zip(t.shape, shapes[t.name])}
        return {t.name: tuple(sizes.get(d, d) for d in t.shape) for t in self.comp.outputs}

    def bind(self, name: str, address: int) -> None:
        self.calls.append(("bind", name, address))

    def enqueue(self, stream: int) -> None:
        self.calls.append(("enqueue", stream))

    def close(self) -> None:
        self.calls.append(("close",))


@pytest.fixture
def bundle(tmp_path, monkeypatch):
    b = make_bundle(tmp_path / "bundle")
    monkeypatch.setattr(build, "preflight", lambda: FAKE_ENV)
    monkeypatch.setattr(api, "build_engine", FakeEngineWriter())
    build_engines(b, "fp16", BuildOptions(timing_cache=None, profiles=({"batch": 1},)))
    FakeSession.bundle, FakeSession.instances = b, []
    monkeypatch.setattr(api, "EngineSession", FakeSession)
    monkeypatch.setattr(trt_runner, "running_environment", lambda index=0: HERE)
    return b


def runner(bundle, component="image", **kw):
    return trt_runner.TensorRTRunner.from_bundle(bundle, component, "fp16", memory=FakeDeviceMemory(), **kw)


def test_runs_with_the_narrowest_profile_and_binds_every_tensor(bundle):
    with runner(bundle) as r:
        out = r.infer({"pixel_values": np.zeros((4, 3, 8, 8), np.float32)})
        assert out["image_emb"].shape == (4, 4)
        r.infer({"pixel_values": np.zeros((1, 3, 8, 8), np.float32)})
    s = FakeSession.instances[-1]
    assert ("set_profile", 1) in s.calls  # batch=1 profile chosen for a batch of one
    assert [c[1] for c in s.calls if c[0] == "bind"] == ["pixel_values", "image_emb"] * 2
    assert s.calls[-1] == ("close",) and s.allow_host_code is False


def test_cuda_graph_is_captured_once_per_shape_and_replayed(bundle):
    mem = FakeDeviceMemory()
    r = trt_runner.TensorRTRunner.from_bundle(bundle, "text", "fp16", memory=mem, cuda_graph=True)
    with r:
        for shape in [(2, 5), (2, 5), (2, 5), (3, 7)]:
            assert r.infer({"input_ids": np.zeros(shape, np.int64)})["text_hidden"].shape == (*shape, 4)
    assert (mem.captures, mem.replays) == (2, 4)


def test_feeds_are_checked_against_the_spec_first(bundle):
    with runner(bundle) as r, pytest.raises(UsageError, match="outside the exported range"):
        r.infer({"pixel_values": np.zeros((9, 3, 8, 8), np.float32)})


def test_incompatible_engine_is_refused_before_tensorrt_sees_it(bundle, monkeypatch):
    monkeypatch.setattr(trt_runner, "running_environment",
                        lambda index=0: Environment("10.3.0.30", "NVIDIA A100", "8.0", "linux-x86_64"))
    with pytest.raises(EngineIncompatible, match="built on linux-aarch64, this is linux-x86_64"):
        runner(bundle).__enter__()
    assert FakeSession.instances == []


def test_tampered_engine_is_refused(bundle):
    (bundle / "image.fp16.engine").write_bytes(b"something else")
    with pytest.raises(EngineLoadError, match="sha256 differs from its sidecar"):
        runner(bundle).__enter__()


def test_sidecar_file_is_used_without_a_manifest_entry(bundle):
    spec = COMPONENTS["image"]
    with trt_runner.TensorRTRunner(bundle / "image.fp16.engine", spec.inputs, spec.outputs,
                                   memory=FakeDeviceMemory()) as r:
        assert r.name == "image"
    (bundle / "image.fp16.engine.json").unlink()
    with pytest.raises(EngineLoadError, match="no sidecar image.fp16.engine.json"):
        trt_runner.TensorRTRunner(bundle / "image.fp16.engine", spec.inputs, spec.outputs,
                                  memory=FakeDeviceMemory()).__enter__()


def test_missing_engine_names_the_build_command(bundle):
    with pytest.raises(BundleError, match="mmopt build .* --precision fp32"):
        trt_runner.TensorRTRunner.from_bundle(bundle, "image", "fp32")


def test_engine_io_must_match_the_component(bundle, monkeypatch):
    spec = COMPONENTS["text"]  # text's spec against the image engine
    with pytest.raises(EngineLoadError, match="does not match component 'text'"):
        trt_runner.TensorRTRunner(bundle / "image.fp16.engine", spec.inputs, spec.outputs, name="text",
                                  memory=FakeDeviceMemory()).__enter__()


def test_no_gpu_at_run_time_is_a_clear_error(monkeypatch):
    from mmopt.trt import device

    monkeypatch.setattr(api, "tensorrt_version", lambda: "10.3.0")
    monkeypatch.setattr(device, "current_gpu", lambda index=0: None)
    with pytest.raises(trt_runner.TensorRTUnavailable, match="ONNX Runtime instead"):
        trt_runner.running_environment()


# ---- the data path: device bytes, dtypes and CUDA-graph replays -----------------------------------

class BytesMemory:
    """Device memory kept as host arrays (no GPU here): real bytes per address, the engine's dtype applied
    on ``put``, stable addresses while a buffer fits. A captured graph replays the kernels it recorded, with
    the addresses bound at capture time, as a CUDA graph does."""

    kind = "fake-bytes"
    stream = 0x5EED

    def __init__(self):
        self.at: dict[int, np.ndarray] = {}
        self.address: dict[str, int] = {}
        self.recording: list | None = None
        self.captures = self.replays = 0

    def _alloc(self, name, shape, dtype):
        a = self.address.get(name)
        if a is None or self.at[a].shape != tuple(shape) or self.at[a].dtype != np.dtype(dtype):
            a = self.address[name] = 0x1000 * (len(self.at) + 1)
            self.at[a] = np.zeros(shape, dtype)
        return a

    def put(self, name, array, dtype):
        a = self._alloc(name, array.shape, dtype)
        self.at[a][...] = np.asarray(array).astype(dtype)
        return a

    def empty(self, name, shape, dtype):
        return self._alloc(name, shape, dtype)

    def get(self, name):
        return self.at[self.address[name]].copy()

    def capture(self, fn):
        self.recording = []
        fn()
        graph, self.recording = self.recording, None
        self.captures += 1
        return graph

    def replay(self, graph):
        self.replays += 1
        for kernel in graph:
            kernel()

    def close(self):
        pass


def expected(feeds: dict[str, np.ndarray], shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """What ComputingSession's engine computes: per row, the sum of every input's row, broadcast."""
    rows = sum(a.reshape(a.shape[0], -1).astype(np.float64).sum(1) for a in feeds.values())
    return np.broadcast_to(rows.reshape(-1, *[1] * (len(shape) - 1)), shape).astype(dtype)


class ComputingSession(FakeSession):
    """FakeSession whose engine computes: it reads its inputs at the bound device addresses and writes its
    outputs there, on the runner's stream, and refuses what TensorRT would (an unbound tensor, a shape not
    set since the last profile switch, another stream)."""

    memory: BytesMemory

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.bound, self.shapes, self.out_shapes = {}, {}, {}

    def set_profile(self, index, stream):
        assert stream == self.memory.stream
        super().set_profile(index, stream)
        self.shapes = {}

    def set_input_shapes(self, shapes):
        self.shapes = {n: tuple(s) for n, s in shapes.items()}
        self.out_shapes = super().set_input_shapes(shapes)
        return self.out_shapes

    def bind(self, name, address):
        super().bind(name, address)
        self.bound[name] = address

    def enqueue(self, stream):
        super().enqueue(stream)
        assert stream == self.memory.stream, "enqueued on another stream than the memory's"
        bound, shapes, outs = dict(self.bound), dict(self.shapes), dict(self.out_shapes)
        names_in = [t.name for t in self.io if t.is_input]

        def kernel():
            mem = self.memory
            assert set(shapes) == set(names_in), "input shapes not set since the last profile switch"
            ins = {n: mem.at[bound[n]] for n in names_in}
            assert all(ins[n].shape == shapes[n] for n in names_in)
            for t in self.io:
                if not t.is_input:
                    out = mem.at[bound[t.name]]
                    assert out.shape == outs[t.name] and out.dtype == np.dtype(t.dtype)
                    out[...] = expected(ins, out.shape, t.dtype)

        if self.memory.recording is not None:
            self.memory.recording.append(kernel)
        else:
            kernel()


@pytest.fixture
def computing(bundle, monkeypatch):
    mem = BytesMemory()
    ComputingSession.memory = mem
    monkeypatch.setattr(api, "EngineSession", ComputingSession)
    return mem


def test_outputs_are_computed_from_this_calls_inputs_at_every_profile(bundle, computing):
    rng = np.random.default_rng(0)
    with trt_runner.TensorRTRunner.from_bundle(bundle, "image", "fp16", memory=computing) as r:
        for batch in (4, 1, 3, 1):  # profile switches both ways
            feeds = {"pixel_values": rng.standard_normal((batch, 3, 8, 8)).astype(np.float32)}
            out = r.infer(feeds)["image_emb"]
            np.testing.assert_allclose(out, expected(feeds, (batch, 4), "float32"), rtol=1e-6)
    s = FakeSession.instances[-1]
    assert [c[1] for c in s.calls if c[0] == "set_profile"] == [1, 0, 1]  # only when the profile changes


def test_integer_inputs_reach_the_engine_in_its_dtype(bundle, computing):
    ids = np.arange(10, dtype=np.int64).reshape(2, 5) * 7
    with trt_runner.TensorRTRunner.from_bundle(bundle, "text", "fp16", memory=computing) as r:
        out = r.infer({"input_ids": ids})["text_hidden"]
    assert computing.at[computing.address["input_ids"]].dtype == np.int64
    np.testing.assert_allclose(out, expected({"input_ids": ids}, (2, 5, 4), "float32"))


def test_cuda_graph_replays_read_the_new_inputs_and_recapture_on_a_new_shape(bundle, computing):
    rng = np.random.default_rng(1)
    with trt_runner.TensorRTRunner.from_bundle(bundle, "text", "fp16", memory=computing, cuda_graph=True) as r:
        for shape in [(2, 5), (2, 5), (2, 5), (3, 7), (3, 7)]:
            feeds = {"input_ids": rng.integers(0, 50, shape).astype(np.int64)}  # new values every call
            out = r.infer(feeds)["text_hidden"]
            np.testing.assert_allclose(out, expected(feeds, (*shape, 4), "float32"))
    assert (computing.captures, computing.replays) == (2, 5)


# ---- loading: the environment asked for, the defaults, and the exact refusals ----------------------

def test_running_environment_is_this_tensorrt_gpu_and_platform(monkeypatch):
    from mmopt.trt import device

    asked = []
    monkeypatch.setattr(api, "tensorrt_version", lambda: "10.3.0.30")
    monkeypatch.setattr(device, "current_gpu", lambda index=0: asked.append(index) or device.GpuInfo("Orin", "8.7"))
    monkeypatch.setattr(device, "platform_tag", lambda: "linux-aarch64")
    assert trt_runner.running_environment(2) == Environment("10.3.0.30", "Orin", "8.7", "linux-aarch64")
    assert asked == [2]
    monkeypatch.setattr(device, "current_gpu", lambda index=0: None)
    with pytest.raises(trt_runner.TensorRTUnavailable) as e:
        trt_runner.running_environment(1)
    assert str(e.value) == ("no NVIDIA GPU 1 is visible here: TensorRT engines only run on the GPU type they were "
                            "built for. Run the bundle's ONNX graphs with ONNX Runtime instead.")


def test_defaults_and_what_loading_asks_for(bundle, monkeypatch):
    made, envs = [], []
    monkeypatch.setattr(trt_runner, "make_memory", lambda kind, index: made.append((kind, index)) or BytesMemory())
    monkeypatch.setattr(trt_runner, "running_environment", lambda index=0: envs.append(index) or HERE)
    r = trt_runner.TensorRTRunner.from_bundle(bundle, "image", "fp16")
    assert (r.name, r.device_index, r.memory, r.cuda_graph, r.warnings) == ("image", 0, "auto", False, [])
    assert r.sidecar is not None and r.sidecar["build_options"]["version_compatible"] is False
    with r:
        assert made == [("auto", 0)] and envs == [0]
        assert r._engine is not None and [p.name for p in r._engine.profiles] == ["0", "1"]
    assert r._engine is None
    with trt_runner.TensorRTRunner.from_bundle(bundle, "text", "fp16", device_index=1, memory="cuda-python"):
        assert made[-1] == ("cuda-python", 1) and envs[-1] == 1


def test_a_version_compatible_engine_is_loaded_with_host_code_allowed(bundle):
    build_engines(bundle, "fp16", BuildOptions(timing_cache=None, version_compatible=True))
    with runner(bundle):
        assert FakeSession.instances[-1].allow_host_code is True
    build_engines(bundle, "fp16", BuildOptions(timing_cache=None))
    with runner(bundle):
        assert FakeSession.instances[-1].allow_host_code is False


def test_load_refusals_exactly(bundle, monkeypatch):
    monkeypatch.setattr(trt_runner, "running_environment",
                        lambda index=0: Environment("10.3.0.30", "NVIDIA A100", "8.0", "linux-x86_64"))
    with pytest.raises(EngineIncompatible) as e:
        runner(bundle).__enter__()
    assert str(e.value).startswith("image.fp16.engine cannot run here:\n  the engine was built on linux-aarch64")
    monkeypatch.setattr(trt_runner, "running_environment", lambda index=0: HERE)
    (bundle / "image.fp16.engine").write_bytes(b"other")
    with pytest.raises(EngineLoadError) as e:
        runner(bundle).__enter__()
    assert str(e.value) == ("image.fp16.engine: sha256 differs from its sidecar (modified or from another build); "
                            "refusing to load it. Rebuild with `mmopt build`.")
    (bundle / "image.fp16.engine").unlink()
    with pytest.raises(EngineLoadError) as e:
        runner(bundle).__enter__()
    assert str(e.value) == f"{bundle / 'image.fp16.engine'}: engine file missing; rebuild with `mmopt build`."
    spec = COMPONENTS["text"]
    (bundle / "text.fp16.engine.json").write_text("{not json")
    with pytest.raises(EngineLoadError, match=r"text.fp16.engine.json: not valid JSON \(.*\); rebuild the engine"):
        trt_runner.TensorRTRunner(bundle / "text.fp16.engine", spec.inputs, spec.outputs,
                                  memory=FakeDeviceMemory()).__enter__()
    (bundle / "text.fp16.engine.json").unlink()
    with pytest.raises(EngineLoadError) as e:
        trt_runner.TensorRTRunner(bundle / "text.fp16.engine", spec.inputs, spec.outputs,
                                  memory=FakeDeviceMemory()).__enter__()
    assert str(e.value) == ("text.fp16.engine: no sidecar text.fp16.engine.json beside it, so mmopt cannot check "
                            "that it fits this GPU and TensorRT. Rebuild it with `mmopt build`.")


def test_engine_io_mismatch_exactly(bundle):
    spec = COMPONENTS["text"]
    with pytest.raises(EngineLoadError) as e:
        trt_runner.TensorRTRunner(bundle / "image.fp16.engine", spec.inputs, spec.outputs, name="text",
                                  memory=FakeDeviceMemory()).__enter__()
    assert str(e.value) == ("image.fp16.engine does not match component 'text': inputs ['pixel_values'], expected "
                            "['input_ids']; outputs ['image_emb'], expected ['text_hidden']. Rebuild it from this "
                            "bundle with `mmopt build`.")


def test_shapes_outside_every_profile_name_the_profiles(bundle, computing):
    with trt_runner.TensorRTRunner.from_bundle(bundle, "image", "fp16", memory=computing) as r:
        with pytest.raises(NoProfileFits) as e:
            r._engine.profile_for({"pixel_values": (9, 3, 8, 8)})
    assert e.value.exit_code == 2  # the caller's shapes
    assert str(e.value) == ("image.fp16.engine: input shapes {'pixel_values': (9, 3, 8, 8)} fit no "
                            "optimization profile of the engine (profile 0: pixel_values [1, 3, 8, 8]..[8, 3, 8, 8]; "
                            "profile 1: pixel_values [1, 3, 8, 8]..[1, 3, 8, 8]).")
