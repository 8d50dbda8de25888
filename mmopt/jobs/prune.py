"""``mmopt prune``: structural pruning of chosen components, label-free recovery, a rebuildable checkpoint.

1. The model is built and captured as for export; the components to prune are named with the share to keep
   of their multiply-accumulates (MACs), or of their exported graph's latency (``target="latency"``,
   measured on ONNX Runtime after every step).
2. Torch-Pruning's dependency graph removes whole channels (convolutions, linears, norms, residual adds,
   concats and attention stay consistent), step by step by L2 magnitude until the target is reached. Layers
   whose output channels are the component's outputs are frozen (found by a dry run: pruning them would
   change what the rest of the model reads), so the pruned component fits the rest unchanged. Kept channel
   counts are rounded down to a multiple of ``align`` (8: fp16 tensor cores; 16 for int8). Attention blocks
   with per-head q / k / v projections first lose the same share of whole heads; optionally, weights are
   then made 2:4 sparse (``sparse_2_4``).
3. Recovery without labels: the pruned model is distilled from the unpruned one on ``[calibration]`` data,
   MSE on the pruned components' outputs plus KL on the model's score outputs (MSE on all its float outputs
   when none is named), for a bounded number of steps, seeded.
4. Proof: parameters, MACs and the component's eager latency (interleaved runs) before and after, and with
   ``[evaluation]`` the task score of the original, the pruned model before recovery and after it, on the same
   samples; ``[tolerance].max_accuracy_drop`` gates the last against the first.
5. Output, next to the original config (its factory and data sources import from that folder): the pruned
   weights as safetensors, whose metadata holds the plan (each pruned module's sizes) that shapes the
   factory's fresh model before loading (``mmopt.checkpoint.apply_plan``; no pickled module), a copy of the
   config pointing at them, and a JSON report with the lineage and the measurements.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from mmopt.capture import flatten_named, split as capture_split
from mmopt.checkpoint import HEAD_STYLES, PLAN_KEY, SIZE_ATTRS, build_model, is_size
from mmopt.data import read
from mmopt.errors import ConfigError, MmoptError, UsageError
from mmopt.judge import latency
from mmopt.judge.accuracy import evaluate
from mmopt.progress import Progress
from mmopt.manifest import sha256_file
from mmopt.runners.eager import EagerRunner, to_torch
from mmopt.spec import ModelSpec, load_spec
from mmopt.store import atomic_write

HOW_TO_INSTALL = "Install the pruning extra: pip install -e '.[prune]' (Torch-Pruning)."
STEPS_PER_TARGET = 40  # pruning steps from nothing to the largest channel share, each a small cut
MAX_CHANNEL_SHARE = 0.9  # at most this share of a layer's channels goes
SEED = 0


class PruneError(MmoptError):
    """The target could not be met, or the pruned model misses the accuracy budget (exit code 1)."""


@dataclasses.dataclass
class PruneResult:
    config: Path
    checkpoint: Path
    report_path: Path
    report: dict[str, Any]
    seconds: float


def _torch_pruning() -> Any:
    try:
        import torch_pruning
    except ImportError:
        raise UsageError(f"mmopt prune needs Torch-Pruning, which is not installed. {HOW_TO_INSTALL}") from None
    return torch_pruning


def check_targets(spec: ModelSpec, split: Any, targets: dict[str, float]) -> None:
    if not targets:
        raise UsageError("nothing to prune: name components and the share to keep (of their MACs, or of their "
                         "latency with --target latency), e.g. -p image=0.5.")
    for comp, ratio in targets.items():
        if comp not in split.components:
            raise UsageError(f"-p {comp}={ratio}: no component '{comp}'; the components are "
                             f"{', '.join(split.components)}.")
        if not (isinstance(ratio, (int, float)) and 0.0 < ratio < 1.0):
            raise UsageError(f"-p {comp}={ratio}: the share to keep must be between 0 and 1 (e.g. 0.5 keeps half).")
        if not split.components[comp].module:
            raise UsageError(f"-p {comp}={ratio}: '{comp}' is the rest of the model's forward, not one module. Name "
                             "the head module with [components].fusion to prune it.")
    if spec.calibration is None:
        raise ConfigError(f"{spec.path}: no [calibration] table: pruning recovers the model by distilling it from "
                          "the unpruned one on calibration data (no labels needed). Add [calibration] source = "
                          '"module:function".')


def output_path(config: Path, out: Path) -> Path:
    out = Path(out)
    if out.suffix != ".toml":
        raise UsageError(f"-o {out}: name the pruned config to write, a .toml file beside {config.name} "
                         f"(e.g. -o {config.with_name(config.stem + '.pruned.toml').name}).")
    if out.resolve().parent != config.resolve().parent:
        raise UsageError(f"-o {out}: write the pruned config beside {config} (in {config.resolve().parent}): its "
                         "factory and data sources import from that folder.")
    if out.resolve() == config.resolve():
        raise UsageError(f"-o {out}: that is the config being pruned; choose a new name, e.g. "
                         f"{config.with_name(config.stem + '.pruned.toml').name}.")
    return out.resolve()


# ---- the component as Torch-Pruning sees it ---------------------------------------------------------

class _Bound(torch.nn.Module):
    """The component called as the model calls it (recorded args and kwargs), returning its flat outputs."""

    def __init__(self, module: torch.nn.Module, kwargs: dict[str, Any]):
        super().__init__()
        self.module, self.kwargs = module, kwargs

    def forward(self, *args: Any) -> tuple[torch.Tensor, ...]:
        named, _ = flatten_named(self.module(*args, **self.kwargs), "")
        return tuple(t for _, t in named if isinstance(t, torch.Tensor))


def recorded_call(model: torch.nn.Module, path: str, runner: EagerRunner, feeds: dict[str, np.ndarray]
                  ) -> tuple[tuple, dict]:
    """The (args, kwargs) ``model`` passes the submodule at ``path`` on ``feeds``."""
    seen: list[tuple[tuple, dict]] = []
    handle = model.get_submodule(path).register_forward_pre_hook(
        lambda m, a, k: seen.append((tuple(a), dict(k))) if not seen else None, with_kwargs=True)
    try:
        with torch.no_grad():
            runner.forward(to_torch(feeds, runner.inputs, "cpu"))
    finally:
        handle.remove()
    if not seen:
        raise PruneError(f"the model's forward never called '{path}' on the first calibration batch, so there is "
                         "nothing to prune it against.")
    return seen[0]


ROOTS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear, torch.nn.MultiheadAttention)


def _roots(tp: Any, module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The layers a pruning step can start from (an attention block is one: its projections go with it)."""
    inside = {id(p) for m in module.modules() if isinstance(m, torch.nn.MultiheadAttention) for p in m.modules()
              if p is not m}
    return [(n, m) for n, m in module.named_modules() if isinstance(m, ROOTS) and id(m) not in inside]


