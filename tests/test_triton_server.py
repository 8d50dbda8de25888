"""A real Triton Inference Server serves what ``mmopt triton --backend python`` wrote for the toy model.

The server is the tritonserver 2.51 of the PyPI wheel nvidia-pytriton==0.7.0, run by ``mmopt.triton.server``
on 127.0.0.1 from its own venv (numpy < 2 for the python backend's stub; ``bash .ci/triton-venv.sh`` makes it in
~/.cache/mmopt/triton-venv, ``.ci/run`` does so before pytest; $MMOPT_TRITON_VENV points elsewhere). Requests go over HTTP and gRPC at
several batch sizes and as concurrent requests the dynamic batcher merges; every output must equal mmopt's
pipeline (``mmopt_runtime`` on the package's graphs) within the policy's golden tolerance. A repository with a
dtype mismatch between steps is refused by the server, with its message. Skips when the venv is absent.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from mmopt import api
from mmopt.errors import BackendUnavailable
from mmopt.triton import server
from mmopt_runtime import Package
from mmopt_runtime.compare import failures, measure
from models.toydata import _batch
from support import TESTS

BATCHES = (1, 2, 7, 32)
CONCURRENT = 24


@pytest.fixture(scope="module")
def wheel():
    try:
        return server.find()
    except BackendUnavailable as e:
        if os.environ.get("MMOPT_REQUIRE_TRITON"):  # .ci/run made the venv: its absence is a failure there
            pytest.fail(f"MMOPT_REQUIRE_TRITON is set but there is no Triton server: {e}")
        pytest.skip(f"no Triton server to test against: {e}")


@pytest.fixture(scope="module")
def repo(wheel, toy_bundle, tmp_path_factory):
    d = tmp_path_factory.mktemp("triton-served")
    pkg = api.package(toy_bundle.bundle, None, d / "pkg")
    # a 5 ms queue delay lets the dynamic batcher wait for the concurrent requests even on a loaded machine
    r = api.triton(pkg.folder, None, d / "repo", backend="python", queue_delay_us=5000)
    return r, Package.load(pkg.folder, merged=False)  # the split graphs: those the members serve


@pytest.fixture(scope="module")
def served(repo, tmp_path_factory):
    srv = server.start(repo[0].folder, tmp_path_factory.mktemp("triton-work"), ready_timeout=120)
    try:
        yield srv
    finally:
        srv.stop()
        assert srv.proc.returncode == 0, srv.errors()
        assert srv.leftover_shm == []  # the server removed its own regions on a graceful stop


def _requests(wheel, srv, model, feeds, tmp_path):
    np.savez(tmp_path / "feeds.npz", **feeds)
    r = subprocess.run([str(wheel.python), str(TESTS / "triton_requests.py"), srv.http_url, srv.grpc_url, model,
                        str(tmp_path / "feeds.npz"), str(tmp_path / "out.npz")], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stdout + r.stderr
    with np.load(tmp_path / "out.npz") as out:
        results = {k: out[k] for k in out.files}
    return results, json.loads((tmp_path / "out.json").read_text())


def test_the_served_ensemble_computes_what_mmopts_pipeline_does(wheel, repo, served, tmp_path):
    result, pkg = repo
    rng = np.random.default_rng(0)
    requests = {f"b{b}": _batch(rng, b, seq=int(rng.integers(4, 17))) for b in BATCHES}
    # two lengths (merged only with their own length) and, among them, one request the text graph cannot take
    requests |= {f"async{i}": _batch(rng, 1, seq=8 if i % 2 else 12) for i in range(CONCURRENT)}
    bad = _batch(rng, 1, seq=8)
    bad["input_ids"] = bad["input_ids"] + 1000  # past the embedding table
    requests["asyncbad0"] = bad
    feeds = {f"{g}/{n}": a for g, f in requests.items() for n, a in f.items()}
    got, report = _requests(wheel, served, result.plan.ensemble, feeds, tmp_path)

    tol = pkg.manifest["golden"]["tolerance"]
    scores = set(pkg.manifest["golden"]["scores"])
    worst = 0.0
    assert "indices element out of data bounds" in report["bad"]["asyncbad0"], report["bad"]  # it alone failed
    for group, f in requests.items():
        if group.startswith("asyncbad"):
            continue
        want = pkg.infer(f)  # mmopt_runtime's pipeline on the package's graphs, in this process
        for protocol in (("http", "grpc") if group.startswith("b") else ("",)):
            prefix = f"{protocol}/{group}" if protocol else group
            assert sorted(k.rpartition("/")[2] for k in got if k.startswith(prefix + "/")) == sorted(want), prefix
            for name, ref in want.items():
                out = got[f"{prefix}/{name}"]
                assert out.shape == ref.shape and out.dtype == ref.dtype, (prefix, name)
                m = measure(name, ref, out, name in scores)
                assert not failures(m, tol), (prefix, name, m)
                worst = max(worst, m.max_abs)
    assert worst < 1e-5, worst
    # the dynamic batcher merged concurrent requests, and model.py split the batch back right (checked above)
    counts = report["concurrent"]
    assert all(c["inferences"] >= CONCURRENT for c in counts.values()), counts
    assert all(c["executions"] < c["inferences"] for c in counts.values()), counts
    assert "batch-size must be <= 32" in report["over_max_batch"]
    assert served.ready_s is not None and served.proc.poll() is None  # the refused request left it up


def test_a_dtype_mismatch_between_steps_is_refused_by_the_server(wheel, repo, tmp_path):
    broken = tmp_path / "repo"
    shutil.copytree(repo[0].folder, broken)
    cfg = broken / "toy_fusion" / "config.pbtxt"
    text = cfg.read_text()
    i = text.index("TYPE_FP32", text.index('name: "image.output"'))
    cfg.write_text(text[:i] + "TYPE_FP16" + text[i + 9:])
    with pytest.raises(server.TritonServerError) as e:
        server.start(broken, tmp_path / "work", ready_timeout=120).stop()
    assert ("in ensemble toy, ensemble tensor image:output: inconsistent data type: TYPE_FP32 is inferred from model "
            "toy_image while TYPE_FP16 is inferred from model toy_fusion") in str(e.value)
    with pytest.raises(Exception, match=r"tensor 'image:output': inconsistent data type"):  # mmopt said so first
        api.check_triton(broken)


def test_a_missing_venv_skips_with_the_way_to_make_it(tmp_path):
    with pytest.raises(BackendUnavailable, match=r"no Python environment for the Triton server\. Make it with "
                                                 r"`bash \.ci/triton-venv\.sh`"):
        server.find(tmp_path / "nope")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    assert server.venv() == Path(os.environ.get(server.ENV) or cache / "mmopt" / "triton-venv")
