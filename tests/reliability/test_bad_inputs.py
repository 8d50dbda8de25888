"""Bad inputs, each a clean failure: exit 1 or 2, no traceback, a message naming the file or field,
the earlier bundle byte-identical (sha256 of every file) and nothing left beside it.

Run in this process through mmopt's own entry point (``cli``), sharing one exported bundle (copied per
case). Classes: manifest paths that escape, manifests and baselines of the wrong shape, stale bundles,
checkpoints, the user's factory and data callables, output folders, mmopt.toml fields, foreign ONNX
files, non-finite references, markup in user strings, and precision on graphs it cannot convert.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
from reliability_support import cli, litter, refused, snapshot

BENCH = ("--batch", "1", "--repeats", "2", "--warmup", "0")


def check_untouched(project, before: dict[str, str]) -> None:
    assert snapshot(project.bundle) == before, "the bundle changed"
    assert litter(project.bundle.parent) == []


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


# ---- 1. manifest paths that leave the bundle (security) --------------------------------------------
ESCAPES = ["../outside.onnx", "/etc/hostname", "sub/../../outside.onnx", "./image.onnx", "a//image.onnx",
           "", "..\\outside.onnx", "image.onnx\x00.txt", "..", "."]


@pytest.mark.parametrize("command", ["verify", "inspect", "bench", "quantize"])
@pytest.mark.parametrize("path", ESCAPES, ids=lambda p: repr(p))
def test_artifact_path_outside_the_bundle_is_refused_before_anything_is_opened(project, command, path):
    outside = project.root / "outside.onnx"
    shutil.copy(project.bundle / "image.onnx", outside)
    m = project.read()
    m["artifacts"][0]["file"] = path
    if path in ("../outside.onnx", "sub/../../outside.onnx"):
        m["artifacts"][0]["sha256"] = _sha(outside.read_bytes())  # the attacker updates the hash too
    project.write(m)
    before = snapshot(project.bundle)
    args = {"verify": (), "inspect": (), "bench": ("-o", project.root / "r", *BENCH),
            "quantize": ("-p", "image=fp16")}[command]
    r = cli(command, project.bundle, *args)
    refused(r, "manifest.json", "artifacts[0].file")
    check_untouched(project, before)
    assert not (project.root / "r").exists()


@pytest.mark.parametrize("command", ["verify", "bench"])
def test_symlinked_artifact_leading_outside_is_refused(project, command):
    target = project.root / "outside.onnx"
    shutil.copy(project.bundle / "image.onnx", target)
    (project.bundle / "image.onnx").unlink()
    os.symlink(target, project.bundle / "image.onnx")
    before = snapshot(project.bundle)
    extra = ("-o", project.root / "r", *BENCH) if command == "bench" else ()
    r = cli(command, project.bundle, *extra)
    refused(r, "outside the bundle", "artifacts[0].file")
    check_untouched(project, before)


def test_manifest_linked_in_from_outside_is_refused(project):
    outside = project.root / "evil-manifest.json"
    outside.write_text(project.manifest.read_text())
    project.manifest.unlink()
    os.symlink(outside, project.manifest)
    refused(cli("inspect", project.bundle), "manifest.json", "outside the bundle")


def test_engine_sidecar_path_outside_is_refused(project):
    m = project.read()
    m["artifacts"][0]["extra"] = {"engine": {"file": "../../etc/passwd"}}
    project.write(m)
    before = snapshot(project.bundle)
    refused(cli("verify", project.bundle), "artifacts[0].extra.engine.file")
    check_untouched(project, before)


@pytest.mark.parametrize("field, value", [("config", "sub/../mmopt.toml"), ("config", "./mmopt.toml"),
                                          ("config", "/tmp/../etc/mmopt.toml"), ("checkpoint", "../x/../x.pt"),
                                          ("config", 42), ("config", "")])
def test_model_paths_must_be_normalised(project, field, value):
    m = project.read()
    m["model"][field] = value
    project.write(m)
    before = snapshot(project.bundle)
    r = cli("bench", project.bundle, "-o", project.root / "r", *BENCH)
    refused(r, "manifest.json", f"model.{field}")
    check_untouched(project, before)


def test_a_project_moved_as_a_whole_keeps_its_bundle(exported, project):
    """The config and checkpoint are recorded relative to the bundle: a copy of the whole project folder
    (this fixture's) works as exported, without re-pointing the manifest at the copies."""
    assert exported.read()["model"]["config"] == "../mmopt.toml"
    m = project.read()
    m["model"]["config"], m["model"]["checkpoint"] = "../mmopt.toml", "../toy.safetensors"
    m["model"].pop("config_absolute")  # the original project is not consulted
    project.write(m)
    r = cli("quantize", project.bundle, "-p", "image=fp16")
    assert r.code == 0, r.text


# ---- 2. manifests of the wrong shape: one schema for the whole document --------------------------
def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


MANIFESTS = {
    "array": "[]", "string": '"bundle"', "number": "3", "null": "null", "empty-file": "",
    "truncated": '{"schema_version": 2, "kind": "mmopt-bundle", "artifacts": [',
    "not-utf8": b"\xff\xfe\x00{".decode("latin-1"), "deeply-nested": _nested(100_000),
}


@pytest.mark.parametrize("command", ["verify", "inspect", "bench"])
@pytest.mark.parametrize("case", list(MANIFESTS))
def test_manifest_that_is_not_an_object(project, command, case):
    text = MANIFESTS[case]
    project.manifest.write_bytes(text.encode("latin-1") if case == "not-utf8" else text.encode())
    before = snapshot(project.bundle)
    extra = ("-o", project.root / "r", *BENCH) if command == "bench" else ()
    refused(cli(command, project.bundle, *extra), "manifest.json")
    check_untouched(project, before)


def _drop(key):
    def edit(m):
        del m[key]
    return edit


def _set(path, value):
    def edit(m):
        node = m
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
    return edit


FIELD_EDITS = {
    "no artifacts": (_drop("artifacts"), "artifacts"),
    "artifacts is a dict": (_set(["artifacts"], {}), "artifacts"),
    "artifact is a string": (_set(["artifacts", 0], "image.onnx"), "artifacts[0]"),
    "sha256 not hex": (_set(["artifacts", 0, "sha256"], "zz"), "artifacts[0].sha256"),
    "bytes negative": (_set(["artifacts", 0, "bytes"], -1), "artifacts[0].bytes"),
    "unknown artifact field": (_set(["artifacts", 0, "evil"], 1), "artifacts[0]"),
    "components a list": (_set(["components"], []), "components"),
    "component kind": (_set(["components", "image", "kind"], "decoder"), "components.image.kind"),
    "tensor without dtype": (lambda m: m["model_inputs"][0].pop("dtype"), "model_inputs[0]"),
    "shape of floats": (_set(["model_inputs", 0, "shape"], [1.5]), "model_inputs[0].shape[0]"),
    "model not an object": (_set(["model"], "toy"), "model"),
    "results parity rows": (_set(["results", "parity", "fp32", "image"], {"failed": "no"}),
                            "results.parity.fp32.image"),
    "schema version": (_set(["schema_version"], 99), "schema_version"),
    "kind": (_set(["kind"], "web-app"), "kind"),
    "sources mismatch": (_set(["components", "image", "sources"], {}), "components.image.sources"),
    "artifact of no component": (_set(["artifacts", 0, "component"], "audio"), "artifacts[0].component"),
}


@pytest.mark.parametrize("command", ["verify", "inspect"])
@pytest.mark.parametrize("case", list(FIELD_EDITS))
def test_manifest_of_the_wrong_shape_names_the_field(project, command, case):
    edit, field = FIELD_EDITS[case]
    m = project.read()
    edit(m)
    project.write(m)
    before = snapshot(project.bundle)
    refused(cli(command, project.bundle), "manifest.json", field)
    check_untouched(project, before)


def test_schema_1_bundle_asks_for_a_re_export(project):
    m = project.read()
    m["schema_version"] = 1
    del m["kind"]
    project.write(m)
    refused(cli("inspect", project.bundle), "schema_version 1", "Re-export")


# ---- 3. baselines of the wrong shape --------------------------------------------------------------
BASELINES = {
    "array": "[]", "string": '"report"', "not json": "{", "nested": _nested(100_000),
    "no kind": json.dumps({"schema_version": 1}),
    "manifest instead": None,  # the bundle's manifest.json passed as a baseline
    "latency not a list": json.dumps({"kind": "mmopt-bench-report", "schema_version": 1, "bundle": {
        "fingerprint": "x", "artifacts": {}}, "latency": {}, "variants": [], "machine": {}, "settings": {}}),
    "latency row missing p50": json.dumps({"kind": "mmopt-bench-report", "schema_version": 1, "bundle": {
        "fingerprint": "x", "artifacts": {}}, "latency": [{"variant": "eager", "graph": "pipeline", "batch": 1}],
        "variants": [], "machine": {}, "settings": {}}),
    "missing bundle": json.dumps({"kind": "mmopt-bench-report", "schema_version": 1, "latency": [],
                                  "variants": [], "machine": {}, "settings": {}}),
}


@pytest.mark.parametrize("case", list(BASELINES))
def test_baseline_of_the_wrong_shape_is_a_usage_error_before_measuring(project, case):
    base = project.root / "base.json"
    text = BASELINES[case]
    base.write_text(project.manifest.read_text() if text is None else text)
    before = snapshot(project.bundle)
    r = cli("bench", project.bundle, "-o", project.root / "r", "--baseline", base, *BENCH)
    refused(r, "base.json", codes=(2,))
    check_untouched(project, before)
    assert not (project.root / "r").exists()


# ---- 4. stale bundles: the model changed since export ---------------------------------------------
@pytest.mark.parametrize("command", ["bench", "quantize"])
def test_changed_config_is_a_stale_bundle_before_any_model_code_runs(project, command):
    (project.root / "toy.py").write_text("raise SystemExit('model code ran')\n")  # must never be imported
    text = project.config.read_text()
    assert "[dims]\n" in text
    project.config.write_text(text.replace("[dims]\n", "[dims]\nunused_by_graphs = { min = 1, opt = 2, max = 3 }\n"))
    before = snapshot(project.bundle)
    extra = ("-o", project.root / "r", *BENCH) if command == "bench" else ("-p", "image=fp16")
    r = cli(command, project.bundle, *extra)
    refused(r, "stale bundle", str(project.config), "changed since export", "[dims]", "--config")
    assert "model code ran" not in r.text
    check_untouched(project, before)


def test_tuning_precision_tables_after_export_is_not_stale(project):
    """What quantize tells a user to edit ([precision.exclude], [tolerance], a comment) does not change the
    exported graphs: the bundle stays usable without a re-export."""
    project.config.write_text(project.config.read_text() + "\n# tuned after export\n[tolerance.fp16]\n"
                              "min_cosine = 0.995\n")
    r = cli("quantize", project.bundle, "-p", "image=fp16")
    assert r.code == 0, r.text
    assert "stale" not in r.text


@pytest.mark.parametrize("command", ["bench", "quantize"])
def test_retrained_checkpoint_is_a_stale_bundle(project, command):
    import torch
    from safetensors.torch import load_file, save_file

    sd = load_file(str(project.root / "toy.safetensors"))
    sd["head.bias"] = sd["head.bias"] + torch.ones_like(sd["head.bias"])
    save_file(sd, str(project.root / "toy.safetensors"))
    before = snapshot(project.bundle)
    extra = ("-o", project.root / "r", *BENCH) if command == "bench" else ("-p", "image=fp16")
    r = cli(command, project.bundle, *extra)
    refused(r, "stale bundle", "toy.safetensors", "re-export, or pass --config")
    check_untouched(project, before)


def test_missing_config_asks_for_config(project):
    project.config.unlink()
    before = snapshot(project.bundle)
    refused(cli("quantize", project.bundle, "-p", "image=fp16"), "no longer exists", "--config")
    check_untouched(project, before)


def test_bench_takes_trust_checkpoint_and_config(project):
    """A bundle exported from a pickled checkpoint can be benched: bench has the option its error names."""
    import torch
    from safetensors.torch import load_file

    sd = load_file(str(project.root / "toy.safetensors"))
    torch.save({"state": sd, "meta": Meta()}, project.root / "run.pt")  # needs pickled code to load
    cfg = project.root / "pickled.toml"
    cfg.write_text(project.config.read_text().replace('"toy.safetensors"', '"run.pt"\nstate_dict_key = "state"'))
    r = cli("export", cfg, "-o", project.root / "pk", "--trust-checkpoint")
    assert r.code == 0, r.err
    r = cli("bench", project.root / "pk", "-o", project.root / "r", *BENCH)
    refused(r, "run.pt", "--trust-checkpoint")
    r = cli("bench", project.root / "pk", "-o", project.root / "r", "--trust-checkpoint", *BENCH)
    assert r.code == 0, r.err


class Meta:
    """A class only pickle can restore (module-level so torch.save can pickle it)."""


# ---- 5. checkpoints -------------------------------------------------------------------------------
@pytest.mark.parametrize("name, data, says, never", [
    ("random.pt", os.urandom(4096), "corrupt", "--trust-checkpoint"),
    ("empty.pt", b"", "corrupt", "--trust-checkpoint"),
    ("zip-start.pt", b"PK\x03\x04" + os.urandom(200), "corrupt", "--trust-checkpoint"),
    ("random.safetensors", os.urandom(512), "not a readable safetensors file", "--trust-checkpoint"),
    ("weights.onnx", b"x", "unsupported file type", "--trust-checkpoint"),
], ids=lambda v: v if isinstance(v, str) and v.count(".") == 1 else "")
def test_corrupt_checkpoints_are_called_corrupt(project, name, data, says, never):
    (project.root / name).write_bytes(data)
    project.config.write_text(project.config.read_text().replace("toy.safetensors", name))
    out = project.root / "out"
    r = cli("export", project.config, "-o", out)
    refused(r, name, says)
    assert never not in r.text
    assert not out.exists() and litter(project.root) == []


def test_pickled_code_gets_the_trust_advice(project):
    import torch

    torch.save({"meta": Meta()}, project.root / "code.pt")
    project.config.write_text(project.config.read_text().replace("toy.safetensors", "code.pt"))
    refused(cli("export", project.config, "-o", project.root / "out"), "code.pt", "--trust-checkpoint")


# ---- 6. the user's code: factory, module, data callables -----------------------------------------
FACTORIES = {
    "raises": ("def build(**kw):\n    raise RuntimeError('cuda out of memory')\n", "model.factory",
               "RuntimeError: cuda out of memory"),
    "exit-0": ("import sys\ndef build(**kw):\n    sys.exit(0)\n", "model.factory", "SystemExit(0)"),
    "exit-3": ("import sys\ndef build(**kw):\n    sys.exit(3)\n", "model.factory", "SystemExit(3)"),
    "typeerror-in-body": ("def build():\n    return len(5)\n", "model.factory", "TypeError"),
    "import-exits": ("import sys\nsys.exit('no GPU')\ndef build():\n    pass\n", "model.factory", "SystemExit"),
    "import-raises": ("raise ImportError('libfoo.so missing')\n", "model.factory", "libfoo.so missing"),
    "not-a-module": ("def build():\n    return 'hello'\n", "model.factory", "not a torch.nn.Module"),
    "keyboard-free-forward": (
        "import torch, sys\nclass M(torch.nn.Module):\n    def __init__(s):\n        super().__init__()\n"
        "        s.image_encoder = torch.nn.Linear(1, 1)\n        s.text_encoder = torch.nn.Linear(1, 1)\n"
        "    def forward(s, **kw):\n        sys.exit(4)\ndef build():\n    return M()\n",
        "forward failed", "SystemExit(4)"),
}


@pytest.mark.parametrize("case", list(FACTORIES))
def test_factory_failures_are_clear_errors_and_nothing_is_written(project, case):
    code, field, says = FACTORIES[case]
    module = f"factory_{case.replace('-', '_')}"
    (project.root / f"{module}.py").write_text(code)
    text = project.config.read_text().replace('factory = "toy:build"', f'factory = "{module}:build"')
    project.config.write_text(text.replace('checkpoint = "toy.safetensors"\n', ""))
    out = project.root / "out"
    r = cli("export", project.config, "-o", out)
    refused(r, "mmopt.toml", field, says)
    assert not out.exists() and litter(project.root) == []
    assert r.code != 0


def test_typeerror_inside_the_factory_is_not_blamed_on_kwargs(project):
    (project.root / "tfac.py").write_text("def build(width=16):\n    return len(width)\n")
    text = project.config.read_text().replace('factory = "toy:build"', 'factory = "tfac:build"')
    project.config.write_text(text.replace('checkpoint = "toy.safetensors"\n', ""))
    r = cli("export", project.config, "-o", project.root / "out")
    refused(r, "model.factory", "TypeError", "tfac.py:2")
    assert "model.kwargs" not in r.text


def test_kwargs_that_do_not_bind_are_blamed_on_kwargs(project):
    project.config.write_text(project.config.read_text().replace(
        'checkpoint = "toy.safetensors"', 'checkpoint = "toy.safetensors"\nkwargs = { depth = 3 }'))
    refused(cli("export", project.config, "-o", project.root / "out"), "model.kwargs", "depth")


DATA = {
    "raises": "def cal():\n    raise RuntimeError('bucket gone')\n    yield\n",
    "empty": "def cal():\n    return iter(())\n",
    "exits": "import sys\ndef cal():\n    sys.exit(1)\n",
    "not-iterable": "def cal():\n    return 5\n",
}


@pytest.mark.parametrize("case", list(DATA))
def test_bench_inputs_calibration_with_a_bad_callable(project, case):
    (project.root / "badcal.py").write_text(DATA[case])
    before = snapshot(project.bundle)
    cfg = project.root / "other.toml"
    cfg.write_text(project.config.read_text().replace("toydata:calibration_batches", "badcal:cal"))
    r = cli("bench", project.bundle, "-o", project.root / "r", "--inputs", "calibration", "--config", cfg, *BENCH)
    refused(r, "calibration.source", "badcal:cal")
    check_untouched(project, before)


# ---- 7. output folders ----------------------------------------------------------------------------
def test_foreign_folder_with_a_manifest_json_is_never_deleted(project):
    web = project.root / "webapp"
    web.mkdir()
    (web / "manifest.json").write_text(json.dumps({"name": "My PWA", "start_url": "/"}))
    (web / "index.html").write_text("<html></html>")
    before = snapshot(web)
    r = cli("export", project.config, "-o", web)
    refused(r, "webapp", "not an mmopt bundle", "refusing to replace it")
    assert snapshot(web) == before and litter(project.root) == []


def test_browser_extension_manifest_is_not_a_bundle(project):
    ext = project.root / "ext"
    ext.mkdir()
    (ext / "manifest.json").write_text(json.dumps({"manifest_version": 3, "schema_version": 2}))
    refused(cli("export", project.config, "-o", ext), "not an mmopt bundle")
    assert (ext / "manifest.json").exists()


def test_non_empty_folder_without_manifest_is_refused(project):
    d = project.root / "photos"
    d.mkdir()
    (d / "cat.jpg").write_bytes(b"\xff\xd8")
    refused(cli("export", project.config, "-o", d), "photos", "not an mmopt bundle")
    assert (d / "cat.jpg").read_bytes() == b"\xff\xd8"


@pytest.mark.parametrize("case", ["out-is-a-file", "parent-is-a-file", "out-is-a-symlink"])
def test_output_paths_that_cannot_be_a_bundle(project, case):
    f = project.root / "file.txt"
    f.write_text("keep me")
    out = {"out-is-a-file": f, "parent-is-a-file": f / "b"}.get(case)
    if case == "out-is-a-symlink":
        out = project.root / "link"
        os.symlink(project.bundle, out)
    before = snapshot(project.bundle)
    r = cli("export", project.config, "-o", out)
    refused(r, out.name if case != "parent-is-a-file" else "file.txt")
    assert f.read_text() == "keep me"
    check_untouched(project, before)


@pytest.mark.parametrize("case", ["existing-file", "inside-bundle", "under-a-file"])
def test_bench_out_is_checked_before_measuring(project, case):
    f = project.root / "report.json"
    f.write_text("{}")
    out = {"existing-file": f, "inside-bundle": project.bundle / "rep", "under-a-file": f / "x"}[case]
    before = snapshot(project.bundle)
    r = cli("bench", project.bundle, "-o", out, *BENCH)
    refused(r, "--out", codes=(2,))
    assert "eager" not in r.out  # nothing was measured
    check_untouched(project, before)
    assert f.read_text() == "{}"


# ---- 8. mmopt.toml fields -------------------------------------------------------------------------
TOML = {
    "factroy typo": (('factory = "toy:build"', 'factroy = "toy:build"'), "model.factory", "did you mean 'factory'"),
    "shape typo": (('shape = ["batch", 3, 16, 16]', 'shpe = ["batch", 3, 16, 16]'), "inputs.pixel_values.shape",
                   "did you mean 'shape'"),
    "int32 range": (('dtype = "int64"\nrange = [0, 49]', 'dtype = "int32"\nrange = [0, 3000000000]'),
                    "inputs.input_ids.range", "int32"),
    "int64 range": (('range = [0, 49]', 'range = [0, 1e30]'), "inputs.input_ids.range", "int64"),
    "float16 range": (('shape = ["batch", 3, 16, 16]', 'shape = ["batch", 3, 16, 16]\ndtype = "float16"\n'
                                                       'range = [0, 1e6]'), "inputs.pixel_values.range", "float16"),
    "nan range": (('range = [0, 49]', 'range = [0, nan]'), "inputs.input_ids.range", "finite"),
    "fractional int range": (('range = [0, 49]', 'range = [0, 4.5]'), "inputs.input_ids.range", "whole numbers"),
    "huge batch": (("batch = { min = 1, opt = 8, max = 32 }", "batch = { min = 1, opt = 8, max = 1000000000 }"),
                   "dims.batch.max", "GiB"),
    "huge seq": (("seq = { min = 4, opt = 8, max = 16 }", "seq = { min = 4, opt = 8, max = 100000000000 }"),
                 "dims.seq.max", "GiB"),
}


@pytest.mark.parametrize("case", list(TOML))
def test_config_field_errors_name_the_field_and_the_fix(project, case):
    (old, new), field, says = TOML[case]
    text = project.config.read_text()
    assert old in text
    project.config.write_text(text.replace(old, new, 1))
    out = project.root / "out"
    refused(cli("export", project.config, "-o", out), "mmopt.toml", field, says)
    assert not out.exists() and litter(project.root) == []


# ---- 9. foreign ONNX files inside the bundle ------------------------------------------------------
def _rehash(project, file: str) -> None:
    m = project.read()
    for a in m["artifacts"]:
        if a["file"] == file:
            data = (project.bundle / file).read_bytes()
            a["sha256"], a["bytes"] = _sha(data), len(data)
    project.write(m)


@pytest.mark.parametrize("swap", ["text graph as image", "random bytes", "fusion graph as text"])
def test_graph_that_is_not_the_component_is_refused_when_opened(project, swap):
    src, dst = {"text graph as image": ("text.onnx", "image.onnx"), "random bytes": (None, "image.onnx"),
                "fusion graph as text": ("fusion.onnx", "text.onnx")}[swap]
    if src:
        shutil.copy(project.bundle / src, project.bundle / dst)
    else:
        (project.bundle / dst).write_bytes(os.urandom(300))
    _rehash(project, dst)  # passes verify: only opening it can tell
    before = snapshot(project.bundle)
    r = cli("bench", project.bundle, "-o", project.root / "r", *BENCH)
    refused(r, dst, "component '" + dst.split(".")[0] + "'")
    check_untouched(project, before)


# ---- 10. non-finite eager references --------------------------------------------------------------
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_eager_output_is_an_error_naming_the_output(project, value):
    (project.root / "nanmodel.py").write_text(
        "import torch\nfrom toy import Toy\nclass N(Toy):\n    def forward(self, **kw):\n"
        f"        return super().forward(**kw) * float('{value}')\n"
        "def build():\n    torch.manual_seed(0)\n    return N().eval()\n")
    text = project.config.read_text().replace('factory = "toy:build"', 'factory = "nanmodel:build"')
    project.config.write_text(text.replace('checkpoint = "toy.safetensors"\n', ""))
    before = snapshot(project.bundle)
    r = cli("export", project.config, "-o", project.bundle)
    refused(r, "eager PyTorch", "output", "NaN", "size")
    check_untouched(project, before)


def test_parity_never_passes_on_nan():
    import numpy as np

    from mmopt.judge.compare import check_all

    ref = np.array([[1.0, np.nan]], np.float32)
    (c,) = check_all("x", "opt", {"y": ref}, {"y": ref.copy()}, {"max_abs": 1, "max_rel": 1, "min_cosine": 0,
                                                          "min_argmax": 0})
    assert c.failed and "NaN" in c.failed[0]


# ---- 11. user strings are never read as rich markup -----------------------------------------------
def test_paths_with_brackets_print_literally(project):
    out = project.root / "exp[lr=0.1]"
    shutil.copytree(project.bundle, out)
    r = cli("verify", out)
    assert r.code == 0, r.err
    assert "exp[lr=0.1]" in r.text
    (out / "image.onnx").write_bytes(b"tampered [bold]x[/bold]")
    r = cli("verify", out)
    refused(r, "exp[lr=0.1]", "image.onnx")


def test_export_into_a_bracketed_folder_prints_it(project):
    out = project.root / "runs[seed=1]"
    r = cli("export", project.config, "-o", out)
    assert r.code == 0, r.err
    assert "runs[seed=1]" in r.text and (out / "manifest.json").exists()


# ---- 12. precision on graphs it cannot convert ----------------------------------------------------
BAG = '''
import torch
from torch import nn
from toy import Img

class Bag(nn.Module):
    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(50, 16, mode="mean")
    def forward(self, input_ids, attention_mask):
        return self.bag(input_ids)

class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.image_encoder, self.text_encoder, self.head = Img(), Bag(), nn.Linear(32, 5)
    def forward(self, pixel_values, input_ids, attention_mask):
        return self.head(torch.cat([self.image_encoder(pixel_values), self.text_encoder(input_ids, attention_mask)], -1))

def build():
    torch.manual_seed(0)
    return M().eval()
'''


@pytest.fixture
def bag(project):
    (project.root / "bagmodel.py").write_text(BAG)
    text = project.config.read_text().replace('factory = "toy:build"', 'factory = "bagmodel:build"')
    project.config.write_text(text.replace('checkpoint = "toy.safetensors"\n', ""))
    r = cli("export", project.config, "-o", project.root / "bag")
    assert r.code == 0, r.err
    return project.root / "bag"


def test_fp16_on_a_loop_graph_keeps_fp32_with_a_reason(bag):
    before = snapshot(bag)
    r = cli("quantize", bag, "-p", "text=fp16")
    refused(r, "text", "fp16", "Loop", "stays fp32", codes=(1,))
    assert snapshot(bag) == before and litter(bag.parent) == []
    r = cli("quantize", bag, "-p", "text=fp16", "-p", "image=fp16")
    assert r.code == 0, r.err
    assert "kept fp32" in r.text and "Loop" in r.text


def test_auto_skips_what_it_cannot_convert_and_says_why(bag):
    r = cli("quantize", bag, "-p", "text=auto", "--no-sensitivity")
    assert r.code == 0, r.err
    assert "auto skipped text=int8-cpu" in r.text and "Loop" in r.text
    search = json.loads((bag / "manifest.json").read_text())["results"]["policy_search"]
    assert {s["precision"] for s in search["skipped"]} == {"int8-cpu", "int8-dynamic"}


@pytest.mark.parametrize("command", ["export", "bench"])
def test_output_folder_whose_parent_is_read_only(project, command):
    ro = project.root / "readonly"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        before = snapshot(project.bundle)
        if command == "export":
            r = cli("export", project.config, "-o", ro / "b")
        else:
            r = cli("bench", project.bundle, "-o", ro / "rep", *BENCH)
        refused(r, "readonly", "not", "writable")
        assert list(ro.iterdir()) == []
        check_untouched(project, before)
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("field, value", [("config", "mmopt.toml"), ("config", "sub/mmopt.toml"),
                                          ("checkpoint", "w.safetensors"), ("config_absolute", "<bundle>/m.toml")])
def test_a_manifest_cannot_point_at_a_config_inside_its_bundle(project, field, value):
    """A downloaded bundle could carry its own mmopt.toml and factory code: a manifest naming a config
    or checkpoint inside the bundle is refused before anything is imported."""
    (project.root / "toy.py").write_text("raise SystemExit('model code ran')\n")  # must never be imported
    value = value.replace("<bundle>", str(project.bundle.resolve()))
    planted = project.bundle / value  # an absolute value replaces the bundle part
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.write_text((project.root / "mmopt.toml").read_text())
    m = project.read()
    m["model"][field] = value
    project.write(m)
    r = cli("bench", project.bundle, "-o", project.root / "r", *BENCH)
    refused(r, "manifest.json", f"model.{field}", "lies inside the bundle")
    assert "model code ran" not in r.text


def test_paths_written_on_windows_load_here_and_ask_for_config(tmp_path):
    from pathlib import Path

    """A bundle exported on Windows records ``..\\mmopt.toml`` / ``C:\\...``: here they name no file, so the
    bundle still loads (inspect, verify, build) and a command that needs the config asks for --config."""
    from mmopt.manifest import external_path

    manifest = tmp_path / "b" / "manifest.json"
    manifest.parent.mkdir()
    assert external_path(manifest, "C:\\proj\\mmopt.toml", "model.config_absolute") == Path("C:\\proj\\mmopt.toml")
    assert not external_path(manifest, "..\\mmopt.toml", "model.config").is_file()
    assert external_path(manifest, "../mmopt.toml", "model.config") == tmp_path / "mmopt.toml"
