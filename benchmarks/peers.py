"""Side by side on one CPU thread: eager PyTorch, torch.compile, mmopt's split ONNX Runtime pipeline
(fp32, and fp16 / int8 where the bundle has them), one whole-model ONNX graph in ONNX Runtime (the
floor that splitting must not throw away) and Hugging Face's own ONNX path (Optimum, run from a
separate virtual environment because its transformers pin conflicts with mmopt's).

    PYTHONPATH=. python benchmarks/peers.py [--optimum-python /tmp/optimum-venv/bin/python]

Every path gets the same inputs; each is parity-checked against eager before it is timed, and all
paths of one model and batch size are timed interleaved in this process (``mmopt.judge.latency``),
so ratios are paired. A path that cannot run here is recorded with the reason, never estimated.
Writes ``benchmarks/results/peers.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks" / "models"))

from mmopt import api  # noqa: E402
from mmopt.judge import latency  # noqa: E402
from mmopt.judge.compare import measure  # noqa: E402
from mmopt import provenance  # noqa: E402
from mmopt.provenance import machine  # noqa: E402
from mmopt.capture import random_inputs, split as capture_split  # noqa: E402
from mmopt.checkpoint import build_model  # noqa: E402
from mmopt.manifest import Manifest  # noqa: E402
from mmopt.runners.onnxrt import OnnxRuntimeRunner  # noqa: E402
from mmopt.runners.pipeline import Pipeline  # noqa: E402
from mmopt.spec import load_spec  # noqa: E402
from mmopt.stages.export import simplify  # noqa: E402

MODELS = {"vqa": ROOT / "mmopt" / "examples" / "vqa" / "mmopt.toml",
          "clip_small": ROOT / "benchmarks" / "models" / "clip_small.toml"}
OPTIMUM = {"clip_small": ("clip_small", "feature-extraction")}  # model -> (module with save(), task)


def quiet() -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    logging.getLogger("torch").setLevel(logging.ERROR)
    return stack


def whole_model_onnx(model: torch.nn.Module, split: Any, path: Path) -> Path:
    """The full model as one graph: dynamo export with the same dynamic axes as the components, then
    the same onnxsim pass the bundle's graphs get."""
    names = [t.name for t in split.model_inputs]
    args = tuple(split.runs["max"].inputs[n] for n in names)
    dyn = tuple({a: torch.export.Dim.DYNAMIC for a in t.dynamic_axes} or None for t in split.model_inputs)
    with quiet():
        prog = torch.onnx.export(model, args, dynamo=True, dynamic_shapes=(dyn,) if False else dyn,
                                 input_names=names, output_names=list(split.output_sources), optimize=True)
    raw = path.with_name("whole.raw.onnx")
    onnx.save(prog.model_proto, str(raw))
    ok = simplify(raw, path).ok
    if not ok:
        shutil.copy(raw, path)
    return path


def optimum_onnx(name: str, work: Path, python: str | None) -> tuple[Path | None, str]:
    if name not in OPTIMUM:
        return None, ("Optimum exports models by transformers architecture name; this is a plain "
                      "torch.nn.Module (no PreTrainedModel config), so no Optimum export exists for it")
    if not python or not Path(python).exists():
        return None, "no Optimum virtual environment given (--optimum-python); see benchmarks/README.md"
    module, task = OPTIMUM[name]
    hf_dir, out = work / "hf", work / "optimum"
    __import__(module).save(str(hf_dir))
    r = subprocess.run([python, str(ROOT / "benchmarks" / "optimum_export.py"), str(hf_dir), str(out), task],
                       capture_output=True, text=True, timeout=900)
    if r.returncode != 0 or not (out / "model.onnx").exists():
        return None, f"optimum export failed: {(r.stderr or r.stdout).strip().splitlines()[-1][:300]}"
    version = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('optimum-onnx'), "
                              "m.version('transformers'))"], capture_output=True, text=True).stdout.split()
    return out / "model.onnx", f"optimum-onnx {version[0]} (transformers {version[1]}), task {task}"


def session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def naive_pipeline(bundle: Path, manifest: Manifest, threads: int) -> Callable:
    """The pipeline as first written (public session.run, wiring resolved per call): the 'before'."""
    sess = {c: session(bundle / f"{c}.onnx", threads) for c in manifest.components}
    order = [c for c, s in manifest.components.items() if s.kind == "encoder"] + ["fusion"]

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = {f"input:{n}": a for n, a in feeds.items()}
        for c in order:
            s = sess[c]
            names = [o.name for o in s.get_outputs()]
            out = dict(zip(names, s.run(names, {n: values[src] for n, src in manifest.components[c].sources.items()})))
            values.update({f"{c}:{n}": a for n, a in out.items()})
        return {n: values[src] for n, src in manifest.model["output_sources"].items()}
    return run


