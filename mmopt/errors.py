"""User-facing errors: each says what went wrong, where, and what to do about it.

The CLI prints an ``MmoptError`` without a traceback and exits with its ``exit_code``.
Anything else that escapes is a bug and keeps its traceback.
"""
from __future__ import annotations


from mmopt_runtime.errors import BackendUnavailable, MmoptError  # noqa: F401  (shared with the device runtime)


class ConfigError(MmoptError):
    """mmopt.toml is missing, malformed, or names something that does not exist."""


class CheckpointError(MmoptError):
    """The checkpoint cannot be read safely or does not fit the model."""


class CaptureError(MmoptError):
    """The model's forward could not be observed or split into components."""


class ExportError(MmoptError):
    """A component could not be exported to ONNX."""


class ParityError(MmoptError):
    """An artifact does not match the eager model within tolerance."""


class CalibrationError(MmoptError):
    """The calibration or evaluation callable is missing, fails, or yields data that does not fit [inputs]."""


class PrecisionError(MmoptError):
    """A converted (fp16 / int8) pipeline cannot meet the configured parity or accuracy budget."""


class NothingToConvert(PrecisionError):
    """No component the policy names can take its precision (each stays fp32): nothing to write."""


class Unconvertible(PrecisionError):
    """One component cannot be converted to one precision (e.g. its graph holds Loop subgraphs); the
    policy keeps that component at fp32 and says why, and ``auto`` skips that candidate."""


class BundleError(MmoptError):
    """A bundle on disk is missing, incomplete or tampered with."""


class TritonRepositoryError(MmoptError):
    """A Triton model repository that a server would refuse, or serve wrongly; the message lists every problem
    with its file and field."""


class UsageError(MmoptError):
    """The command line asks for something impossible here (exit code 2)."""

    exit_code = 2


class GateError(MmoptError):
    """A parity, accuracy or latency gate failed (exit code 1); the message lists every failure."""

    def __init__(self, message: str, result: object = None):
        super().__init__(message)
        self.result = result


# ---- interrupts that libraries swallow -------------------------------------------------------
_INTERRUPTED = [False]


def note_interrupt() -> None:
    """Called by the CLI's SIGINT / SIGTERM handler before it raises KeyboardInterrupt."""
    _INTERRUPTED[0] = True


def interrupted() -> bool:
    """True once the user pressed Ctrl-C (or SIGTERM came): torch's exporter turns the KeyboardInterrupt
    raised inside it into an unrelated RuntimeError, which must not be reported as an export failure."""
    return _INTERRUPTED[0]


# ---- whose bug is it: the user's model, or mmopt's own code ---------------------------------
_FORWARDING: set = set()  # code objects of mmopt functions that only hand the user's call on to torch


def forwards(fn):
    """Marks an mmopt function that merely forwards the user's torch call (a ``TorchFunctionMode``'s
    ``__torch_function__``): an op that fails inside it failed on the user's tensors, not by mmopt's bug."""
    _FORWARDING.add(fn.__code__)
    return fn


def raised_by_mmopt(e: BaseException) -> bool:
    """True when the root cause of ``e`` was raised in mmopt's own code (its wrappers, hooks, stubs), so
    it must keep its traceback instead of becoming a user error. The verdict is the innermost frame that
    is not torch's (or functorch's / onnxscript's): mmopt's (outside ``mmopt.examples``, the embedded
    user model) and not a forwarding frame. mmopt's deliberate errors (``MmoptError``) are never bugs."""
    root, seen = e, set()
    while id(root) not in seen:
        seen.add(id(root))
        nxt = root.__cause__ or root.__context__
        if nxt is None or nxt.__traceback__ is None:
            break
        root = nxt
    if isinstance(root, MmoptError) or isinstance(e, MmoptError):
        return False
    frames = []
    tb = root.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    # The first frame is where the exception was caught (mmopt's own ``try``): it called into the user's
    # model or torch and is no evidence. Raised in that very frame, with nothing below it, it is.
    frames = frames[1:] or frames
    for frame in reversed(frames):
        module = str(frame.f_globals.get("__name__", ""))
        if module.split(".")[0] in ("torch", "functorch", "onnxscript", "contextlib"):
            continue
        return module.startswith("mmopt.") and not module.startswith("mmopt.examples") \
            and frame.f_code not in _FORWARDING
    return False


# ---- describing an exception raised by the user's code, in one line -------------------------
def describe(e: BaseException) -> str:
    """``TypeError: message`` (``SystemExit(2)`` for an exit), for one-line error messages."""
    if isinstance(e, SystemExit):
        return f"SystemExit({e.code!r}) (it called sys.exit)"
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def where_raised(e: BaseException) -> str:
    """`` (at file.py:12)`` for the innermost frame of the traceback that is the user's own code (not
    mmopt's, not an installed library's), or nothing."""
    import sysconfig
    import traceback
    from pathlib import Path

    libraries = {str(Path(__file__).resolve().parent), sysconfig.get_paths()["purelib"],
                 sysconfig.get_paths()["platlib"], sysconfig.get_paths()["stdlib"]}
    tb = traceback.extract_tb(e.__traceback__) if e.__traceback__ else []
    own = [f for f in tb if not any(str(Path(f.filename).resolve()).startswith(lib) for lib in libraries)]
    return f" (at {own[-1].filename}:{own[-1].lineno})" if own else ""
