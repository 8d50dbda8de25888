"""The one dtype table: mmopt's dtype names, and what each is in numpy, ONNX Runtime, torch and TensorRT.

A dtype crosses several libraries on its way from ``[inputs]`` to an engine. Every translation lives
here; no other module keeps its own map. bfloat16 travels as float32 in numpy (numpy has no bfloat16).
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np

NAMES = ("float32", "float16", "bfloat16", "int64", "int32", "bool")
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "bool": 1}
# The values each dtype can hold (a declared [inputs] range must fit).
LIMITS = {"float32": (-3.4028234663852886e38, 3.4028234663852886e38), "float16": (-65504.0, 65504.0),
          "bfloat16": (-3.3895313892515355e38, 3.3895313892515355e38), "int64": (-2 ** 63, 2 ** 63 - 1),
          "int32": (-2 ** 31, 2 ** 31 - 1), "bool": (0, 1)}
NUMPY = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_,
         "bfloat16": np.float32}
# ONNX Runtime's type strings -> these names: mmopt_runtime.ort.TYPES (the runtime opens graphs too).
# TensorRT's DataType names -> numpy dtype names: mmopt_runtime.trt.api.DTYPES (the runtime runs engines too).
# mmopt's (and a package's) dtype names -> Triton's (config.pbtxt writes TYPE_<name>; clients send <name>).
TRITON = {"float32": "FP32", "float16": "FP16", "bfloat16": "BF16", "float64": "FP64", "int64": "INT64",
          "int32": "INT32", "int8": "INT8", "uint8": "UINT8", "bool": "BOOL"}


@functools.cache
def _torch() -> dict[str, Any]:
    import torch  # only when asked: the table itself does not need torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
            "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}


def torch_dtype(name: str) -> Any:
    """The torch dtype of an mmopt dtype name."""
    return _torch()[name]


def name_of(torch_dtype_: Any) -> str | None:
    """mmopt's name of a torch dtype, or None when mmopt does not handle it."""
    return next((n for n, t in _torch().items() if t == torch_dtype_), None)


def to_numpy(value: Any) -> Any:
    """A torch tensor as a numpy array (bfloat16 as float32, on the CPU); anything else unchanged."""
    if hasattr(value, "detach") and hasattr(value, "dtype"):
        t = value.detach().cpu()
        if t.dtype == _torch()["bfloat16"]:
            t = t.float()
        return t.numpy()
    return value
