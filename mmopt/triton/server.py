"""A real Triton Inference Server on this machine: the ``tritonserver`` (2.51) inside the PyPI wheel
``nvidia-pytriton==0.7.0``, CPU only, listening on 127.0.0.1. It has the python backend and the ensemble
scheduler and no other backend, so it serves ``mmopt triton --backend python`` repositories. The tests and
benchmarks/triton_vqa.py run it; so can a user without a GPU.

The wheel is used from its own virtual environment (``.ci/triton-venv.sh`` makes one; ``venv()`` finds it): the python backend's
stub needs numpy < 2 (with numpy 2 every output reaches the server empty), and mmopt's environment has numpy 2.
PyTriton's Python API is not used; this does what it does to launch the binary:
- a backend folder with the wheel's python backend and the stub built for the venv's Python X.Y;
- ``LD_LIBRARY_PATH``: the wheel's bundled libraries (a copied stub loses its RPATH) and the folder of the
  venv's ``libpython3.X.so`` (the stub links it);
- ``PATH`` starting with the venv's ``bin``: the stub's interpreter finds ``python3`` there and so the venv's
  numpy and onnxruntime;
- its own ``/dev/shm`` prefix for the python backend's regions, removed after the server stops;
- ready means ``/v2/health/ready`` answers 200; a server that neither becomes ready nor exits in time (a stub
  that cannot start makes it hang) is stopped by its PID, as is every server at the end.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from mmopt.errors import BackendUnavailable, MmoptError
from mmopt_runtime.paths import cache_dir

ENV = "MMOPT_TRITON_VENV"
HOW = ("Make it with `bash .ci/triton-venv.sh` (numpy<2, onnxruntime, tritonclient[http,grpc], nvidia-pytriton==0.7.0), "
       f"or point ${ENV} at one.")
# lines every start logs on a machine without a GPU: harmless
HARMLESS = ("CudaDriverHelper has not been initialized", "unable to create stream for",
            "failed to allocate pinned system memory")
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_PROBE = ("import importlib.util, sys, sysconfig; s = importlib.util.find_spec('pytriton'); "
          "print(list(s.submodule_search_locations)[0] if s else ''); print(f'{sys.version_info[0]}.{sys.version_info[1]}'); "
          "print(sysconfig.get_config_var('LIBDIR')); print(sys.prefix)")


class TritonServerError(MmoptError):
    """The local server exited, or was not ready in time; the message holds its error lines."""


@dataclasses.dataclass(frozen=True)
class Wheel:
    python: Path  # the venv's interpreter: the stub runs its numpy / onnxruntime
    version: str  # its X.Y
    libdir: Path  # folder of its libpython3.X.so
    prefix: Path  # the venv
    root: Path  # <site-packages>/pytriton/tritonserver

    @property
    def libs(self) -> Path:
        return self.root.parents[1] / "nvidia_pytriton.libs"


def venv(path: str | os.PathLike | None = None) -> Path:
    """The server's venv: ``path``, else $MMOPT_TRITON_VENV, else ``${XDG_CACHE_HOME:-~/.cache}/mmopt/triton-venv``
    (where .ci/triton-venv.sh makes it: outside any checkout, so fresh CI clones share it)."""
    return Path(path or os.environ.get(ENV) or cache_dir() / "triton-venv")


def find(venv_dir: str | os.PathLike | None = None) -> Wheel:
    """The wheel's server in the venv, or ``BackendUnavailable`` saying how to make one."""
    where = venv(venv_dir)
    python = where / "bin" / "python"
    if not python.exists():
        raise BackendUnavailable(f"{where}: no Python environment for the Triton server. {HOW}")
    try:
        out = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, timeout=60, check=True,
                             env={"PATH": "/usr/bin:/bin"}).stdout.splitlines()
    except (OSError, subprocess.SubprocessError) as e:
        raise BackendUnavailable(f"{python}: cannot be run ({e}). {HOW}") from None
    root = Path(out[0]) / "tritonserver" if out and out[0] else None
    if root is None or not (root / "bin" / "tritonserver").exists():
        raise BackendUnavailable(f"{where}: has no nvidia-pytriton wheel (its tritonserver). {HOW}")
    return Wheel(python, out[1], Path(out[2]), Path(out[3]), root)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _status(url: str) -> int | None:
    try:
        with _NO_PROXY.open(url, timeout=1.0) as r:
            return r.status
    except Exception:
        return None


