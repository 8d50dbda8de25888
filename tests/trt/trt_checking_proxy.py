"""A checking stand-in for the ``tensorrt`` module, built from NVIDIA's real bindings.

The real bindings import (with stand-in libnvinfer libraries) and expose every class, enum and method
signature, but any object a TensorRT factory would create comes back as ``nullptr``. This proxy lets
mmopt's real code run against that surface:

* every attribute read on the module, a class or an instance must exist on the real module / class;
* every call (functions, constructors, methods, property setters) must match one of the pybind11
  signatures in the real docstring: arity, keyword names and argument types;
* objects a call returns are proxies of the class the real signature declares (or real enum members,
  real values), so the code keeps running and every later use is checked too.

Problems are collected as violations (not raised), so one run reports all of them. Return values the
code depends on (tensor names, shapes, ``False`` from a failing parse) come from scenario ``overrides``
keyed ``"Class.member"``; they are type-checked against the declared return type as well.
"""
from __future__ import annotations

import inspect
import os
import re
import traceback
from typing import Any

from trt_signatures import Signature, parse_signatures

_MISSING = object()
_ALIASES = {"nvonnxparser::IParserError": "ParserError"}  # C++ names pybind11 left in docstrings
_INT = {"int", "typing.SupportsInt", "SupportsInt"}
_FLOAT = {"float", "typing.SupportsFloat", "SupportsFloat"}
_BUFFER = {"buffer", "typing_extensions.Buffer", "collections.abc.Buffer", "typing.Buffer"}
_SEQ = re.compile(r"^(?:typing\.|collections\.abc\.)?(?:List|list|Sequence|tuple|Tuple)\[(.*)\]$")


class ScenarioError(Exception):
    """The test scenario itself is wrong (e.g. an override returns the wrong type): not mmopt's fault."""


