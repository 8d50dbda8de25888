"""mmopt's device runtime: load a package written by ``mmopt package``, verify it, self-test it, serve it.

Needs numpy and onnxruntime only: no torch, no onnx, no mmopt build code (``mmopt-run`` is its command).
mmopt itself builds on its pipeline and parity metrics, so both run the same code.
"""
from mmopt_runtime.package import Package, PackageError

__all__ = ["Package", "PackageError"]
__version__ = "0.1.0"