def output_shapes(module: torch.nn.Module, args: tuple) -> list[tuple[int, ...]]:
    """The shapes of ``module``'s outputs on ``args``: what the rest of the model reads, so what must not change."""
    with torch.no_grad():
        return [tuple(t.shape) for t in module(*args)]


def frozen_layers(tp: Any, bound: _Bound, args: tuple, shapes: list[tuple[int, ...]],
                  skip: set[torch.nn.Module] = frozenset()) -> list[torch.nn.Module]:
    """Layers whose output channels reach the component's outputs (``shapes``): a dry run pruning one channel of
    each (on a copy) that changes an output's shape. These keep their width, so the rest reads the same."""
    frozen = []
    for name, layer0 in _roots(tp, bound):
        if layer0 in skip:  # q / k / v projections: they lose whole heads, never a single channel
            continue
        trial = copy.deepcopy(bound)
        layer = trial.get_submodule(name)
        width = getattr(layer, "out_channels", getattr(layer, "out_features", getattr(layer, "embed_dim", 0)))
        if width < 2:
            frozen.append(bound.get_submodule(name))
            continue
        graph = tp.DependencyGraph().build_dependency(trial, example_inputs=args)
        pruner = graph.get_pruner_of_module(layer)
        if pruner is None:
            frozen.append(bound.get_submodule(name))
            continue
        group = graph.get_pruning_group(layer, pruner.prune_out_channels, idxs=[0])
        if not graph.check_pruning_group(group):
            frozen.append(bound.get_submodule(name))
            continue
        group.prune()
        try:
            after = output_shapes(trial, args)
        except Exception:  # one channel fewer breaks the forward (heads no longer divide it, a check): keep it
            after = None
        if after != shapes:
            frozen.append(bound.get_submodule(name))
    return frozen


def macs_and_params(tp: Any, bound: _Bound, args: tuple) -> tuple[float, int]:
    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(bound, args)
    return float(macs), int(params)


def attention_blocks(module: torch.nn.Module) -> list[tuple[torch.nn.Module, tuple]]:
    """(block, style) of every attention block with per-head q / k / v linears (``HEAD_STYLES``) of one width,
    heads x head size: grouped-query blocks (k / v narrower than q) are not matched and keep their heads."""
    out = []
    for m in module.modules():
        for style in HEAD_STYLES:
            heads, size, projs, _ = style
            if not (all(isinstance(getattr(m, a, None), int) for a in (heads, size)) and
                    all(isinstance(getattr(m, n, None), torch.nn.Linear) for n in projs)):
                continue
            widths = {getattr(m, n).out_features for n in projs}
            if widths == {getattr(m, heads) * getattr(m, size)}:
                out.append((m, style))
            break
    return out