class Checker:
    """Holds the real module, the violations found and every call made through the proxies."""

    def __init__(self, real: Any, overrides: dict[str, Any] | None = None, code_roots: tuple[str, ...] = ()):
        self.real = real
        self.version = real.__version__
        self.overrides = dict(overrides or {})
        self.code_roots = code_roots
        self.violations: list[dict[str, str]] = []
        self.calls: list[tuple[str, tuple, dict]] = []
        self.unchecked: set[str] = set()

    # ---- reporting ------------------------------------------------------------------------
    def _where(self) -> str:
        for frame in reversed(traceback.extract_stack()[:-2]):
            if frame.filename == "<snippet>" or any(frame.filename.startswith(r) for r in self.code_roots):
                return f"{os.path.basename(frame.filename)}:{frame.lineno}"
        return "?"

    def violate(self, what: str) -> "Poison":
        found = {"where": self._where(), "what": what, "tensorrt": self.version}
        if found not in self.violations:  # a scenario may pass the same line many times
            self.violations.append(found)
        return Poison(self)

    # ---- types ----------------------------------------------------------------------------
    def resolve(self, type_str: str) -> Any:
        """The real class a docstring type names, or None."""
        name = _ALIASES.get(type_str, type_str)
        name = name.split("::")[-1]
        for prefix in ("tensorrt_bindings.tensorrt.", "tensorrt.tensorrt.", "tensorrt.",
                       "tensorrt_lean_bindings.tensorrt_lean.", "tensorrt_lean."):  # the lean runtime's
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        obj = self.real
        for part in name.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                return None
        return obj if inspect.isclass(obj) else None

    def accepts(self, type_str: str, value: Any) -> bool:
        value = _unwrap(value)
        if isinstance(value, Poison):
            return True  # the violation that made it is already reported
        t = type_str.strip()
        if t.startswith(("typing.Optional[", "Optional[")) and t.endswith("]"):
            return value is None or self.accepts(t[t.index("[") + 1:-1], value)
        if " | " in t:
            return any(self.accepts(x, value) for x in t.split(" | "))
        if t in ("object", "typing.Any"):
            return True
        if t == "None":
            return value is None
        if t in _INT:
            return isinstance(value, int) or hasattr(type(value), "__index__")
        if t in _FLOAT:
            return isinstance(value, (int, float)) and not isinstance(value, bool)
        if t == "bool":
            return isinstance(value, bool)
        if t == "str":
            return isinstance(value, str)
        if t in _BUFFER:
            if isinstance(value, InstanceProxy):
                return value._buffer
            try:
                memoryview(value)
                return True
            except TypeError:
                return False
        if t in ("tuple", "list"):
            return isinstance(value, tuple if t == "tuple" else list)
        m = _SEQ.match(t)
        if m:
            return isinstance(value, (list, tuple)) and all(self.accepts(m.group(1), v) for v in value)
        cls = self.resolve(t)
        if cls is None:
            self.unchecked.add(t)
            return True
        if value is None:  # pybind11 passes None as nullptr to pointer parameters; value types refuse it
            return not issubclass(cls, self.real.Dims)
        if isinstance(value, InstanceProxy):
            return issubclass(value._cls, cls)
        if isinstance(value, cls):
            return True
        # pybind11 implicit conversions TensorRT registers: Dims from a tuple / list of ints.
        if issubclass(cls, self.real.Dims) and isinstance(value, (tuple, list)):
            return all(isinstance(v, int) for v in value)
        return False

    def bind(self, sig: Signature, args: tuple, kwargs: dict, skip_self: bool) -> str | None:
        """None when ``sig`` accepts the call, else why not."""
        params = list(sig.params[1:] if skip_self else sig.params)
        if len(args) > len(params):
            return f"{len(args)} positional arguments, at most {len(params)}"
        bound = dict(zip([p.name for p in params], args))
        for key, value in kwargs.items():
            named = [p for p in params if p.name == key and not re.fullmatch(r"arg\d+", key)]
            if not named:
                return f"no keyword argument '{key}'"
            if key in bound:
                return f"'{key}' given twice"
            bound[key] = value
        for p in params:
            if p.name not in bound:
                if p.default is None:
                    return f"missing argument '{p.name}'"
                continue
            v = bound[p.name]
            if not (v is None and p.default == "None") and not self.accepts(p.type, v):
                return f"'{p.name}' expects {p.type}, got {type(v).__name__} {v!r}"[:200]
        return None

    def check_call(self, qualname: str, func: Any, args: tuple, kwargs: dict, skip_self: bool) -> Signature | None:
        sigs = parse_signatures(getattr(func, "__doc__", None))
        if not sigs:
            self.unchecked.add(f"{qualname} (no signature in docstring)")
            return Signature((), "object", "")
        reasons = [r for s in sigs if (r := self.bind(s, args, kwargs, skip_self)) is not None]
        if len(reasons) == len(sigs):
            self.violate(f"{qualname}{_show(args, kwargs)} matches no signature of TensorRT {self.version}: "
                         + " | ".join(f"{s.text} ({r})" for s, r in zip(sigs, reasons)))
            return None
        return next(s for s in sigs if self.bind(s, args, kwargs, skip_self) is None)

    # ---- values ---------------------------------------------------------------------------
    def make(self, type_str: str, qualname: str, owner: Any, args: tuple, kwargs: dict) -> Any:
        if qualname in self.overrides:
            value = self.overrides[qualname]
            value = value(owner, *args, **kwargs) if callable(value) else value
            cls = self.resolve(type_str)
            if not (value is None and cls is not None) and not self.accepts(type_str, value):
                raise ScenarioError(f"override {qualname} returned {value!r}, not a {type_str}")
            return self.wrap(value)
        t = type_str.strip()
        cls = self.resolve(t)
        if cls is not None:
            members = getattr(cls, "__members__", None)
            return self.wrap(next(iter(members.values()))) if members else InstanceProxy(self, cls)
        defaults = {"None": None, "bool": True, "str": "", **{i: 0 for i in _INT}, **{f: 0.0 for f in _FLOAT}}
        if t in defaults:
            return defaults[t]
        if _SEQ.match(t):
            return []
        self.unchecked.add(t)
        return None

    def wrap(self, value: Any) -> Any:
        """Enum members handed to mmopt are watched too: ``.name`` is a property on some enums and a
        method on others (10.x's parser ErrorCode), so reading one as the other is a violation."""
        return EnumValue(self, value) if hasattr(type(value), "__members__") else value

    def instance(self, class_name: str, **presets: Any) -> "InstanceProxy":
        """A proxy of a real class with attribute values fixed by the scenario (names still checked)."""
        cls = getattr(self.real, class_name)
        return InstanceProxy(self, cls, presets)

    def module(self) -> "ModuleProxy":
        return ModuleProxy(self)


