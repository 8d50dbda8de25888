"""The user's data callables: one reader and one validation, for calibration, evaluation and bench inputs.

``[calibration].source`` names a callable yielding dicts of full-model inputs (numpy or torch);
``[evaluation].source`` one yielding ``(inputs, labels)``. Every batch is checked against
``[inputs]`` (names, dtypes, rank, static axes, dynamic axes within [min, max], token ids within
their range, NaN / Inf) and every problem is reported at once, naming the callable and the batch.
A batch larger than the batch dim's max (the graphs' profile) is split, not refused.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from mmopt import dtypes
from mmopt.checkpoint import import_ref
from mmopt.dtypes import to_numpy
from mmopt.errors import CalibrationError, ConfigError, describe, where_raised
from mmopt.spec import ModelSpec


def batch_dim(spec: ModelSpec) -> str | None:
    """The dim every input has as axis 0 (the batch), if there is one."""
    return shared_first_dim(i.shape for i in spec.inputs.values())


def shared_first_dim(shapes: Iterable[Sequence[Any]]) -> str | None:
    """The named dim that is axis 0 of every shape, if there is one (the batch, for model inputs)."""
    firsts = {s[0] if s else None for s in shapes}
    dim = firsts.pop() if len(firsts) == 1 else None
    return dim if isinstance(dim, str) else None


def _flatten(batch: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in batch.items():
        name = f"{prefix}{k}"
        out.update(_flatten(v, name + ".") if isinstance(v, dict) else {name: v})
    return out


def check_batch(spec: ModelSpec, batch: Any, where: str) -> dict[str, np.ndarray]:
    """One batch of full-model inputs as numpy arrays, or a ``CalibrationError`` listing every problem."""
    names = list(spec.inputs)
    if isinstance(batch, dict):  # a forward(batch) model's data may yield {"batch": {"pixel_values": ...}}
        batch = _flatten(batch)
    if not isinstance(batch, dict):
        raise CalibrationError(f"{where} is a {type(batch).__name__}; it must be a dict of full-model inputs "
                               f"with keys {names} (numpy arrays or torch tensors).")
    problems = []
    missing = [n for n in names if n not in batch]
    unexpected = sorted(str(k) for k in batch if k not in spec.inputs)
    if missing:
        problems.append(f"missing inputs: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected inputs: {', '.join(unexpected)} (the model's inputs are {', '.join(names)})")
    out: dict[str, np.ndarray] = {}
    seen_dims: dict[str, tuple[int, str]] = {}
    for name in [n for n in names if n in batch]:
        inp, arr = spec.inputs[name], to_numpy(batch[name])
        if not isinstance(arr, np.ndarray):
            problems.append(f"{name}: is a {type(arr).__name__}, expected a numpy array or torch tensor")
            continue
        want = np.dtype(dtypes.NUMPY[inp.dtype])
        if arr.dtype != want:
            problems.append(f"{name}: dtype {arr.dtype}, expected {want.name} (convert with .astype(np.{want.name}))")
        if arr.ndim != len(inp.shape):
            problems.append(f"{name}: rank {arr.ndim} (shape {list(arr.shape)}), expected {len(inp.shape)} "
                            f"axes {list(inp.shape)}")
            continue
        for axis, (size, decl) in enumerate(zip(arr.shape, inp.shape)):
            if isinstance(decl, int):
                if size != decl:
                    problems.append(f"{name}: axis {axis} is {size}, expected {decl}")
                continue
            d = spec.dims[decl]
            if decl != batch_dim(spec) and not d.min <= size <= d.max:
                problems.append(f"{name}: axis {axis} ('{decl}') is {size}, outside [dims].{decl} = "
                                f"[{d.min}, {d.max}]")
            other = seen_dims.setdefault(decl, (size, name))
            if other[0] != size:
                problems.append(f"{name}: axis {axis} ('{decl}') is {size} but {other[1]} has {decl} = {other[0]}")
        if arr.dtype == want and np.issubdtype(arr.dtype, np.floating) and arr.size and not np.isfinite(arr).all():
            problems.append(f"{name}: {int(np.isnan(arr).sum())} NaN and {int(np.isinf(arr).sum())} Inf values")
        if arr.dtype == want and np.issubdtype(arr.dtype, np.integer) and inp.range is not None and arr.size:
            # [inputs].range is where random ids are drawn; real data may also hold padding ids below it,
            # but an id above it (or a negative one) does not fit the vocabulary.
            lo, hi = inp.range
            if arr.max() > hi or (arr.min() < 0 <= lo):
                problems.append(f"{name}: values span [{arr.min()}, {arr.max()}], outside [0, {hi:g}] "
                                f"(range [{lo:g}, {hi:g}] in [inputs])")
        out[name] = arr
    if problems:
        raise CalibrationError(f"{where} does not fit [inputs] of {spec.path}:\n  " + "\n  ".join(problems))
    return out


def split_rows(spec: ModelSpec, inputs: dict[str, np.ndarray], labels: Any = None) -> list[tuple[dict, Any]]:
    """Chunks no larger than the batch dim's max (the graphs' profile), in order."""
    dim = batch_dim(spec)
    n = len(next(iter(inputs.values())))
    top = spec.dims[dim].max if dim is not None else n
    if n <= top:
        return [(inputs, labels)]
    return [({k: v[i:i + top] for k, v in inputs.items()}, None if labels is None else labels[i:i + top])
            for i in range(0, n, top)]


def iterate(spec: ModelSpec, ref: str, field: str, labelled: bool = False) -> Iterator[tuple[dict, Any]]:
    """Call the ``field`` callable and yield checked ``(inputs, labels)`` (labels None if not ``labelled``)."""
    fn = import_ref(ref, spec.root, field, spec.path)
    what = "(inputs, labels) tuples" if labelled else "dicts of full-model inputs"
    try:
        it = iter(fn())
    except TypeError:
        raise CalibrationError(f"{spec.path}: field '{field}': {ref}() must return an iterable of {what}.") from None
    except (Exception, SystemExit) as e:
        raise CalibrationError(f"{spec.path}: field '{field}': calling {ref}() raised {describe(e)}"
                               f"{where_raised(e)}. Fix that function.") from None
    i = 0
    while True:
        try:
            item = next(it)
        except StopIteration:
            if i == 0:
                raise CalibrationError(f"{spec.path}: field '{field}': {ref}() yielded nothing. It must yield "
                                       f"{what}.") from None
            return
        except (Exception, SystemExit) as e:
            raise CalibrationError(f"{spec.path}: field '{field}': {ref}() raised {describe(e)} while producing "
                                   f"batch {i}{where_raised(e)}. Fix that function.") from None
        where = f"{spec.path}: field '{field}': batch {i} from {ref}()"
        labels = None
        if labelled:
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise CalibrationError(f"{where} is a {type(item).__name__}; it must be an (inputs, labels) pair.")
            item, labels = item[0], np.asarray(to_numpy(item[1]))
        inputs = check_batch(spec, item, where)
        if labelled:
            n = len(next(iter(inputs.values())))
            if labels.ndim != 1 or len(labels) != n or not np.issubdtype(labels.dtype, np.integer):
                raise CalibrationError(f"{where}: labels must be integer class ids of shape [{n}], got "
                                       f"{labels.dtype} {list(labels.shape)}.")
        for part in split_rows(spec, inputs, labels):
            yield part
        i += 1


def take(batches: Iterator[tuple[dict, Any]], samples: int | None) -> Iterator[tuple[dict, Any]]:
    """The first ``samples`` rows of ``batches`` (all when None); stops pulling once enough are seen."""
    got = 0
    for inputs, labels in batches:
        n = len(next(iter(inputs.values())))
        if samples is not None and got + n > samples:
            n = samples - got
            inputs = {k: v[:n] for k, v in inputs.items()}
            labels = labels[:n] if labels is not None else None
        if n > 0:
            yield inputs, labels
        got += n
        if samples is not None and got >= samples:
            return


def read(spec: ModelSpec, kind: str, samples: int | None = None) -> Iterator[tuple[dict[str, np.ndarray], Any]]:
    """``(inputs, labels)`` from the configured ``kind`` ("calibration" | "evaluation") callable, checked,
    cut to the exported batch range, the first ``samples`` rows (all when None). Labels are None for
    calibration."""
    conf = getattr(spec, kind)
    if conf is None:
        raise ConfigError(f"{spec.path}: no [{kind}] table naming a data callable. Add [{kind}] "
                          f'source = "module:function".')
    yield from take(iterate(spec, conf.source, f"{kind}.source", labelled=kind == "evaluation"), samples)
