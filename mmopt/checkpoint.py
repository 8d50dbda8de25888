"""Build the user's model through their factory and load a checkpoint into it, safely.

Safetensors and ``torch.load(weights_only=True)`` never execute code from the file. A checkpoint
that needs pickled code is refused unless the user passes ``--trust-checkpoint``. Every mismatch
between the checkpoint and the model (missing, unexpected, wrong shape) is listed in one error.
"""
from __future__ import annotations

import importlib
import inspect
import pickle
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from mmopt.errors import CheckpointError, ConfigError, describe, where_raised
from mmopt.spec import ModelSpec


def import_ref(ref: str, root: Path, field: str, config: Path) -> Callable[..., Any]:
    """Resolve ``"module:attr.sub"``, with the config's folder importable."""
    module_name, _, attr_path = ref.partition(":")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise ConfigError(f"{config}: field '{field}': cannot import module '{module_name}' "
                              f"(looked in {root} and on sys.path). Check the spelling, or put "
                              f"{module_name.replace('.', '/')}.py beside the config.") from None
        raise ConfigError(f"{config}: field '{field}': importing '{module_name}' failed because it imports "
                          f"'{e.name}', which is not installed. Install it (pip install {e.name}).") from None
    except (Exception, SystemExit) as e:  # the user's module raised (or called sys.exit) while importing
        raise ConfigError(f"{config}: field '{field}': importing '{module_name}' raised "
                          f"{describe(e)}{where_raised(e)}. Fix that module.") from None
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            have = ", ".join(n for n in dir(obj) if not n.startswith("_"))[:300]
            raise ConfigError(f"{config}: field '{field}': '{module_name}' has no attribute '{attr_path}' "
                              f"(missing '{part}'). Available: {have}.")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{config}: field '{field}': '{ref}' is not callable.")
    return obj


def build_model(spec: ModelSpec, trust_checkpoint: bool = False) -> torch.nn.Module:
    """Factory -> module -> checkpoint loaded strictly -> eval mode."""
    factory = import_ref(spec.factory, spec.root, "model.factory", spec.path)
    try:
        inspect.signature(factory).bind(**spec.kwargs)
    except TypeError as e:  # only a call that does not bind is the kwargs' fault
        raise ConfigError(f"{spec.path}: field 'model.kwargs': {spec.factory} does not take these arguments "
                          f"({e}). Make [model.kwargs] match the factory's parameters.") from None
    except ValueError:
        pass  # no signature to check (a builtin): the call below says what is wrong
    try:
        model = factory(**spec.kwargs)
    except (Exception, SystemExit) as e:
        raise ConfigError(f"{spec.path}: field 'model.factory': {spec.factory}(...) raised {describe(e)}"
                          f"{where_raised(e)}. Fix the factory (it is your code, run as `mmopt export` "
                          "would run it).") from None
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"{spec.path}: field 'model.factory': {spec.factory} returned "
                          f"{type(model).__name__}, not a torch.nn.Module.")
    if spec.checkpoint is not None:
        state = read_state_dict(spec.checkpoint, spec.state_dict_key, trust_checkpoint, spec.path)
        plan = prune_plan(spec.checkpoint)
        if plan is not None:  # weights of a pruned model: shape the fresh model as the plan says first
            apply_plan(model, plan, spec.checkpoint, state)
        load_strict(model, state, spec.checkpoint)
    return model.eval()


# ---- pruned models: a plan that shapes the factory's fresh model -------------------------------------
PLAN_KEY = "mmopt.prune_plan"  # safetensors metadata of a checkpoint written by `mmopt prune`


def prune_plan(path: Path) -> dict[str, Any] | None:
    """The plan a pruned checkpoint carries in its safetensors metadata (None for any other checkpoint)."""
    if path.suffix.lower() != ".safetensors":
        return None
    import json

    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            text = (f.metadata() or {}).get(PLAN_KEY)
    except Exception:  # unreadable: read_state_dict has said so already
        return None
    if text is None:
        return None
    try:
        plan = json.loads(text)
    except ValueError:
        raise CheckpointError(f"{path}: its '{PLAN_KEY}' metadata is not JSON. Re-run `mmopt prune`.") from None
    if not isinstance(plan, dict) or not isinstance(plan.get("modules"), dict):
        raise CheckpointError(f"{path}: its '{PLAN_KEY}' metadata has no 'modules' table. Re-run `mmopt prune`.")
    return plan


# Attention blocks whose heads are separate q / k / v projections: (heads attribute, head size attribute,
# projection names, attributes derived from the head count). Hugging Face's CLIP, ViT, SigLIP, Whisper, ...
# name them num_heads / head_dim / q_proj, k_proj, v_proj; BERT-style ones num_attention_heads /
# attention_head_size / query, key, value (with all_head_size = heads x head size). `mmopt prune` removes
# whole heads of these; a loaded plan must leave each one consistent (``check_heads``).
HEAD_STYLES = (("num_heads", "head_dim", ("q_proj", "k_proj", "v_proj"), ()),
               ("num_attention_heads", "attention_head_size", ("query", "key", "value"), ("all_head_size",)))

