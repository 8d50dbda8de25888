"""``mmopt-run``: the device side of a package: ``selftest``, ``infer``, ``bench``. Exit 0 on success, 1 when the
package is refused (a file changed or missing, a malformed manifest, golden outputs off, inputs it cannot
take), 2 when an input or output file given on the command line cannot be read or written."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mmopt_runtime import engines
from mmopt_runtime.errors import MmoptError
from mmopt_runtime.package import Package


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mmopt-run", description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("package", type=Path)
    common.add_argument("--public-key", type=Path, default=None,
                        help="PEM public key of the signer: the package must carry a valid signature made with its "
                             "private key (`mmopt package --sign-key`). A signed package needs it.")
    common.add_argument("--backend", choices=engines.BACKENDS, default="auto",
                        help="auto (default): of the package's TensorRT engine sets that may run on this GPU and "
                             "TensorRT, the one covering most components (built by this very TensorRT before a "
                             "version-compatible one); what it lacks built here from the ONNX graphs where full "
                             "TensorRT is installed (cached); else ONNX Runtime, saying why. tensorrt: "
                             "refuse rather than fall back. onnxruntime: the ONNX graphs only (CPU); onnxruntime-cuda: on "
                             "ONNX Runtime's CUDA provider (onnxruntime-gpu).")
    common.add_argument("--device", type=int, default=0, help="GPU index for TensorRT (default 0)")
    common.add_argument("--engine-cache", type=Path, default=None,
                        help="where engines built here are kept (default $MMOPT_ENGINE_CACHE or "
                             "~/.cache/mmopt/engines)")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("selftest", parents=[common],
                   help="verify signature, hashes and the golden self-test (refuses on any mismatch)")
    i = sub.add_parser("infer", parents=[common],
                       help="run the pipeline on inputs from an .npz file, write the outputs to another")
    i.add_argument("--inputs", type=Path, required=True, help=".npz with one array per model input")
    i.add_argument("--out", type=Path, required=True, help=".npz to write, one array per model output")
    b = sub.add_parser("bench", parents=[common], help="pipeline latency at the exported min / opt / max sizes, as JSON")
    b.add_argument("--rounds", type=int, default=50)
    args = ap.parse_args(argv)
    if args.public_key is not None and not args.public_key.is_file():
        print(f"error: --public-key {args.public_key}: no such file.", file=sys.stderr)
        return 2
    try:
        pkg = Package.load(args.package, public_key=args.public_key, backend=args.backend, device=args.device,
                           engine_cache=args.engine_cache, log=lambda m: print(m, file=sys.stderr, flush=True))
        if pkg.plan.why and pkg.plan.backend == "onnxruntime" and args.backend == "auto":
            print(f"note: ONNX Runtime serves: {'; '.join(pkg.plan.why)}", file=sys.stderr)
        if args.command == "selftest":
            print(json.dumps({"package": str(args.package), "load_ms": round(pkg.load_ms, 1), **pkg.selftest_result},
                             indent=1))
        elif args.command == "infer":
            with __import__("numpy").load(args.inputs, allow_pickle=False) as data:
                feeds = {k: data[k] for k in data.files}
            out = pkg.infer(feeds)
            tmp = args.out.with_name(f".{args.out.name}.tmp")
            with open(tmp, "wb") as f:
                __import__("numpy").savez(f, **out)
            tmp.replace(args.out)
            print(f"wrote {args.out}: {', '.join(f'{k} {list(v.shape)}' for k, v in out.items())}")
        else:
            print(json.dumps(pkg.bench(args.rounds), indent=1))
    except MmoptError as e:  # the package refused, or an engine that cannot run here
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