def _show(args: tuple, kwargs: dict) -> str:
    items = [type(a).__name__ if isinstance(a, (InstanceProxy, bytes)) else repr(a) for a in args]
    items += [f"{k}={v!r}" for k, v in kwargs.items()]
    return f"({', '.join(items)})"[:160]


class Poison:
    """What a violation returns: absorbs further use so the run goes on to find more problems."""

    def __init__(self, checker: Checker):
        object.__setattr__(self, "_checker", checker)

    def __getattr__(self, name: str) -> "Poison":
        return self

    def __setattr__(self, name: str, value: Any) -> None:
        pass

    def __call__(self, *a: Any, **k: Any) -> "Poison":
        return self

    def __int__(self) -> int:
        return 0

    __index__ = __int__

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(())

    def __bytes__(self) -> bytes:
        return b""

    def __mro_entries__(self, bases: tuple) -> tuple:
        return (object,)


def _unwrap(value: Any) -> Any:
    return value._member if isinstance(value, EnumValue) else value


class EnumValue:
    """A real enum member whose attribute reads are checked against how its class defines them."""

    def __init__(self, checker: Checker, member: Any):
        self._c, self._member = checker, member

    def __getattr__(self, name: str) -> Any:
        cls = type(self._member)
        attr = inspect.getattr_static(cls, name, _MISSING)
        if attr is _MISSING:
            return self._c.violate(f"{cls.__qualname__}.{name} does not exist in TensorRT {self._c.version}")
        value = getattr(self._member, name)
        if callable(value) and not isinstance(attr, property) and not inspect.isclass(value):
            return _MethodRead(self._c, f"{cls.__qualname__}.{name}", value)
        return value

    def __eq__(self, other: Any) -> bool:
        return self._member == _unwrap(other)

    def __hash__(self) -> int:
        return hash(self._member)

    def __int__(self) -> int:
        return int(self._member)

    __index__ = __int__

    def __str__(self) -> str:
        return str(self._member)

    def __repr__(self) -> str:
        return repr(self._member)


class _MethodRead:
    """A method read off an enum member: fine when called, a violation when used as a value."""

    def __init__(self, checker: Checker, qualname: str, method: Any):
        self._c, self._q, self._m = checker, qualname, method

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._m(*args, **kwargs)

    def _as_value(self) -> str:
        self._c.violate(f"{self._q} is a method in TensorRT {self._c.version}, but was used as a value "
                        "(it is a property in other versions)")
        return f"<method {self._q}>"

    def __str__(self) -> str:
        return self._as_value()

    __repr__ = __str__

    def __format__(self, spec: str) -> str:
        return self._as_value()

    def __eq__(self, other: Any) -> bool:
        self._as_value()
        return False

    __hash__ = None  # type: ignore[assignment]


class _Callable:
    def __init__(self, checker: Checker, qualname: str, func: Any, owner: Any, skip_self: bool):
        self._c, self._q, self._f, self._owner, self._skip = checker, qualname, func, owner, skip_self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._c.calls.append((self._q, args, kwargs))
        sig = self._c.check_call(self._q, self._f, args, kwargs, self._skip)
        if sig is None:
            return Poison(self._c)
        return self._c.make(sig.returns, self._q, self._owner, args, kwargs)