def bench_model(name: str, config: Path, args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work) / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    spec = load_spec(config)
    model = build_model(spec)
    split = capture_split(model, spec)
    result: dict[str, Any] = {"config": str(config.relative_to(ROOT)) if config.is_relative_to(ROOT) else str(config), "paths": {}, "skipped": {}, "batches": {}}
    t = time.perf_counter()
    bundle = api.export(config, work / "bundle").bundle
    result["export_seconds"] = round(time.perf_counter() - t, 1)
    manifest = Manifest.read(bundle)
    precisions = {"fp32": bundle}
    if hasattr(api, "quantize"):
        for prec in ("fp16", "int8"):
            try:
                b = work / f"bundle-{prec}"
                shutil.copytree(bundle, b)
                api.quantize(b, precision={c: prec for c in manifest.components})
                precisions[prec] = b
            except Exception as e:  # record, never fake
                result["skipped"][f"mmopt-split-{prec}"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    else:
        for prec in ("fp16", "int8"):
            result["skipped"][f"mmopt-split-{prec}"] = "mmopt's precision stage (api.quantize) is not on this branch"
    whole = whole_model_onnx(model, split, work / "whole.onnx")
    opt_path, opt_note = optimum_onnx(name, work, args.optimum_python)
    result["paths"]["optimum-ort"] = opt_note
    if opt_path is None:
        result["skipped"]["optimum-ort"] = opt_note
    result["skipped"]["transformers-onnx"] = ("transformers " + __import__("transformers").__version__ +
                                              " has no built-in ONNX export (transformers.onnx was removed; "
                                              "Hugging Face points to Optimum)")
    compiled = None
    try:
        compiled = torch.compile(model)
    except Exception as e:
        result["skipped"]["torch.compile"] = f"{type(e).__name__}: {e}"

    with contextlib.ExitStack() as stack:
        pipes = {}
        for prec, b in precisions.items():
            m = Manifest.read(b)
            runners = {}
            for c, cs in m.components.items():
                art = [a for a in m.artifacts if a.component == c and a.stage != "engine" and
                       a.precision in (prec, "fp32")]
                art.sort(key=lambda a: a.precision != prec)
                runners[c] = stack.enter_context(OnnxRuntimeRunner(b / art[0].file, cs.inputs, cs.outputs,
                                                                   threads=args.threads, name=c))
            pipes[f"mmopt-split-{prec}"] = (Pipeline(m.components, m.model["output_sources"], runners), runners)
        naive = naive_pipeline(bundle, manifest, args.threads)
        whole_s = session(whole, args.threads)
        whole_names = [o.name for o in whole_s.get_outputs()]
        opt_s = session(opt_path, args.threads) if opt_path else None
        for batch in args.batches:
            shapes = {n: tuple(batch if d == "batch" else (spec.dims[d].opt if isinstance(d, str) else d)
                               for d in i.shape) for n, i in spec.inputs.items()}
            tin = random_inputs(spec, shapes, 7 + batch)
            feeds = {k: v.numpy() for k, v in tin.items()}
            out_name = spec.evaluation.output if spec.evaluation else next(iter(split.output_sources))

            def eager(m=model):
                with torch.inference_mode():
                    return m(**tin)
            with torch.inference_mode():
                ref = dict(__import__("mmopt.capture", fromlist=["x"]).flatten_named(model(**tin), "")[0])[out_name]
            ref = ref.numpy()
            paths: dict[str, Callable[[], Any]] = {"eager": eager}
            outs: dict[str, Callable[[], np.ndarray]] = {}
            if compiled is not None:
                try:
                    t = time.perf_counter()
                    with quiet(), torch.inference_mode():
                        compiled(**tin)
                    result.setdefault("compile_seconds", {})[str(batch)] = round(time.perf_counter() - t, 1)
                    paths["torch.compile"] = lambda: eager(compiled)
                    outs["torch.compile"] = lambda: dict(__import__("mmopt.capture", fromlist=["x"]).flatten_named(
                        eager(compiled), "")[0])[out_name].numpy()
                except Exception as e:
                    result["skipped"]["torch.compile"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                    compiled = None
            run_whole = whole_s._sess.run if hasattr(whole_s, "_sess") else (lambda n, f, o: whole_s.run(n, f))
            paths["whole-model-ort"] = lambda: run_whole(whole_names, feeds, None)
            outs["whole-model-ort"] = lambda: dict(zip(whole_names, run_whole(whole_names, feeds, None)))[out_name]
            for key, (pipe, _) in pipes.items():
                paths[key] = lambda p=pipe: p.infer(feeds)
                outs[key] = lambda p=pipe: p.infer(feeds)[out_name]
            paths["mmopt-split-fp32-before"] = lambda: naive(feeds)
            outs["mmopt-split-fp32-before"] = lambda: naive(feeds)[out_name]
            if opt_s is not None:
                opt_in = {i.name: feeds[i.name] for i in opt_s.get_inputs()}
                opt_names = [o.name for o in opt_s.get_outputs()]
                paths["optimum-ort"] = lambda: opt_s.run(opt_names, opt_in)
                opt_out = "logits_per_image" if "logits_per_image" in opt_names else opt_names[0]
                outs["optimum-ort"] = lambda: dict(zip(opt_names, opt_s.run(opt_names, opt_in)))[opt_out]
            parity = {}
            for k, f in outs.items():
                m_ = measure(out_name, ref, f(), score=True)  # the model's score output: argmax is its prediction
                parity[k] = {"cos_min": round(m_.cos_min, 6), "max_abs": float(f"{m_.max_abs:.3g}"),
                             "argmax": m_.argmax}
            # components of the fp32 pipeline alone, to show where the split's time goes
            _, runners = pipes["mmopt-split-fp32"]
            trace: dict[str, Any] = {}
            pipes["mmopt-split-fp32"][0].infer(feeds, trace)
            plan = [(r.session, trace[c][0]) for c, r in runners.items()]
            paths["components-back-to-back"] = lambda: [s.run(None, f) for s, f in plan]
            samples = latency.interleaved({k: latency.Timed(f, batch) for k, f in paths.items()}, args.repeats,
                                          args.warmup)
            rows = {}
            for k, s in samples.items():
                st = latency.stats(s, batch)
                rows[k] = {"p50_ms": round(st.p50, 4), "p90_ms": round(st.p90, 4), "std_ms": round(st.std, 4),
                           "samples_per_s": round(st.throughput, 1),
                           "vs_eager": round(latency.paired_ratio(s, samples["eager"]), 3),
                           "vs_whole_model_ort": round(latency.paired_ratio(s, samples["whole-model-ort"]), 3)}
                if k in parity:
                    rows[k]["parity_vs_eager"] = parity[k]
            # Where the split's time goes, without eager / torch.compile in the rotation (their cache and
            # allocator churn lands on whichever path runs next): whole graph, split pipeline, and the
            # split's sessions run back to back on prepared inputs (no wiring, no Python bookkeeping).
            focus = latency.interleaved({k: latency.Timed(paths[k], batch) for k in
                                         ("whole-model-ort", "mmopt-split-fp32", "components-back-to-back")},
                                        args.repeats * 3, args.warmup)
            rows["split_focus"] = {
                "split_vs_whole": round(latency.paired_ratio(focus["mmopt-split-fp32"], focus["whole-model-ort"]), 3),
                "components_back_to_back_vs_whole": round(latency.paired_ratio(
                    focus["components-back-to-back"], focus["whole-model-ort"]), 3),
                "split_vs_components_back_to_back": round(latency.paired_ratio(
                    focus["mmopt-split-fp32"], focus["components-back-to-back"]), 3),
                "p50_ms": {k: round(latency.stats(v, batch).p50, 4) for k, v in focus.items()},
                "repeats": args.repeats * 3}
            result["batches"][str(batch)] = rows
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--config", action="append", default=[], help="NAME=path/to/mmopt.toml to override a model")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--work", default="/tmp/mmopt-peers")
    p.add_argument("--optimum-python", default="/tmp/optimum-venv/bin/python")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "peers.json"))
    p.add_argument("--merge", action="store_true", help="keep the other models already in --out")
    args = p.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    configs = dict(MODELS, **dict(c.split("=", 1) for c in args.config))
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
                              "tools": provenance.tool_versions(), "settings": {"threads": args.threads, "repeats": args.repeats,
                                                                         "warmup": args.warmup,
                                                                         "batches": args.batches},
                              "models": {}}
    if args.merge and Path(args.out).exists():
        report["models"] = json.loads(Path(args.out).read_text())["models"]
    for name in args.models.split(","):
        print(f"== {name}", flush=True)
        report["models"][name] = bench_model(name, Path(configs[name]).resolve(), args)
        report["models"][name].update(measured=report["created"], settings=dict(report["settings"]))
        for b, rows in report["models"][name]["batches"].items():
            for k, r in rows.items():
                if isinstance(r.get("p50_ms"), float):
                    print(f"  batch {b:>3} {k:<26} p50 {r['p50_ms']:8.4f} ms  vs eager {r['vs_eager']:6.3f}  "
                          f"vs whole {r['vs_whole_model_ort']:6.3f}", flush=True)
            print(f"  batch {b:>3} focused: {rows['split_focus']}", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")  # after each model: nothing is lost
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