# The attributes a plan may set: sizes that pruning narrows, nothing that changes what a layer computes
# (stride, groups of a non-depthwise conv, padding, dims, flags). Each new value is a positive int (or a tuple
# of them) no larger than the built model's.
SIZE_ATTRS = frozenset({"in_channels", "out_channels", "in_features", "out_features", "num_features",
                        "num_channels", "normalized_shape", "embed_dim", "kdim", "vdim", "head_dim",
                        "num_embeddings", "embedding_dim", "hidden_size", "num_heads", "num_attention_heads",
                        "all_head_size"})


def apply_plan(model: torch.nn.Module, plan: dict[str, Any], path: Path,
               state: dict[str, torch.Tensor] | None = None) -> None:
    """Give each module the plan names its pruned sizes (allow-listed integer attributes, ``SIZE_ATTRS``, and a
    depthwise conv's ``groups``) and empty parameters / persistent buffers of the recorded shapes, which the
    checkpoint ``state`` then fills: every shape must be the one ``state`` holds for that name. Nothing from
    the file is executed, and tensors shared by several modules (tied weights) stay shared."""
    def bad(msg: str) -> CheckpointError:
        return CheckpointError(f"{path}: its prune plan {msg}. Prune again with this factory (`mmopt prune`).")

    replaced: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (old, new); old kept alive: ids stay unique
    for name, entry in plan["modules"].items():
        if not isinstance(name, str) or not name or any(part.startswith("_") for part in name.split(".")):
            raise bad(f"names module {name!r}, which is not a submodule")
        if not isinstance(entry, dict) or not set(entry) <= {"attrs", "tensors"} or \
                not all(isinstance(entry.get(k, {}), dict) for k in ("attrs", "tensors")):
            raise bad(f"entry for '{name}' is not {{\"attrs\": {{...}}, \"tensors\": {{...}}}}")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{path}: its prune plan names module '{name}', which the factory's model does not "
                                  "have. The factory or its [model.kwargs] changed since `mmopt prune`: prune again."
                                  ) from None
        for attr, value in entry.get("attrs", {}).items():
            current = getattr(module, attr, None)
            depthwise = attr == "groups" and isinstance(module, torch.nn.modules.conv._ConvNd) and \
                current == getattr(module, "in_channels", None)
            if (attr not in SIZE_ATTRS and not depthwise) or not is_size(value) or not is_size(current) or \
                    not _no_larger(value, current):
                raise CheckpointError(f"{path}: its prune plan sets '{name}.{attr}' = {value!r}, which that module "
                                      "does not have as a size (a positive value no larger than the built model's). "
                                      "Prune again with this factory.")
            setattr(module, attr, tuple(value) if isinstance(value, list) else value)
        for pname, shape in entry.get("tensors", {}).items():
            persistent = pname in module._parameters or (pname in module._buffers and pname not in
                                                         module._non_persistent_buffers_set)
            old = getattr(module, pname, None) if persistent else None
            key = f"{name}.{pname}"
            if not isinstance(old, torch.Tensor) or not is_size(shape) or not _no_larger(shape, list(old.shape)):
                raise bad(f"shapes '{key}' as {shape!r}, which is no parameter or saved buffer of that module, or "
                          "not a narrowing of it")
            if state is not None and (key not in state or list(state[key].shape) != list(shape)):
                raise bad(f"shapes '{key}' as {shape}, but the checkpoint holds "
                          f"{list(state[key].shape) if key in state else 'no such tensor'}")
            if id(old) in replaced:
                new = replaced[id(old)][1]
            else:
                new = torch.empty(tuple(shape), dtype=old.dtype)
                if isinstance(old, torch.nn.Parameter):
                    new = torch.nn.Parameter(new, requires_grad=old.requires_grad)
                replaced[id(old)] = (old, new)
            setattr(module, pname, new)
    check_heads(model, plan, path)
    # a tied alias the plan did not list (one name per shared tensor is enough) follows its tensor
    for mod in model.modules():
        for pname, t in [*mod._parameters.items(), *mod._buffers.items()]:
            if t is not None and id(t) in replaced and replaced[id(t)][0] is t:
                setattr(mod, pname, replaced[id(t)][1])


def check_heads(model: torch.nn.Module, plan: dict[str, Any], path: Path) -> None:
    """Every attention block the plan touched still computes whole heads of its trained size: heads x head size
    equals the width of q, k and v (and ``all_head_size``); a ``nn.MultiheadAttention``'s heads divide its
    width. A plan that changed a head count alone (the weights untouched) is refused."""
    touched = set(plan["modules"])
    for name, m in model.named_modules():
        if not any(t == name or t.startswith(f"{name}.") for t in touched):
            continue
        if isinstance(m, torch.nn.MultiheadAttention):
            ok = m.num_heads * m.head_dim == m.embed_dim
        else:
            ok = True
            for heads, size, projs, derived in HEAD_STYLES:
                if isinstance(getattr(m, heads, None), int) and isinstance(getattr(m, size, None), int) and \
                        all(isinstance(getattr(m, n, None), torch.nn.Linear) for n in projs):
                    width = getattr(m, heads) * getattr(m, size)
                    ok = {getattr(m, n).out_features for n in projs} == {width} and \
                        all(getattr(m, d, width) == width for d in derived)
                    break
        if not ok:
            raise CheckpointError(f"{path}: its prune plan leaves attention block '{name}' inconsistent (its head "
                                  "count times head size no longer equals its projections' width). Prune again with "
                                  "this factory (`mmopt prune`).")


