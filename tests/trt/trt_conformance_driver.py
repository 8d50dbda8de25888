"""Run mmopt's real TensorRT code paths against a checking proxy of NVIDIA's real bindings.

Started by test_api_conformance.py in a fresh interpreter whose LD_LIBRARY_PATH holds the stand-in
libnvinfer libraries and whose PYTHONPATH starts with the extracted ``tensorrt-cu12-bindings`` wheel.
``tensorrt`` is replaced by the checking proxy; ``mmopt.trt.device.current_gpu`` by a FAKE GPU (there is
none here). Prints one JSON report on the last line of stdout:
  violations   every TensorRT name / signature mmopt used that this version does not have
  scenarios    outcome of each build / run / error scenario
  calls        the TensorRT calls made (to show which version branch ran)
  coverage     lines of mmopt_runtime/trt/api.py executed, and all executable ones
  static       ``trt.X.Y`` chains written in api.py and those this version lacks
Modes: ``api`` (all scenarios), ``snippet --code`` (code with ``trt`` and sample objects bound),
``mutate --old --new [--file F]`` (api scenarios with a text substitution applied first to api.py, or to
``F``, a path in the repository such as mmopt/runners/tensorrt.py).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import types
from pathlib import Path

import attribute_chains

REPO = Path(__file__).resolve().parents[2]
API = REPO / "mmopt_runtime" / "trt" / "api.py"


def executable_lines(source: str, filename: str) -> list[int]:
    lines, todo = set(), [compile(source, filename, "exec")]
    while todo:
        code = todo.pop()
        lines.update(ln for _, _, ln in code.co_lines() if ln is not None)
        todo.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    return sorted(lines)


def static_chains(source: str, real: object) -> tuple[list[str], list[str]]:
    """Every ``trt.A.B...`` attribute chain in the source, and those missing from the real module."""
    found = attribute_chains.chains(source, "trt")
    return sorted(found), attribute_chains.missing(real, found)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--expect-version", required=True)
    ap.add_argument("--mode", choices=("api", "snippet", "mutate"), default="api")
    ap.add_argument("--code", default="")
    ap.add_argument("--old", default="")
    ap.add_argument("--new", default="")
    ap.add_argument("--file", default="mmopt_runtime/trt/api.py", help="the file --mode mutate changes")
    ap.add_argument("--lean", action="store_true", help="the lean runtime's bindings (tensorrt_lean), no full TensorRT")
    args = ap.parse_args()

    if args.lean:  # the real NVIDIA module, on stand-in libraries
        import tensorrt_lean_bindings as real
    else:
        import tensorrt_bindings as real

    if real.__version__ != args.expect_version:
        raise SystemExit(f"imported tensorrt_bindings {real.__version__} from {real.__file__}, "
                         f"expected {args.expect_version}")
    from trt_checking_proxy import Checker, run_snippet

    api_path, source = API, API.read_text()
    mutated_file = REPO / args.file
    if args.mode == "mutate":
        text = mutated_file.read_text()
        if text.count(args.old) != 1:
            raise SystemExit(f"mutation anchor found {text.count(args.old)} times in {args.file}: {args.old!r}")
        mutated_path = Path(tempfile.mkdtemp()) / f"mutated_{mutated_file.name}"
        mutated_path.write_text(text.replace(args.old, args.new))
        if mutated_file == API:
            api_path, source = mutated_path, mutated_path.read_text()

    checker = Checker(real, code_roots=(str(REPO / "mmopt"), str(REPO / "mmopt_runtime"), str(api_path)))
    if args.lean:  # a device with only the lean runtime: `import tensorrt` fails, `import tensorrt_lean` works
        sys.modules["tensorrt"] = None
        sys.modules["tensorrt_lean"] = checker.module()
    else:
        sys.modules["tensorrt"] = checker.module()  # what `import tensorrt` in mmopt now gets
    report: dict = {"version": real.__version__, "module_file": real.__file__, "lean": args.lean}

    if args.mode == "snippet":
        import trt_scenarios as scenarios

        run_snippet(checker, args.code, scenarios.sample_objects(checker))
    else:
        executed: set[int] = set()
        target = str(api_path)

        def tracer(frame, event, arg):  # line coverage of api.py only
            if frame.f_code.co_filename != target:
                return None

            def local(frame, event, arg):
                if event == "line":
                    executed.add(frame.f_lineno)
                return local
            executed.add(frame.f_lineno)
            return local

        sys.settrace(tracer)
        if args.mode == "mutate":
            name = ".".join(Path(args.file).with_suffix("").parts)
            parent, _, leaf = name.rpartition(".")
            package = importlib.import_module(parent)
            spec = importlib.util.spec_from_file_location(name, mutated_path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            setattr(package, leaf, module)
        import trt_scenarios as scenarios

        report["scenarios"] = scenarios.run_lean(checker) if args.lean else scenarios.run_all(checker)
        sys.settrace(None)
        report["coverage"] = {"executed": sorted(executed), "executable": executable_lines(source, target)}
        report["static"] = dict(zip(("chains", "missing"), static_chains(source, real)))

    report["violations"] = checker.violations
    report["unchecked"] = sorted(checker.unchecked)
    report["calls"] = [[q, [repr(a) for a in a_], {k: repr(v) for k, v in kw.items()}]
                       for q, a_, kw in checker.calls]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
