"""The python-backend model that ``mmopt triton --backend python`` writes as every member's ``1/model.py``: it
runs the member's ONNX graph in ONNX Runtime (CPU) inside Triton's python backend.

It is copied into the repository and runs in the server's Python, not in mmopt: it needs numpy (< 2 for the
python backend of Triton 2.51) and onnxruntime there, and nothing of mmopt. Its settings come from
config.pbtxt's ``parameters``:
- ``onnx_file``: the graph in the version folder (a ``model.onnx/`` folder holds a graph with external data);
- ``sha256``: the graph's digest; a graph that differs is refused, and the session is made from the very bytes
  that were hashed (as the device runtime does). A graph with external data (a ``model.onnx/`` folder) loads
  from its path: its data files are covered by mmopt-triton.json's hashes (``mmopt triton --check``), not here;
- ``intra_op_threads``: ONNX Runtime's threads per instance;
- ``batching``: ``concatenate`` when requests may be merged (Triton's dynamic batcher hands ``execute`` a list
  of requests; this model concatenates those of equal shapes on axis 0, runs once and splits the outputs
  back) or ``per-request`` (a graph that mixes rows across its batch runs each request alone).
"""
import hashlib
import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils  # from the python backend's folder, put on sys.path by its stub


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in (cfg.get("parameters") or {}).items()}
        # args["model_repository"] is this model's folder (<repository>/<model>), not the repository
        path = os.path.join(args["model_repository"], args["model_version"], params.get("onnx_file", "model.onnx"))
        external = os.path.isdir(path)
        if external:
            path = os.path.join(path, "model.onnx")
        with open(path, "rb") as f:
            data = f.read()
        want = params.get("sha256")
        if want and hashlib.sha256(data).hexdigest() != want:
            raise pb_utils.TritonModelException(
                f"{path}: sha256 differs from config.pbtxt's parameter sha256: the graph was changed or corrupted. "
                "Write the repository again with `mmopt triton`.")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads") or 1)
        options.inter_op_num_threads = 1
        # several instances share the cores: threads that spin while idle steal them from each other
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # a graph with external data loads from its path (the data files sit beside it), any other from its bytes
        self.session = ort.InferenceSession(path if external else data, options, providers=["CPUExecutionProvider"])
        self.inputs = [t["name"] for t in cfg["input"]]
        self.outputs = [t["name"] for t in cfg["output"]]
        have_in = {i.name for i in self.session.get_inputs()}
        have_out = {o.name for o in self.session.get_outputs()}
        if have_in != set(self.inputs) or not set(self.outputs) <= have_out:
            raise pb_utils.TritonModelException(
                f"{path}: the graph takes {sorted(have_in)} and gives {sorted(have_out)}, config.pbtxt says "
                f"{self.inputs} -> {self.outputs}. Write the repository again with `mmopt triton`.")
        self.concatenate = params.get("batching") == "concatenate" and int(cfg.get("max_batch_size", 0)) > 0

    def execute(self, requests):
        responses = [None] * len(requests)
        feeds, groups = {}, {}
        for i, r in enumerate(requests):
            try:
                feeds[i] = {n: pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.inputs}
            except Exception as e:  # a request missing an input: it alone fails
                responses[i] = self._error(e)
                continue
            # Triton merges only requests of equal shapes; grouping again keeps this right whatever it sends
            key = tuple(feeds[i][n].shape[1:] for n in self.inputs) if self.concatenate else i
            groups.setdefault(key, []).append(i)
        for members in groups.values():
            try:
                if len(members) == 1:
                    outs = [self._run(feeds[members[0]])]
                else:
                    merged = self._run({n: np.concatenate([feeds[i][n] for i in members]) for n in self.inputs})
                    sizes = np.cumsum([feeds[i][self.inputs[0]].shape[0] for i in members])[:-1]
                    outs = [dict(zip(merged, parts)) for parts in zip(*(np.split(a, sizes) for a in merged.values()))]
            except Exception:  # one request the graph cannot take spoils the merged run: each runs alone
                outs = None
            for k, i in enumerate(members):
                try:
                    out = outs[k] if outs is not None else self._run(feeds[i])
                    asked = requests[i].requested_output_names() or self.outputs
                    responses[i] = pb_utils.InferenceResponse(
                        output_tensors=[pb_utils.Tensor(n, np.ascontiguousarray(out[n])) for n in asked])
                except Exception as e:  # an input the graph cannot take: that request fails, the model stays up
                    responses[i] = self._error(e)
        return responses

    @staticmethod
    def _error(e):
        return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(e)))

    def _run(self, feed):
        return dict(zip(self.outputs, self.session.run(self.outputs, feed)))

    def finalize(self):
        self.session = None