def fix_head_counts(blocks: list[tuple[torch.nn.Module, tuple]]) -> None:
    """After heads went: each block's head count (and what follows from it) from its q projection's width;
    the head size never changes."""
    for m, (heads, size, projs, derived) in blocks:
        width = getattr(m, projs[0]).out_features
        setattr(m, heads, width // getattr(m, size))
        for attr in derived:
            setattr(m, attr, width)


def heads_to_drop(heads: int, keep: float) -> int:
    """Whole heads to remove for a kept share: the share of heads that goes, rounded down (float error
    aside), at least one head left."""
    return max(0, min(heads - 1, math.floor(heads * (1.0 - keep) + 1e-9)))


def prune_heads(tp: Any, bound: _Bound, args: tuple, blocks: list[tuple[torch.nn.Module, tuple]], keep: float,
                frozen: list[torch.nn.Module], shapes: list[tuple[int, ...]]
                ) -> tuple[list[list[Any]], list[torch.nn.Module]]:
    """Remove the same share of whole heads (``heads_to_drop``) from each attention block with per-head
    projections: the heads whose q / k / v rows (and, where the block holds it, output-projection columns)
    have the smallest L2 norm. The dependency graph carries each removal through q, k, v and the output
    projection. A block is left whole when a dry run shows the removal reaching a frozen layer or changing
    an output's shape (attention maps or a key / value cache among the outputs), or the forward failing.
    Returns the history and the blocks that kept their heads."""
    history, whole = [], []
    names = {id(m): n.removeprefix("module.") for n, m in bound.named_modules()}
    for block, style in blocks:
        heads_attr, size_attr, projs, _ = style
        heads, size = getattr(block, heads_attr), getattr(block, size_attr)
        drop = heads_to_drop(heads, keep)
        if drop < 1:
            continue
        q, k, v = (getattr(block, n) for n in projs)
        rows = sum(p.weight.detach().reshape(heads, size, -1).pow(2).sum((1, 2)) for p in (q, k, v))
        out_proj = next((c for c in block.modules() if isinstance(c, torch.nn.Linear) and c not in (q, k, v)
                         and c.in_features == q.out_features), None)
        if out_proj is not None:  # CLIP-style blocks hold their output projection; BERT's sits beside them
            rows = rows + out_proj.weight.detach().reshape(out_proj.out_features, heads, size).pow(2).sum((0, 2))
        gone = sorted(int(h) for h in torch.argsort(rows)[:drop])
        idxs = [h * size + i for h in gone for i in range(size)]
        if not _heads_can_go(tp, bound, args, block, style, idxs, frozen, shapes, drop):
            whole.append(block)
            continue
        graph = tp.DependencyGraph().build_dependency(bound, example_inputs=args)
        graph.get_pruning_group(q, tp.prune_linear_out_channels, idxs=idxs).prune()
        fix_head_counts([(block, style)])
        history.append([names[id(q)], True, idxs])
    return history, whole


def _heads_can_go(tp: Any, bound: _Bound, args: tuple, block: torch.nn.Module, style: tuple, idxs: list[int],
                  frozen: list[torch.nn.Module], shapes: list[tuple[int, ...]], drop: int) -> bool:
    """The removal of ``idxs`` from ``block``'s q tried on a copy: q, k and v all narrowed by the same heads,
    no frozen layer touched, every output's shape kept, the forward still running."""
    heads_attr, size_attr, projs, _ = style
    path = next(n for n, m in bound.named_modules() if m is block)
    trial = copy.deepcopy(bound)
    t_block = trial.get_submodule(path)
    frozen_names = {n for n, m in bound.named_modules() if m in frozen}
    t_frozen = {id(trial.get_submodule(n)) for n in frozen_names}
    graph = tp.DependencyGraph().build_dependency(trial, example_inputs=args)
    group = graph.get_pruning_group(getattr(t_block, projs[0]), tp.prune_linear_out_channels, idxs=idxs)
    touched = {id(dep.target.module) for dep, _ in group if dep.handler in (tp.prune_linear_out_channels,
                                                                           tp.prune_conv_out_channels)}
    if touched & t_frozen or not graph.check_pruning_group(group):
        return False
    group.prune()
    fix_head_counts([(t_block, style)])
    want = (getattr(block, heads_attr) - drop) * getattr(block, size_attr)
    if {getattr(t_block, n).out_features for n in projs} != {want}:
        return False
    try:
        return output_shapes(trial, args) == shapes
    except Exception:
        return False


def prune_component(tp: Any, bound: _Bound, args: tuple, keep: float, align: int, log: Callable[[str], None],
                    latency_ratio: Callable[[], float] | None = None) -> dict[str, Any]:
    """Prune ``bound`` in place until its MACs are at most ``keep`` of what they were (or, given
    ``latency_ratio``, until that measurement of the exported graph is); what was reached. Attention blocks
    lose whole heads (their q / k / v projections in head-sized groups), never head size."""
    macs0, params0 = macs_and_params(tp, bound, args)
    blocks = attention_blocks(bound)
    heads_before = {id(m): getattr(m, st[0]) for m, st in blocks}
    qkv = [getattr(m, n) for m, style in blocks for n in style[2]]
    shapes = output_shapes(bound, args)  # before anything goes: what the rest reads
    frozen = frozen_layers(tp, bound, args, shapes, skip=set(qkv))
    head_history, whole = prune_heads(tp, bound, args, blocks, keep, frozen, shapes)
    heads = {m: m.num_heads for m in bound.modules() if isinstance(m, torch.nn.MultiheadAttention)}
    pruner = tp.pruner.MetaPruner(bound, args, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=MAX_CHANNEL_SHARE, iterative_steps=STEPS_PER_TARGET,
                                  ignored_layers=[*frozen, *qkv], round_to=align, num_heads=heads)
    now = output_shapes(bound, args)
    if now != shapes:
        raise PruneError(f"removing attention heads changed the component's output shapes {shapes} -> {now}. Report "
                         "the model; prune another component meanwhile.")
    steps = 0
    macs, params = macs_and_params(tp, bound, args)  # after the heads went
    ratios: list[float] = []

    def short() -> bool:
        if latency_ratio is None:
            return macs > keep * macs0
        ratios.append(latency_ratio())
        if ratios[-1] <= keep:  # a noisy machine: confirm a hit with a second measurement before stopping
            ratios[-1] = max(ratios[-1], latency_ratio())
        log(f"  step {steps}: {macs / macs0:.0%} of the MACs, exported graph at {ratios[-1]:.2f}x the original's "
            "latency")
        return ratios[-1] > keep

    while short() and steps < STEPS_PER_TARGET:
        pruner.step()
        steps += 1
        macs, params = macs_and_params(tp, bound, args)
        now = output_shapes(bound, args)
        if now != shapes:  # the frozen layers must have kept every output as it was
            raise PruneError(f"pruning changed the component's output shapes {shapes} -> {now}; mmopt froze too "
                             "little. Report the model; prune another component meanwhile.")
    return {"macs_before": macs0, "macs_after": macs, "macs_kept": round(macs / macs0, 4) if macs0 else 1.0,
            "params_before": params0, "params_after": params, "params_kept": round(params / params0, 4),
            "pruning_steps": steps, **({"latency_ratio_per_step": ratios} if latency_ratio else {}),
            "attention_heads": [{"block": n.removeprefix("module."), "heads_before": heads_before[id(m)],
                                 "heads": getattr(m, st[0]), "head_size": getattr(m, st[1])}
                                for n, m in bound.named_modules() for b_, st in blocks if b_ is m],
            "frozen_layers": [n.removeprefix("module.") for n, m in _roots(tp, bound) if m in frozen],
            "attention_blocks_kept_whole": [n.removeprefix("module.") for n, m in bound.named_modules() if m in whole],
            "history": head_history + [[name.removeprefix("module."), bool(out), [int(i) for i in idxs]]
                                       for name, out, idxs in pruner.pruning_history()]}


# ---- the plan: what shapes a fresh model --------------------------------------------------------------

def plan_of(original: torch.nn.Module, pruned: torch.nn.Module) -> dict[str, Any]:
    """Every module whose sizes changed: its integer attributes and its tensors' shapes."""
    before = dict(original.named_modules())
    modules: dict[str, Any] = {}
    for name, mod in pruned.named_modules():
        old = before.get(name)
        if old is None or not name:
            continue
        changed = {k: v for k, v in vars(mod).items()
                   if not k.startswith("_") and is_size(v) and is_size(getattr(old, k, None)) and v != getattr(old, k)}
        unknown = [k for k in changed if k not in SIZE_ATTRS and not (k == "groups" and getattr(old, "groups", 0) ==
                                                                       getattr(old, "in_channels", -1))]
        if unknown:
            raise PruneError(f"pruning changed {name}.{', '.join(unknown)}, which is not a size a pruned checkpoint may "
                             "record. Report the model; prune another component meanwhile.")
        attrs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in changed.items()}
        tensors: dict[str, list[int]] = {}
        for k, t in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]:
            ref = getattr(old, k, None)
            if t is not None and isinstance(ref, torch.Tensor) and tuple(t.shape) != tuple(ref.shape):
                tensors[k] = list(t.shape)
        if attrs or tensors:
            modules[name] = {**({"attrs": attrs} if attrs else {}), **({"tensors": tensors} if tensors else {})}
    return {"format": 1, "modules": modules}


