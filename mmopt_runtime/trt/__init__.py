"""Running TensorRT engines on the device, torch-free: the bindings (``api``: the one module that touches
``tensorrt`` / ``tensorrt_lean``, building included), compatibility rules (``compat``), GPU discovery
(``device``), device memory (``memory``), profiles and the engine runner (``runner``); the choice among a
package's engine sets is ``mmopt_runtime.engines``. Importing this package imports no TensorRT: ``api.load()`` does, when an
engine is built or run. mmopt's build side (``mmopt.trt``) builds on these.
"""
