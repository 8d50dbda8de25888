"""Export one component to ONNX with the dynamo exporter, dynamic axes from the capture.

Each component is exported from a fresh deep copy of the model (an export can mutate modules), as a
wrapper whose positional inputs and outputs are exactly the component's flattened tensor leaves.
The remainder fusion is the parent's forward with every encoder replaced by a stub returning the
given outputs, so the parent's own glue is traced as it is.
"""
from __future__ import annotations

import contextlib
import copy
import io
import os
import re
import logging
import warnings
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import onnx
import torch
from torch.utils import _pytree as pytree

from mmopt.capture import Run, Split, nest, stubbed
from mmopt.errors import ExportError, interrupted, raised_by_mmopt
from mmopt.manifest import external_data
from mmopt.spec import ComponentSpec, component_of

TWO_GB = 2 * 1024**3


class CallWrapper(torch.nn.Module):
    """Calls ``module`` with its captured (args, kwargs), tensor leaves replaced by the inputs."""

    def __init__(self, module: torch.nn.Module, run: Run, comp: str):
        super().__init__()
        call = run.calls[comp]
        self.module = module
        self.leaves = [leaf for _, leaf in call.inputs]
        self.tree = call.in_tree
        self.tensor_pos = [i for i, leaf in enumerate(self.leaves) if isinstance(leaf, torch.Tensor)]
        self.out_pos = [i for i, (_, leaf) in enumerate(call.outputs) if isinstance(leaf, torch.Tensor)]

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        leaves = list(self.leaves)
        for pos, t in zip(self.tensor_pos, tensors):
            leaves[pos] = t
        args, kwargs = pytree.tree_unflatten(leaves, self.tree)
        flat = pytree.tree_leaves(self.module(*args, **kwargs))
        return tuple(flat[i] for i in self.out_pos)