# ---- recovery ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def _outputs_of(model: torch.nn.Module, paths: dict[str, str]) -> Iterator[dict[str, list[torch.Tensor]]]:
    got: dict[str, list[torch.Tensor]] = {c: [] for c in paths}
    handles = []
    for comp, path in paths.items():
        def post(m, a, out, comp=comp):
            got[comp].extend(t for _, t in flatten_named(out, "")[0] if isinstance(t, torch.Tensor)
                             and t.is_floating_point())
        handles.append(model.get_submodule(path).register_forward_hook(post))
    try:
        yield got
    finally:
        for h in handles:
            h.remove()


def distill(student: torch.nn.Module, teacher: torch.nn.Module, paths: dict[str, str], split: Any,
            batches: list[dict[str, np.ndarray]], scores: set[str], steps: int, progress: Progress,
            masks: dict[torch.nn.Parameter, torch.Tensor] | None = None) -> list[float]:
    """``steps`` Adam steps on the pruned components' parameters: MSE on their outputs (relative to the
    teacher's scale) plus KL on the score outputs (MSE on every float output when none is named). ``masks``
    (2:4 sparsity) are applied again after every step, so the zeros stay zeros."""
    torch.manual_seed(SEED)
    trainable = [p for path in paths.values() for p in student.get_submodule(path).parameters()]
    for p in student.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.Adam(trainable, lr=1e-3)
    s_run = EagerRunner(student, split.model_inputs, split.model_outputs)
    t_run = EagerRunner(teacher, split.model_inputs, split.model_outputs)
    teacher.eval()
    student.eval()
    for path in paths.values():
        student.get_submodule(path).train()  # norms re-estimate their statistics for the narrower inputs
    losses = []
    with progress.task(f"recover {', '.join(paths)}: distil from the unpruned model", steps) as advance:
        for step in range(steps):
            feeds = batches[step % len(batches)]
            tensors = to_torch(feeds, s_run.inputs, "cpu")
            with torch.no_grad(), _outputs_of(teacher, paths) as t_inner:
                t_out = t_run.forward(tensors)
            with _outputs_of(student, paths) as s_inner:
                s_out = s_run.forward(tensors)
            loss = torch.zeros(())
            for comp in paths:
                for s, t in zip(s_inner[comp], t_inner[comp]):
                    loss = loss + torch.mean((s - t) ** 2) / (torch.mean(t ** 2) + 1e-8)
            for name, t in t_out.items():
                s = s_out[name]
                if not t.is_floating_point():
                    continue
                if name in scores and t.ndim >= 2:
                    loss = loss + torch.nn.functional.kl_div(torch.log_softmax(s, -1), torch.log_softmax(t, -1),
                                                             log_target=True, reduction="batchmean")
                elif not scores:
                    loss = loss + torch.mean((s - t) ** 2) / (torch.mean(t ** 2) + 1e-8)
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                for param, mask in (masks or {}).items():
                    param.mul_(mask)
            losses.append(float(loss.detach()))
            advance(1)
    student.eval()
    for p in student.parameters():
        p.requires_grad_(False)
    return losses