class InstanceProxy:
    """An object of a real TensorRT class that the stand-in libraries could not create."""

    def __init__(self, checker: Checker, cls: type, presets: dict[str, Any] | None = None):
        d = object.__getattribute__(self, "__dict__")
        d.update(_c=checker, _cls=cls, _presets=dict(presets or {}),
                 _buffer="buffer protocol" in (cls.__doc__ or ""))

    def __getattr__(self, name: str) -> Any:
        c, cls, qual = self._c, self._cls, f"{self._cls.__name__}.{name}"
        attr = inspect.getattr_static(cls, name, _MISSING)
        if attr is _MISSING:
            return c.violate(f"{qual} does not exist in TensorRT {c.version}")
        if isinstance(attr, property):
            c.calls.append((qual, (), {}))
            if name in self._presets:
                return c.wrap(self._presets[name])
            sigs = parse_signatures(attr.fget.__doc__) if attr.fget else []
            return c.make(sigs[0].returns if sigs else "object", qual, self, (), {})
        if callable(attr):
            return _Callable(c, qual, getattr(cls, name), self, skip_self=True)
        return getattr(cls, name)

    def __setattr__(self, name: str, value: Any) -> None:
        c, qual = self._c, f"{self._cls.__name__}.{name}"
        attr = inspect.getattr_static(self._cls, name, _MISSING)
        c.calls.append((f"{qual}=", (value,), {}))
        if attr is _MISSING:
            c.violate(f"{qual} does not exist in TensorRT {c.version} (assigned {value!r})")
        elif not isinstance(attr, property) or attr.fset is None:
            c.violate(f"{qual} is read-only in TensorRT {c.version}")
        else:
            c.check_call(f"{qual} = ", attr.fset, (value,), {}, skip_self=True)
            self._presets[name] = value

    def __bytes__(self) -> bytes:
        if not self._buffer:
            raise TypeError(f"{self._cls.__name__} has no buffer protocol")
        return f"fake-{self._cls.__name__}".encode()

    def __repr__(self) -> str:
        return f"<proxy {self._cls.__name__}>"


class ClassProxy:
    """A real TensorRT class: attribute reads checked; construction checked, proxied on ``nullptr``."""

    def __init__(self, checker: Checker, cls: type):
        self._c, self._cls = checker, cls

    def __getattr__(self, name: str) -> Any:
        attr = inspect.getattr_static(self._cls, name, _MISSING)
        if attr is _MISSING:
            return self._c.violate(f"{self._cls.__qualname__}.{name} does not exist in TensorRT {self._c.version}")
        value = getattr(self._cls, name)
        return ClassProxy(self._c, value) if inspect.isclass(value) else value

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        qual = f"{self._cls.__qualname__}.__init__"
        self._c.calls.append((qual, args, kwargs))
        if self._c.check_call(qual, self._cls.__init__, args, kwargs, skip_self=True) is None:
            return Poison(self._c)
        if not any(isinstance(a, (InstanceProxy, Poison)) for a in (*args, *kwargs.values())):
            try:
                return self._cls(*map(_unwrap, args), **{k: _unwrap(v) for k, v in kwargs.items()})
            except TypeError as e:
                if "nullptr" not in str(e):
                    return self._c.violate(f"{qual}{_show(args, kwargs)} failed: {e}")
        return InstanceProxy(self._c, self._cls)

    def __mro_entries__(self, bases: tuple) -> tuple:
        return (self._cls,)  # subclassing (e.g. a Python ILogger) uses the real class

    def __repr__(self) -> str:
        return f"<proxy class {self._cls.__qualname__}>"


class ModuleProxy:
    def __init__(self, checker: Checker):
        self._c = checker

    def __getattr__(self, name: str) -> Any:
        real = self._c.real
        if name.startswith("__") and name.endswith("__") and name != "__version__":
            raise AttributeError(name)  # import machinery probes (__path__, __spec__, ...)
        value = getattr(real, name, _MISSING)
        if value is _MISSING:
            return self._c.violate(f"tensorrt.{name} does not exist in TensorRT {self._c.version}")
        if inspect.isclass(value):
            return ClassProxy(self._c, value)
        if callable(value):
            return _Callable(self._c, f"tensorrt.{name}", value, None, skip_self=False)
        return value


def run_snippet(checker: Checker, code: str, env: dict[str, Any] | None = None) -> None:
    """Execute ``code`` with ``trt`` bound to the proxy; violations land in ``checker``."""
    scope = {"trt": checker.module(), "checker": checker, **(env or {})}
    exec(compile(code, "<snippet>", "exec"), scope)


__all__ = ["Checker", "ScenarioError", "parse_signatures", "run_snippet", "InstanceProxy"]