def _no_larger(value: Any, current: Any) -> bool:
    """``value`` (int or list of ints, each >= 1) is, element by element, at most ``current``."""
    v = value if isinstance(value, list) else [value]
    c = list(current) if isinstance(current, (list, tuple)) else [current]
    return len(v) == len(c) and all(isinstance(a, int) and isinstance(b, int) and 1 <= a <= b for a, b in zip(v, c))


def is_size(value: Any) -> bool:
    """An int, or a non-empty list / tuple of ints (never bools): a size, all a prune plan may hold."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, (list, tuple)) and bool(value) and
                                      all(isinstance(v, int) and not isinstance(v, bool) for v in value))


def read_state_dict(path: Path, key: str | None, trust: bool, config: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{config}: field 'model.checkpoint': {path} does not exist. "
                              "Fix the path (relative paths resolve against the config's folder).")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            obj: Any = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e}). "
                                  "The file is corrupt or truncated: re-save it with safetensors.torch.save_file.")
    elif suffix in (".pt", ".pth", ".bin", ".ckpt"):
        obj = _torch_load(path, trust)
    else:
        raise CheckpointError(f"{config}: field 'model.checkpoint': {path.name}: unsupported file type '{suffix}'. "
                              "Use .safetensors, or .pt/.pth/.bin holding a state_dict.")
    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            have = ", ".join(map(str, obj.keys())) if isinstance(obj, dict) else type(obj).__name__
            raise CheckpointError(f"{path}: has no key '{key}' (field 'model.state_dict_key' in {config}). "
                                  f"Top-level keys: {have}.")
        obj = obj[key]
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = [k for k, v in obj.items() if isinstance(v, dict)] if isinstance(obj, dict) else []
        hint = f" It looks like a training checkpoint: set state_dict_key = \"{keys[0]}\"." if keys else ""
        raise CheckpointError(f"{path}: does not hold a state_dict (name -> tensor).{hint}")
    return obj


def _torch_load(path: Path, trust: bool) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as e:
        # Only a file that really names Python code gets the --trust-checkpoint advice; random bytes and
        # truncated files fail the weights-only unpickler too, with another reason.
        if not trust and "Unsupported global" in str(e):
            raise CheckpointError(
                f"{path}: needs pickled Python code to load, which could run arbitrary code. "
                "Re-save it as safetensors or a plain state_dict, or, if you trust its origin, "
                "pass --trust-checkpoint.") from None
        reason = next((line.strip() for line in str(e).splitlines() if "Unsupported" in line or "invalid" in line),
                      str(e).splitlines()[0] if str(e) else "")
        raise CheckpointError(f"{path}: corrupt checkpoint, not a readable torch.save file ({reason[:200]}). "
                              "Re-save it with torch.save(model.state_dict(), ...).") from None
    except (Exception, SystemExit) as e:  # a truncated zip, or (trusted) pickled code that raises
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({type(e).__name__}: {e}). "
                              "Re-save it with torch.save(model.state_dict(), ...).") from None


def tied_groups(model: torch.nn.Module) -> list[list[str]]:
    """State-dict names that share one tensor in the built model (tied weights), groups of two or more."""
    groups: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load ``state``; list every missing / unexpected / mis-shaped key in one error. A key the checkpoint
    lacks is not missing when it is a tied alias of one it has (the same tensor in the built model:
    ``safetensors.torch.save_model`` and ``save_pretrained`` write one name per shared tensor)."""
    own = model.state_dict()
    state = dict(state)
    for group in tied_groups(model):  # one kept name fills every other name of its group
        kept = next((n for n in group if n in state), None)
        if kept is not None:
            state.update({n: state[kept] for n in group if n not in state})
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shapes:
        lines = [f"{path}: does not fit the model built by the factory:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:10])}"
                         f"{' ...' if len(unexpected) > 10 else ''}")
        for k in shapes[:10]:
            lines.append(f"  shape mismatch for {k}: checkpoint {tuple(state[k].shape)}, model {tuple(own[k].shape)}")
        prefixes = {k.split('.')[0] for k in unexpected}
        if unexpected and len(prefixes) == 1 and missing:
            lines.append(f"  (every unexpected key starts with '{prefixes.pop()}.': strip that prefix when saving)")
        lines.append("Fix: make [model.kwargs] build the architecture the checkpoint was trained with, "
                     "or point model.checkpoint at the right file.")
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state, strict=True)
