"""TensorRT-layer errors: the classes live in the device runtime (``mmopt_runtime.trt.errors``), which raises
them too; this adds what only the build machine says (how to build on the target device)."""
from __future__ import annotations

from mmopt_runtime.trt.errors import (UNSUPPORTED_CODES, EngineBuildError, EngineIncompatible,  # noqa: F401
                                      EngineLoadError, OnnxParseError, TensorRTFeatureUnavailable,
                                      TensorRTUnavailable, parser_error_message)

HOW_TO_BUILD = """\
TensorRT engines are specific to the GPU model and TensorRT version that build them, so mmopt builds them
on the target device itself (or on a machine with the identical GPU and software image, e.g. the same
JetPack release); it never cross-builds for Jetson. The ONNX bundle is the portable artifact. On the target:
  1. install TensorRT's Python bindings: pip install -e '.[tensorrt]' (in a checkout of mmopt)
     (on a Jetson use the TensorRT that JetPack ships: JetPack 6 has TensorRT 10.3, `sudo apt install
     python3-libnvinfer`, and a venv created with --system-site-packages)
  2. copy the bundle there, e.g. rsync -a BUNDLE/ device:BUNDLE/
  3. mmopt build BUNDLE --precision fp16
See docs/tensorrt.md."""