def _component_ms(bound_before: _Bound, bound_after: _Bound, args: tuple) -> dict[str, float]:
    def call(b: _Bound) -> Callable[[], Any]:
        def run() -> Any:
            with torch.inference_mode():
                return b(*args)
        return run

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ms = latency.median_ms({"before": call(bound_before), "after": call(bound_after)}, rounds=25)
    finally:
        torch.set_num_threads(before)
    return {"eager_ms_before": round(ms["before"], 4), "eager_ms_after": round(ms["after"], 4),
            "eager_latency_ratio": round(ms["after"] / ms["before"], 3) if ms["before"] else math.nan}


def _onnx_latency(original: torch.nn.Module, student: torch.nn.Module, split: Any, comp: str, tmp: Path
                  ) -> Callable[[], float]:
    """A measurement: ``comp`` of ``student`` exported as ``mmopt export`` does and timed against the original's
    export (ONNX Runtime CPU, one thread, the opt-size capture, medians of interleaved rounds): the ratio."""
    from mmopt.ort import session
    from mmopt.stages.export import example_inputs, export_component

    spec = split.components[comp]
    tmp.mkdir(parents=True, exist_ok=True)
    feeds = {t.name: a.detach().numpy() for t, a in zip(spec.inputs, example_inputs(split, comp, "opt"))}
    base = session(str(export_component(original, split, comp, tmp / "original.onnx")), threads=1)

    def ratio() -> float:
        now = session(str(export_component(student, split, comp, tmp / "pruned.onnx")), threads=1)
        ms = latency.median_ms({"original": lambda: base.run(None, feeds), "pruned": lambda: now.run(None, feeds)},
                               rounds=20)
        return ms["pruned"] / ms["original"]
    return ratio


# ---- 2:4 semi-structured sparsity ------------------------------------------------------------------

