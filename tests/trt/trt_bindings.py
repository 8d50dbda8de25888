"""NVIDIA's real TensorRT Python bindings, made importable without TensorRT or a GPU.

The ``tensorrt-cu12-bindings`` wheels on PyPI hold only the pybind11 module; it links nine C entry points
of libnvinfer / libnvonnxparser / libnvinfer_plugin. Stand-in shared libraries (stub_libs.c, compiled
here with gcc under the sonames the module's DT_NEEDED entries ask for) define those nine as returning
NULL / 0, so ``import tensorrt_bindings`` succeeds with the full API surface, while any factory call
fails with ``nullptr``. Wheels and stand-ins are cached under ``$MMOPT_TEST_CACHE/trt`` (default
``~/.cache/mmopt-test/trt``), so CI downloads once per machine.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
# Oldest supported (JetPack 6 ships TensorRT 10.3) and the newest 11.x wheel on PyPI when this was
# written (`pip index versions tensorrt-cu12-bindings`, 2026-11-28). Bump NEWEST when NVIDIA releases.
OLDEST = "10.3.0"
NEWEST = "11.4.0.106"
VERSIONS = (OLDEST, NEWEST)
LIBS = ("libnvinfer", "libnvonnxparser", "libnvinfer_plugin")
# TensorRT's lean runtime (tensorrt-lean-cu12-bindings): Runtime / engine / context only, for version-compatible
# engines. Its module links one library, libnvinfer_lean.so.N, and three of the nine entry points.
LEAN_LIBS = ("libnvinfer_lean",)
_OFFLINE = ("NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
            "Network is unreachable", "Max retries exceeded", "ProxyError", "Read timed out", "ConnectTimeout")


def cache_dir() -> Path:
    root = os.environ.get("MMOPT_TEST_CACHE") or Path.home() / ".cache" / "mmopt-test"
    path = Path(root) / "trt"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _publish(tmp: Path, final: Path) -> Path:
    try:
        os.replace(tmp, final)
    except OSError:  # another worker got there first
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def stand_in_libs(major: int, lean: bool = False) -> Path:
    """A folder of libnvinfer.so.N, libnvonnxparser.so.N, libnvinfer_plugin.so.N stand-ins (lean:
    libnvinfer_lean.so.N)."""
    src = HERE / "stub_libs.c"
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:12]
    final = cache_dir() / f"stand-ins-{'lean-' if lean else ''}{major}-{digest}"
    if final.is_dir():
        return final
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.fail("the TensorRT conformance test needs gcc (or cc) to compile stand-in libnvinfer libraries; "
                    "install build-essential.")
    tmp = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=".stand-ins-"))
    for lib in LEAN_LIBS if lean else LIBS:
        soname = f"{lib}.so.{major}"
        subprocess.run([gcc, "-shared", "-fPIC", "-O0", f"-Wl,-soname,{soname}", "-o", str(tmp / soname), str(src)],
                       check=True, capture_output=True, text=True)
    return _publish(tmp, final)


def in_ci() -> bool:
    """CI sets CI=true (GitHub Actions, GitLab, most others); a developer machine does not."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def bindings(version: str, lean: bool = False) -> Path:
    """The folder holding ``tensorrt_bindings/`` of ``tensorrt-cu12-bindings==version`` (lean:
    ``tensorrt_lean_bindings/`` of ``tensorrt-lean-cu12-bindings==version``), downloaded once."""
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    dist = "tensorrt-lean-cu12-bindings" if lean else "tensorrt-cu12-bindings"
    module = "tensorrt_lean_bindings" if lean else "tensorrt_bindings"
    final = cache_dir() / f"{dist}-{version}-{tag}"
    if (final / module).is_dir():
        return final
    wheels = cache_dir() / "wheels"
    pattern = f"{dist.replace('-', '_')}-{version}-{tag}-*.whl"
    found = [w for w in wheels.glob(pattern)] if wheels.is_dir() else []
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", str(wheels), f"{dist}=={version}"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        log = out.stdout + out.stderr
        if out.returncode != 0:
            if any(s in log for s in _OFFLINE):
                why = f"PyPI is unreachable, cannot download {dist}=={version}: {log[-300:]}"
                if in_ci():  # an offline CI run must not turn the TensorRT conformance green by skipping it
                    pytest.fail(f"{why}\nIn CI (CI={os.environ.get('CI')}) the conformance tests need these wheels: "
                                f"give the job network access, or put the wheels in {wheels} "
                                f"(MMOPT_TEST_CACHE={cache_dir()}) beforehand.")
                pytest.skip(why)
            pytest.fail(f"pip download {dist}=={version} failed for {tag} (10.3.0 has wheels for "
                        f"cp38-cp312 only; run this job on one of those):\n{log[-2000:]}")
        found = list(wheels.glob(pattern))
    tmp = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=".bindings-"))
    with zipfile.ZipFile(found[0]) as z:
        z.extractall(tmp)
    return _publish(tmp, final)


def needed_libraries(version: str, lean: bool = False) -> list[str]:
    """The DT_NEEDED sonames of the bindings' extension module (read with readelf where present)."""
    so = next((bindings(version, lean) / ("tensorrt_lean_bindings" if lean else "tensorrt_bindings")).glob("tensorrt*.so"))
    if not shutil.which("readelf"):
        pytest.skip("readelf not installed")
    out = subprocess.run(["readelf", "-d", str(so)], capture_output=True, text=True, check=True).stdout
    return [line.split("[")[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]


def run_driver(version: str, *args: str, timeout: int = 120, lean: bool = False) -> subprocess.CompletedProcess:
    """Run trt_conformance_driver.py against the real bindings of ``version`` (lean: the lean runtime's) in a
    fresh interpreter."""
    major = int(version.split(".")[0])
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(stand_in_libs(major, lean)),
                                                           env.get("LD_LIBRARY_PATH")]))
    env["PYTHONPATH"] = os.pathsep.join([str(bindings(version, lean)), str(REPO), str(HERE)])
    args = (*args, "--lean") if lean else args
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return subprocess.run([sys.executable, str(HERE / "trt_conformance_driver.py"), "--expect-version", version, *args],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=str(REPO))
