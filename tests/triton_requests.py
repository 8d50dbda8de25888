"""Requests to a served ensemble, run by the Triton venv's Python (tritonclient[http,grpc], numpy < 2) for
tests/test_triton_server.py: the test's process keeps mmopt's own numpy 2 and needs no tritonclient clients.

    python triton_requests.py HTTP_URL GRPC_URL MODEL FEEDS.npz OUT.npz

FEEDS.npz holds ``b<N>/<input>`` (one request per batch size, sent over HTTP and gRPC) and ``async<i>/<input>``
(sent together as concurrent gRPC requests, so the dynamic batcher can merge them; ``asyncbad<i>`` ones among
them are meant to fail, and their errors go to OUT.json's "bad"). OUT.npz gets
``<protocol>/b<N>/<output>`` and ``async<i>/<output>``; OUT.json the members' inference / execution counts
for the concurrent requests and the server's answer to a batch over max_batch_size.
"""
from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmopt.triton import client  # noqa: E402


def grouped(data, prefix):
    out = {}
    for key in data.files:
        group, _, name = key.partition("/")
        if group.startswith(prefix):
            out.setdefault(group, {})[name] = data[key]
    return out


def counts(grpc, models):
    stats = grpc.get_inference_statistics("", as_json=True)["model_stats"]
    return {s["name"]: (int(s.get("inference_count", 0)), int(s.get("execution_count", 0)))
            for s in stats if s["name"] in models}


def main():
    http_url, grpc_url, model, feeds_path, out_path = sys.argv[1:6]
    data = np.load(feeds_path)
    results, report = {}, {}
    for protocol, url in (("http", http_url), ("grpc", grpc_url)):
        c = client.connect(url, protocol)
        for group, feeds in grouped(data, "b").items():
            for name, a in client.infer(c, model, feeds).items():
                results[f"{protocol}/{group}/{name}"] = a
        c.close()

    grpc = client.connect(grpc_url, "grpc")
    members = [s["model_name"] for s in grpc.get_model_config(model, as_json=True)["config"]["ensemble_scheduling"]["step"]]
    before = counts(grpc, members)
    concurrent = grouped(data, "async")
    done, answers = threading.Semaphore(0), {}

    def callback(group):
        def store(result, error):
            answers[group] = error if error is not None else client.outputs(result)
            done.release()
        return store

    for group, feeds in concurrent.items():
        grpc.async_infer(model, client.request(grpc, feeds), callback(group))
    for _ in concurrent:
        if not done.acquire(timeout=120):
            raise SystemExit("a concurrent request got no answer in 120 s")
    # groups named asyncbad<i> are meant to fail (an input the graph cannot take): their errors are reported
    errors = [str(a) for g, a in answers.items() if not isinstance(a, dict) and not g.startswith("asyncbad")]
    if errors:
        raise SystemExit(f"concurrent requests failed: {errors[:2]}")
    report["bad"] = {g: None if isinstance(a, dict) else str(a) for g, a in answers.items() if g.startswith("asyncbad")}
    for group, outs in answers.items():
        if isinstance(outs, dict):
            for name, a in outs.items():
                results[f"{group}/{name}"] = a
    after = counts(grpc, members)
    report["concurrent"] = {m: {"inferences": after[m][0] - before[m][0], "executions": after[m][1] - before[m][1]}
                            for m in members}
    first = next(iter(grouped(data, "b").values()))
    big = {n: np.repeat(a[:1], 33, axis=0) for n, a in first.items()}
    try:
        client.infer(grpc, model, big)
        report["over_max_batch"] = None
    except Exception as e:  # tritonclient's InferenceServerException: the request is refused, the server stays up
        report["over_max_batch"] = str(e)
    grpc.close()
    np.savez(out_path, **results)
    Path(out_path).with_suffix(".json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