def _stub_outputs(out_calls: dict[str, Any], by_source: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Each stubbed encoder call's return value (by call key), rebuilt in its captured structure from the
    graph's inputs (``by_source``: "call key:output" -> tensor); leaves the graph is not given stay as captured."""
    return {c: pytree.tree_unflatten([by_source.get(f"{c}:{n}", leaf) for n, leaf in call.outputs], call.out_tree)
            for c, call in out_calls.items()}


class _Kept(BaseException):  # not an Exception: a model's own `except Exception` must not swallow it
    """Ends the parent's forward once the glued encoder has run: nothing after it belongs to its graph
    (and stubbed outputs of later calls, constants here, would pin dynamic sizes if traced)."""


class _Keeping(torch.nn.Module):
    """In place of a glued encoder inside the parent: runs it, keeps what it returned, stops the forward."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder
        self.kept: Any = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.kept = self.encoder(*args, **kwargs)
        raise _Kept


class GlueWrapper(torch.nn.Module):
    """An encoder whose inputs the parent's forward computes: takes the model inputs and the other
    encoders' outputs, runs the parent's forward with those encoders replaced by their given outputs, and
    returns what this encoder returned there. The graph holds only what those outputs depend on: the glue
    and the encoder (the exporter drops the rest of the forward as dead code). ``model`` is a private
    copy whose encoder is wrapped to keep its outputs."""

    def __init__(self, model: torch.nn.Module, split: Split, spec: ComponentSpec, run: Run):
        super().__init__()
        parent_path, _, attr = spec.module.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        self.keeping = _Keeping(getattr(parent, attr))
        setattr(parent, attr, self.keeping)
        self.model = model
        self.spec = spec
        self.others = {c: s.module for c, s in split.components.items()
                       if s.kind == "encoder" and c != spec.name and
                       any(component_of(v) == c for v in spec.sources.values())}
        self.out_calls = {k: call for k, call in run.calls.items() if component_of(k) in self.others}
        self.out_pos = [i for i, (_, leaf) in enumerate(run.calls[spec.name].outputs) if isinstance(leaf, torch.Tensor)]

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        by_source = {self.spec.sources[t.name]: x for t, x in zip(self.spec.inputs, tensors)}
        slot = _stub_outputs(self.out_calls, by_source)
        kwargs = {src[len("input:"):]: x for src, x in by_source.items() if src.startswith("input:")}
        with stubbed(self.model, self.others, slot):
            try:
                self.model(**nest(kwargs))
            except _Kept:
                pass
        flat = pytree.tree_leaves(self.keeping.kept)
        return tuple(flat[i] for i in self.out_pos)


class RemainderWrapper(torch.nn.Module):
    """The parent's forward with encoders stubbed: inputs are encoder outputs (+ model inputs it reads)."""

    def __init__(self, model: torch.nn.Module, split: Split, encoders: dict[str, str], run: Run):
        super().__init__()
        self.model = model
        self.encoders = encoders
        self.fusion = split.components["fusion"]
        self.run_inputs = run.inputs  # model inputs the remainder does not read: constants, dead code
        self.out_calls = {k: call for k, call in run.calls.items() if component_of(k) in encoders}
        self.out_names = [t.name for t in self.fusion.outputs]
        names = [n for n, _ in run.outputs]
        self.out_index = [names.index(n) for n in self.out_names]

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        given = dict(zip((t.name for t in self.fusion.inputs), tensors))
        by_source = {self.fusion.sources[n]: t for n, t in given.items()}
        slot = _stub_outputs(self.out_calls, by_source)
        kwargs = {n: by_source.get(f"input:{n}", t) for n, t in self.run_inputs.items()}
        with stubbed(self.model, self.encoders, slot):
            flat = pytree.tree_leaves(self.model(**nest(kwargs)))
        return tuple(flat[i] for i in self.out_index)


def _example_size(comp: ComponentSpec) -> str:
    """A capture where every dynamic axis has a size distinct from the others (no accidental
    equalities for the exporter to assume) and no dynamic axis is 1."""
    for size in ("max", "opt", "min"):
        seen: dict[int, str] = {}
        ok = True
        for t in comp.inputs:
            for axis, name in t.dynamic_axes.items():
                v = t.shapes[size][axis]
                if v == 1 or seen.setdefault(v, name) != name:
                    ok = False
        if ok:
            return size
    return "max"


def component_module(model: torch.nn.Module, split: Split, comp: str, size: str) -> torch.nn.Module:
    """A fresh wrapper for ``comp`` built on a deep copy of ``model``."""
    fresh = copy.deepcopy(model).eval()
    run = split.runs[size]
    spec = split.components[comp]
    if spec.glue:
        return GlueWrapper(fresh, split, spec, run)
    if spec.kind == "encoder" or split.fusion_module:
        return CallWrapper(fresh.get_submodule(spec.module), run, comp)
    encoders = {c: s.module for c, s in split.components.items() if s.kind == "encoder"}
    return RemainderWrapper(fresh, split, encoders, run)


def example_inputs(split: Split, comp: str, size: str) -> tuple[torch.Tensor, ...]:
    spec = split.components[comp]
    run = split.runs[size]
    out = []
    for t in spec.inputs:
        src_comp, _, name = spec.sources[t.name].partition(":")
        if src_comp == "input":
            out.append(run.inputs[name])
        else:
            out.append(dict(run.calls[src_comp].outputs)[name])
    return tuple(out)


def export_component(model: torch.nn.Module, split: Split, comp: str, path: Path) -> Path:
    """Export ``comp`` to ``path`` (single file below 2 GB, external data above). Returns the path."""
    spec = split.components[comp]
    size = _example_size(spec)
    module = component_module(model, split, comp, size)
    args = example_inputs(split, comp, size)
    dynamic = tuple({axis: torch.export.Dim.DYNAMIC for axis in t.dynamic_axes} or None for t in spec.inputs)
    nbytes = sum(p.numel() * p.element_size() for p in module.parameters())
    try:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            logging.getLogger("torch").setLevel(logging.ERROR)
            program = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=(dynamic,),
                                        input_names=[t.name for t in spec.inputs],
                                        output_names=[t.name for t in spec.outputs],
                                        optimize=True, verbose=False)
    except Exception as e:
        if interrupted():
            raise KeyboardInterrupt from None  # torch's exporter turned the user's Ctrl-C into this error
        if raised_by_mmopt(e):
            raise  # a bug in mmopt's wrappers keeps its traceback: it is not the user's to fix
        summary = _summary(e)
        raise ExportError(f"component '{comp}' ({spec.module or 'remainder of forward'}): the ONNX export "
                          f"failed: {summary}" + ("" if "Fix:" in summary else
                                                  ". If the message names a data-dependent shape or an unsupported "
                                                  "op, simplify that part of the model or export a different "
                                                  "submodule.")) from e
    if interrupted():  # torch's exporter caught the Ctrl-C and went on with another strategy: stop here
        raise KeyboardInterrupt
    proto = program.model_proto
    name_dims(proto, spec)
    save(proto, path, large=nbytes > TWO_GB)
    return path


_HINTS = (  # (what the exporter says, what the user can do)
    ("data-dependent", "a Python `if` / `bool()` / `.item()` on tensor values cannot be exported: branch on "
                       "shapes, compute both branches with torch.where, or use torch.cond (for an attention "
                       "mask built at run time, pass is_causal=True instead)"),
    ("pack_padded_sequence", "pack_padded_sequence does not export: run the RNN on the padded batch and mask "
                             "its outputs"),
    ("aten.mode", "torch.mode does not export: a vote over a few classes can use one_hot(...).sum(...).argmax()"),
)