def _grouped(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight`` as [rows, groups, 4] along its input dimension (a conv's input channels, per output and
    kernel position: the layout TensorRT's sparse kernels read), or None when that dimension is not a
    multiple of 4."""
    w = weight.detach()
    if w.ndim == 4:
        w = w.permute(0, 2, 3, 1)  # [out, kh, kw, in]
    elif w.ndim != 2:
        return None
    if w.shape[-1] % 4:
        return None
    return w.reshape(-1, w.shape[-1] // 4, 4)


def two_four_masks(module: torch.nn.Module) -> dict[torch.nn.Parameter, torch.Tensor]:
    """For every Conv / Linear weight of ``module`` with a 4-divisible input dimension: the mask keeping the
    two largest magnitudes of each 4 consecutive input weights (semi-structured 2:4)."""
    masks = {}
    for m in module.modules():
        if not isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) or getattr(m, "groups", 1) != 1:
            continue
        g = _grouped(m.weight)
        if g is None:
            continue
        keep = torch.zeros_like(g, dtype=torch.bool)
        keep.scatter_(-1, g.abs().topk(2, dim=-1).indices, True)
        mask = keep.reshape(*(m.weight.permute(0, 2, 3, 1).shape if m.weight.ndim == 4 else m.weight.shape))
        if m.weight.ndim == 4:
            mask = mask.permute(0, 3, 1, 2)
        masks[m.weight] = mask.to(m.weight.dtype).contiguous()
    return masks


def two_four_pattern(onnx_path: Path, shapes: list[tuple[int, ...]] | None = None) -> dict[str, int]:
    """How many of the exported graph's weights hold the 2:4 pattern along their input axis (axis 1 of a Conv
    weight [out, in, kh, kw]; of a 2-D weight, axis 1 when it is stored [out, in] as Gemm's, axis 0 when
    [in, out] as MatMul's), and how many weights of rank 2 or 4 there are. With ``shapes`` (the masked
    parameters' [out, in, ...] shapes), only initializers of those shapes, or transposed 2-D ones, count."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(onnx_path))
    wanted = None if shapes is None else {tuple(s) for s in shapes}
    found, total = 0, 0
    for t in proto.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.ndim not in (2, 4) or a.size < 4:
            continue
        if wanted is not None:
            if tuple(a.shape) in wanted:
                view = np.moveaxis(a, 1, -1)  # [out, in, ...] as the module holds it
            elif a.ndim == 2 and tuple(a.shape[::-1]) in wanted:
                view = a.T  # MatMul's [in, out]
            else:
                continue
        else:
            view = np.moveaxis(a, 1, -1) if a.ndim == 4 else a
        total += 1
        if view.shape[-1] % 4 == 0 and (np.count_nonzero(view.reshape(-1, 4), axis=1) <= 2).all():
            found += 1
    return {"weights_2_4": found, "weights": total}


# ---- the job ----------------------------------------------------------------------------------------

TARGETS = ("macs", "latency")


def prune(config: str | Path, targets: dict[str, float], out: str | Path, align: int = 8, steps: int = 300,
          trust_checkpoint: bool = False, progress: Progress | None = None, target: str = "macs",
          sparse_2_4: bool = False) -> PruneResult:
    """``targets``: component -> the share to keep of its MACs (``target="macs"``) or of its exported graph's
    latency on ONNX Runtime CPU, one thread, at the opt size (``target="latency"``: measured after every
    pruning step, interleaved with the original graph)."""
    progress = progress or Progress()
    t0 = time.perf_counter()
    if align < 1 or steps < 0:
        raise UsageError(f"--align {align} / --steps {steps}: the alignment is at least 1 and the steps at least 0.")
    if target not in TARGETS:
        raise UsageError(f"--target {target}: choose one of {', '.join(TARGETS)}.")
    spec = load_spec(config)
    out_config = output_path(spec.path, Path(out))
    weights, report_path = out_config.with_suffix(".safetensors"), out_config.with_suffix(".prune.json")
    check_outputs(spec, out_config, weights, report_path)
    config_text = pruned_config_text(spec.path, weights.name)  # before any work: a config it cannot edit fails now
    tp = _torch_pruning()
    original = build_model(spec, trust_checkpoint)
    split = capture_split(original, spec)
    check_targets(spec, split, targets)
    paths = {c: split.components[c].module for c in targets}
    progress.log(f"loaded {spec.factory} ({sum(p.numel() for p in original.parameters()):,} parameters)")

    batches = [inputs for inputs, _ in read(spec, "calibration", spec.calibration.samples)]
    if not batches:
        raise ConfigError(f"{spec.path}: field 'calibration.source': {spec.calibration.source}() yielded no batches.")
    runner = EagerRunner(original, split.model_inputs, split.model_outputs)
    student = copy.deepcopy(original)
    s_runner = EagerRunner(student, split.model_inputs, split.model_outputs)
    components: dict[str, Any] = {}
    bounds: dict[str, tuple[_Bound, _Bound, tuple]] = {}
    what = "MACs" if target == "macs" else "exported latency"
    with tempfile.TemporaryDirectory(prefix="mmopt-prune-") as scratch, \
            progress.task(f"prune {', '.join(f'{c} to {r:.0%} of its {what}' for c, r in targets.items())}",
                          len(targets)) as advance:
        onnx_ratio = {c: _onnx_latency(original, student, split, c, Path(scratch) / c) for c in targets}
        for comp, keep in targets.items():
            args, kwargs = recorded_call(student, paths[comp], s_runner, batches[0])
            bound = _Bound(student.get_submodule(paths[comp]), kwargs)
            reached = prune_component(tp, bound, args, keep, align, progress.log,
                                      onnx_ratio[comp] if target == "latency" else None)
            if reached["params_after"] >= reached["params_before"]:
                raise PruneError(f"-p {comp}={keep}: nothing in '{comp}' could be pruned: every layer's output channels "
                                 f"are its outputs, it has no convolution or linear layer, or its layers are no wider "
                                 f"than --align {align} (kept channels are rounded down to multiples of it: lower it).")
            if target == "latency" and reached["latency_ratio_per_step"][-1] > keep:
                got = reached["latency_ratio_per_step"][-1]
                ask = (f"Ask for at least {math.ceil(got * 100) / 100:.2f}" if got < 0.99 else
                       "Pruning does not make it faster here: prune by MACs (--target macs) or not at all")
                raise PruneError(f"-p {comp}={keep}: after {reached['pruning_steps']} pruning steps ({reached['macs_kept']:.0%} "
                                 f"of the MACs) {comp}'s exported graph still runs at {got:.2f}x the original's latency "
                                 f"on ONNX Runtime CPU. {ask}. Nothing was written.")
            if target == "macs" and reached["macs_kept"] > keep:
                least = math.ceil(reached["macs_kept"] * 100) / 100
                raise PruneError(f"-p {comp}={keep}: pruning stopped at {reached['macs_kept']:.1%} of {comp}'s MACs "
                                 f"(at most about {MAX_CHANNEL_SHARE:.0%} of each layer's channels go, the layers that "
                                 f"feed its outputs keep theirs, and --align {align} rounds what is kept). Ask for at "
                                 f"least {least:.2f}, or lower --align. Nothing was written.")
            components[comp] = {"target": target, "target_kept": keep, **reached}
            b_args, b_kwargs = recorded_call(original, paths[comp], runner, batches[0])
            bounds[comp] = (_Bound(original.get_submodule(paths[comp]), b_kwargs), bound, args)
            advance(1)
            # the exported graphs, original and pruned, timed in one run
            components[comp]["onnx_latency_ratio"] = round(onnx_ratio[comp](), 3)
    for comp, (before, after, args) in bounds.items():
        components[comp].update(_component_ms(before, after, args))
        components[comp]["aligned_to"] = align

    scores = set(spec.score_outputs)
    accuracy: dict[str, Any] | None = None
    masks: dict[torch.nn.Parameter, torch.Tensor] = {}
    if sparse_2_4:  # after the channels went: the kept weights, then recovery with the zeros held
        for comp, path in paths.items():
            comp_masks = two_four_masks(student.get_submodule(path))
            with torch.no_grad():
                for param, mask in comp_masks.items():
                    param.mul_(mask)
            if not comp_masks:
                raise PruneError(f"--sparse-2-4: no Conv / Linear weight of '{comp}' has an input dimension that is a "
                                 "multiple of 4 after pruning, so none can be 2:4 sparse. Drop --sparse-2-4 or use an "
                                 "--align that is a multiple of 4. Nothing was written.")
            masks.update(comp_masks)
            components[comp]["sparse_2_4"] = {"layers": len(comp_masks)}
    if spec.evaluation:  # the pruned (and 2:4-masked) model as it is before recovery
        accuracy = {"before_recovery": _score(spec, student, split, progress, "pruned")}
    losses = distill(student, original, paths, split, batches, scores, steps, progress, masks)
    if sparse_2_4:
        from mmopt.stages.export import export_component

        with tempfile.TemporaryDirectory(prefix="mmopt-prune-") as scratch:
            for comp in paths:
                shapes_2_4 = [tuple(prm.shape) for prm in masks if any(prm is q for q in
                                                                        student.get_submodule(paths[comp]).parameters())]
                found = two_four_pattern(export_component(student, split, comp, Path(scratch) / f"{comp}.onnx"),
                                         shapes_2_4)
                if found["weights_2_4"] < components[comp]["sparse_2_4"]["layers"]:
                    raise PruneError(f"{comp}: {components[comp]['sparse_2_4']['layers']} weights were made 2:4 "
                                     f"sparse, but only {found['weights_2_4']} of the exported graph's hold the "
                                     "pattern. Report the model.")
                components[comp]["sparse_2_4"].update(
                    found, pattern_verified_in_onnx=True,
                    speed="not measurable here: 2:4 kernels exist only in TensorRT on Ampere or newer GPUs; build "
                          "with `mmopt build --sparse` there and keep it only if `mmopt bench` shows a gain")
    if spec.evaluation:
        acc = _score_all(spec, {"original": original, "pruned": student}, split, progress)
        accuracy = {"metric": acc["metric"], "samples": acc["samples"], "original": acc["scores"]["original"],
                    "before_recovery": accuracy["before_recovery"], "after_recovery": acc["scores"]["pruned"]}
        drop = accuracy["original"] - accuracy["after_recovery"]
        if spec.max_accuracy_drop is not None and drop > spec.max_accuracy_drop:
            raise PruneError(f"the pruned model scores {accuracy['after_recovery']:.4f} against the original's "
                             f"{accuracy['original']:.4f} on {acc['samples']} samples, a drop of {drop:.4f} > "
                             f"[tolerance].max_accuracy_drop {spec.max_accuracy_drop}. Nothing was written. Keep "
                             "more of the MACs, or recover longer (--steps).")

    plan = plan_of(original, student)
    data = _weights(student, plan)
    report = {"kind": "mmopt-prune-report", "config": str(spec.path), "pruned_config": str(out_config),
              "checkpoint": str(weights), "checkpoint_sha256": hashlib.sha256(data).hexdigest(),
              "parent_checkpoint": str(spec.checkpoint) if spec.checkpoint else None,
              "parent_checkpoint_sha256": sha256_file(spec.checkpoint) if spec.checkpoint else None,
              "criterion": "L2 magnitude of each channel's weights (Torch-Pruning MagnitudeImportance, p=2), "
                           "channels removed by its dependency graph; attention heads by the L2 norm of their q / k / "
                           "v rows (and output-projection columns where the block holds it)",
              "torch_pruning": getattr(tp, "__version__", "?"),
              "components": components,
              "recovery": {"method": "distillation from the unpruned model on [calibration] data (no labels): MSE "
                                     "on the pruned components' outputs + "
                                     + (f"KL on the score outputs ({', '.join(sorted(scores))})" if scores
                                        else "MSE on every float output of the model"),
                           "steps": steps, "optimizer": "Adam lr 1e-3", "seed": SEED,
                           "batches": len(batches), "loss_first": losses[0] if losses else None,
                           "loss_last": losses[-1] if losses else None},
              "accuracy": accuracy,
              "model_params": {"before": sum(p.numel() for p in original.parameters()),
                               "after": sum(p.numel() for p in student.parameters())},
              "plan": plan}
    # the config last: until it is written, no config names the new weights
    atomic_write(weights, data)
    atomic_write(report_path, (json.dumps(report, indent=1) + "\n").encode())
    atomic_write(out_config, config_text.encode())
    return PruneResult(out_config, weights, report_path, report, time.perf_counter() - t0)


def _score(spec: ModelSpec, model: torch.nn.Module, split: Any, progress: Progress, label: str) -> float:
    return _score_all(spec, {label: model}, split, progress)["scores"][label]


def _score_all(spec: ModelSpec, models: dict[str, torch.nn.Module], split: Any, progress: Progress) -> dict[str, Any]:
    from mmopt.judge.accuracy import eager_predictor

    # wrapped: not memoised (the student changes in place between scorings, and a memo would keep it alive)
    predictors = {label: (lambda inputs, p=eager_predictor(m, split): p(inputs)) for label, m in models.items()}
    with progress.task(f"score {' and '.join(models)}", spec.evaluation.samples) as advance:
        return evaluate(spec, predictors, on_batch=advance)


def _weights(model: torch.nn.Module, plan: dict[str, Any]) -> bytes:
    """The state dict as safetensors bytes with the plan in the metadata; a tensor shared by several names
    (tied weights) is written once, under its first name (``load_strict`` fills the aliases)."""
    from safetensors.torch import save

    state, seen = {}, set()
    for k, v in model.state_dict().items():
        where = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype)
        if where in seen:
            continue
        seen.add(where)
        state[k] = v.detach().contiguous()
    return save(state, metadata={PLAN_KEY: json.dumps(plan, separators=(",", ":"))})


NOTE = "# written by `mmopt prune`: the pruned weights (their plan shapes the factory's model)"


def check_outputs(spec: ModelSpec, out_config: Path, weights: Path, report_path: Path) -> None:
    """Refuse to write over the original checkpoint or over files ``mmopt prune`` did not write."""
    from mmopt.checkpoint import prune_plan

    if spec.checkpoint is not None and weights.resolve() == Path(spec.checkpoint).resolve():
        raise UsageError(f"-o {out_config.name}: its weights would be {weights.name}, the checkpoint being pruned. "
                         "Choose another name.")
    ours = {out_config: lambda p: NOTE in p.read_text(errors="replace"),
            weights: lambda p: prune_plan(p) is not None,
            report_path: lambda p: json.loads(p.read_text()).get("kind") == "mmopt-prune-report"}
    for path, written_by_prune in ours.items():
        try:
            mine = not path.exists() or written_by_prune(path)
        except Exception:
            mine = False
        if not mine:
            raise UsageError(f"-o {out_config.name}: {path.name} exists and was not written by `mmopt prune`; "
                             "choose another name or move it away.")


def pruned_config_text(config: Path, checkpoint: str) -> str:
    """The original config with ``[model] checkpoint`` set to the pruned weights (``state_dict_key`` dropped:
    the pruned file holds the state dict itself). The edit is checked: the new text must parse to the old
    document with only those two keys changed, or the config is one this line-based edit cannot handle."""
    import tomllib

    text = config.read_text()
    lines = text.splitlines()
    head = next((i for i, ln in enumerate(lines) if re.match(r"^\s*\[model\]\s*(#.*)?$", ln)), None)
    end = next((i for i in range(head + 1, len(lines)) if re.match(r"^\s*\[", lines[i])), len(lines)) \
        if head is not None else 0
    body = [ln for ln in lines[head + 1:end] if not re.match(r"^\s*(checkpoint|state_dict_key)\s*=", ln)] \
        if head is not None else []
    new = "\n".join([*lines[:head + 1], NOTE, f"checkpoint = {json.dumps(checkpoint)}", *body, *lines[end:]]) + "\n" \
        if head is not None else ""
    want = tomllib.loads(text)
    want.setdefault("model", {})["checkpoint"] = checkpoint
    want["model"].pop("state_dict_key", None)
    try:
        ok = head is not None and tomllib.loads(new) == want
    except tomllib.TOMLDecodeError:
        ok = False
    if not ok:
        raise ConfigError(f"{config}: mmopt prune writes a copy of this config with [model] checkpoint changed, and "
                          "cannot edit this one line by line (write [model] as a table with one key per line). "
                          "Nothing was pruned.")
    return new