class LocalServer:
    """One running tritonserver; ``stop()`` (or leaving the ``with`` block) ends it by its PID."""

    def __init__(self, proc: subprocess.Popen, ports: list[int], log: Path, shm_prefix: str, started: float):
        self.proc, self.log, self.shm_prefix, self.started = proc, log, shm_prefix, started
        self.http_port, self.grpc_port, self.metrics_port = ports
        self.ready_s: float | None = None  # spawn -> ready
        self.stop_s: float | None = None
        self.leftover_shm: list[str] = []  # shm regions the server left behind at its stop (then removed)

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def errors(self) -> list[str]:
        """The log's error lines (the harmless CPU-only ones left out)."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return []
        return [ln.strip() for ln in text.splitlines()
                if (ln.startswith("E") or ln.startswith("error:")) and not any(h in ln for h in HARMLESS)]

    def stop(self, timeout: float = 30.0) -> float:
        """SIGINT to the server's PID (it unloads the models and ends the stubs), SIGKILL after ``timeout``;
        then this server's /dev/shm regions are removed. Close clients first: an open connection holds the
        server up to its --exit-timeout-secs."""
        t0 = time.perf_counter()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        try:  # its own session: whatever of it is left (the server past its timeout, stubs it left) goes
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(timeout=10)
        self.leftover_shm = sorted(p.name for p in Path("/dev/shm").glob(f"{self.shm_prefix}*"))
        for region in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            region.unlink(missing_ok=True)
        self.stop_s = time.perf_counter() - t0
        return self.stop_s

    def __enter__(self) -> "LocalServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start(repo: str | os.PathLike, workdir: str | os.PathLike, venv_dir: str | os.PathLike | None = None,
          ready_timeout: float = 60.0, extra_args: tuple[str, ...] = ()) -> LocalServer:
    """The server on ``repo``, ready; ``TritonServerError`` with its error lines when it exits first or is not
    ready within ``ready_timeout`` (then it is stopped). Its log and backend folder go to ``workdir``."""
    wheel = find(venv_dir)
    work = Path(workdir)
    backend = work / "backends" / "python"
    backend.mkdir(parents=True, exist_ok=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        (backend / name).write_bytes((wheel.root / "backends" / "python" / name).read_bytes())
    stub = wheel.root / "python_backend_stubs" / wheel.version / "triton_python_backend_stub"
    if not stub.exists():
        raise BackendUnavailable(f"{stub}: the wheel has no python backend stub for Python {wheel.version}. "
                                 f"Make the venv with Python 3.8 - 3.13. {HOW}")
    (backend / stub.name).write_bytes(stub.read_bytes())
    (backend / stub.name).chmod(0o755)
    ports = _free_ports(3)
    shm_prefix = f"mmopt{os.getpid()}_{ports[0]}_"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU only, even on a GPU machine
    env["LD_LIBRARY_PATH"] = ":".join(filter(None, [str(wheel.libs), str(wheel.libdir), env.get("LD_LIBRARY_PATH")]))
    env["PATH"] = f"{wheel.prefix / 'bin'}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    cmd = [str(wheel.root / "bin" / "tritonserver"), f"--model-repository={Path(repo).resolve()}",
           f"--backend-directory={work / 'backends'}", f"--cache-directory={wheel.root / 'caches'}",
           "--http-address=127.0.0.1", f"--http-port={ports[0]}", "--grpc-address=127.0.0.1",
           f"--grpc-port={ports[1]}", "--metrics-address=127.0.0.1", f"--metrics-port={ports[2]}",
           "--allow-gpu-metrics=false", "--pinned-memory-pool-byte-size=0", "--exit-on-error=true",
           "--strict-readiness=true", "--exit-timeout-secs=10", "--disable-auto-complete-config",
           f"--backend-config=python,shm-region-prefix-name={shm_prefix}", *extra_args]
    log = work / "server.log"
    t0 = time.perf_counter()
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    server = LocalServer(proc, ports, log, shm_prefix, t0)
    ready = f"http://127.0.0.1:{ports[0]}/v2/health/ready"
    try:
        while time.perf_counter() - t0 < ready_timeout:
            if proc.poll() is not None:
                server.stop()
                raise TritonServerError(f"tritonserver exited with {proc.returncode} before it was ready:\n"
                                        + "\n".join(server.errors()[-12:]) + f"\n(log: {log})")
            if _status(ready) == 200:
                server.ready_s = time.perf_counter() - t0
                return server
            time.sleep(0.05)
    except BaseException:  # Ctrl-C while waiting: its own session never sees it, so stop it here
        if server.stop_s is None:
            server.stop()
        raise
    server.stop()
    raise TritonServerError(f"tritonserver was not ready after {ready_timeout:.0f} s and was stopped:\n"
                            + "\n".join(server.errors()[-12:]) + f"\n(log: {log})")
