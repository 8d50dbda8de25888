"""Calling a served model with tritonclient, over HTTP or gRPC: numpy arrays in, numpy arrays out.

Needs ``tritonclient[http]`` / ``tritonclient[grpc]`` where it runs (the Triton venv has both). Every output is
asked for: a Triton 2.51 ensemble that declares an output also read by a later step fails requests that ask
for a subset of its outputs (``unexpected deadlock``; upstream server#7482).
"""
from __future__ import annotations

from typing import Any

import numpy as np


def connect(url: str, protocol: str) -> Any:
    """A client for ``url`` (``host:port``). One per thread: the HTTP client is not thread-safe."""
    if protocol == "http":
        import tritonclient.http as module
    elif protocol == "grpc":
        import tritonclient.grpc as module
    else:
        raise ValueError(f"protocol {protocol!r}: http or grpc")
    return module.InferenceServerClient(url)


def _module(client: Any) -> Any:
    import tritonclient.grpc
    import tritonclient.http

    return tritonclient.grpc if isinstance(client, tritonclient.grpc.InferenceServerClient) else tritonclient.http


def request(client: Any, feeds: dict[str, np.ndarray]) -> list[Any]:
    """The inputs of one request, dtypes as Triton names them (``np_to_triton_dtype``)."""
    from tritonclient.utils import np_to_triton_dtype

    module = _module(client)
    inputs = []
    for name, a in feeds.items():
        a = np.ascontiguousarray(a)
        t = module.InferInput(name, list(a.shape), np_to_triton_dtype(a.dtype))
        t.set_data_from_numpy(a)
        inputs.append(t)
    return inputs


def outputs(result: Any) -> dict[str, np.ndarray]:
    """Every output of a result, by name."""
    response = result.get_response()
    names = [o["name"] for o in response["outputs"]] if isinstance(response, dict) else \
        [o.name for o in response.outputs]
    return {n: result.as_numpy(n) for n in names}


def infer(client: Any, model: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return outputs(client.infer(model, request(client, feeds)))