def _summary(e: Exception) -> str:
    """The exporter's own one-line cause, the user's file and line it names, and the known fix."""
    texts = []
    c: BaseException | None = e
    while c is not None and len(texts) < 5:
        texts.append(str(c))
        c = c.__cause__ or c.__context__
    text = texts[-1] if texts else str(e)  # the root cause says it most directly
    if "## Exception summary" in str(e):
        text = str(e).split("## Exception summary", 1)[1]
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    out = re.sub(r"^<class '(?:[\w.]+\.)?(\w+)'>:\s*", r"\1: ", lines[0] if lines else type(e).__name__)[:300]
    joined = "\n".join(texts)
    call = re.search(r'The following call raised this error:\s*File "([^"]+)", line (\d+), in (\S+)\s*\n\s*(.+)',
                     joined)
    if call:
        out += f" (at {call.group(1)}:{call.group(2)} in {call.group(3)}: `{call.group(4).strip()[:120]}`)"
    for needle, hint in _HINTS:
        if needle in joined:
            out += f". Fix: {hint}"
            break
    return out


def name_dims(proto: onnx.ModelProto, spec: ComponentSpec) -> None:
    """Give graph inputs / outputs the captured axis names (the exporter invents s0, s1, ...)."""
    for values, specs in ((proto.graph.input, spec.inputs), (proto.graph.output, spec.outputs)):
        by_name = {t.name: t for t in specs}
        for v in values:
            t = by_name.get(v.name)
            if t is None:
                continue
            dims = v.type.tensor_type.shape.dim
            for axis, d in enumerate(dims):
                if axis < len(t.shape) and isinstance(t.shape[axis], str):
                    d.Clear()
                    d.dim_param = t.shape[axis]
                elif axis < len(t.shape):
                    d.Clear()
                    d.dim_value = t.shape[axis]


def save(proto: onnx.ModelProto, path: Path, large: bool = False) -> None:
    """Write ``proto`` to ``path`` (with ``path.data`` beside it past 2 GB). Both names are unlinked first:
    a staged bundle hard-links the live bundle's files, and a save must never write through them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = external_data(path)
    for old in (path, data):
        old.unlink(missing_ok=True)
    if large or proto.ByteSize() > TWO_GB:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name)
    else:
        onnx.save_model(proto, str(path))


@dataclass(frozen=True)
class Simplified:
    """What onnxsim did to one graph: ``ok`` (``dst`` written), node counts, or why not."""

    ok: bool
    before: int
    after: int | None = None
    reason: str = ""

    @property
    def note(self) -> str:
        if not self.ok:
            return self.reason
        grew = " (folding constants and shapes can add nodes)" if (self.after or 0) > self.before else ""
        return f"{self.before} -> {self.after} nodes{grew}"


@contextlib.contextmanager
def native_output() -> Iterator[list[str]]:
    """What C++ code (onnxsim, ONNX Runtime inside it) writes to stdout / stderr, captured at the file
    descriptor level instead of reaching the terminal: its warnings ("failed to run SequenceEmpty op",
    "Skipping constant folding") look like failures next to a passing export. The lines land in the
    yielded list when the block ends."""
    import sys
    import tempfile

    lines: list[str] = []
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:  # a closed descriptor (a daemon, `>&-`): nothing to keep off a terminal
        yield lines
        return
    with tempfile.TemporaryFile() as tmp:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
        os.dup2(tmp.fileno(), 1)
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            for stream in (sys.stdout, sys.stderr):
                if stream is not None:
                    stream.flush()
            _flush_c_streams()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            tmp.seek(0)
            lines.extend(ln for ln in tmp.read().decode(errors="replace").splitlines() if ln.strip())


def _flush_c_streams() -> None:
    """The C library's stdio buffers (C++ code printing to a pipe is fully buffered): flushed while the
    capture is still in place, so nothing reaches the real stdout later."""
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):  # no libc symbols (Windows): Python's flush is all there is
        pass


def simplify(src: Path, dst: Path) -> Simplified:
    """onnxsim on ``src`` into ``dst``; on failure ``dst`` is not written. Only onnxsim and the check of its
    output are inside the ``try``: loading mmopt's own export is not, and saving happens after it. onnxsim's
    native output is kept off the terminal; a failure quotes its last line."""
    import onnxruntime
    import onnxsim

    onnxruntime.set_default_logger_severity(3)  # onnxsim's own sessions: errors only
    model = onnx.load(str(src))
    native: list[str] = []
    try:
        with redirect_stdout(io.StringIO()), native_output() as native:
            simplified, ok = onnxsim.simplify(model, check_n=0)
        onnx.checker.check_model(simplified, full_check=True)
    except Exception as e:  # onnxsim raises plain RuntimeErrors (and others) from C++ and Python alike
        if interrupted():
            raise KeyboardInterrupt from None
        said = f" (it printed: {native[-1][:160]})" if native else ""
        return Simplified(False, len(model.graph.node),
                          reason=f"onnxsim failed: {type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:200] if str(e) else ''}{said}")
    if not ok:
        return Simplified(False, len(model.graph.node), reason="onnxsim's own check failed")
    save(simplified, dst)
    return Simplified(True, len(model.graph.node), len(simplified.graph.node))
