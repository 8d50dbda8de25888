#!/usr/bin/env bash
# Every GPU check of mmopt in one run, for a lent GPU machine (no internet there). ~5-10 minutes.
#
# What must be carried to the machine (it cannot download anything):
#   - this working tree (the device tool copies it), with the embedded VQA model and checkpoint;
#   - the Python packages: torch with CUDA (the device image has it), onnxruntime-gpu for the
#     onnxruntime-cuda bench (else that part is reported as skipped), tensorrt for the engine tests
#     (else they skip: "TensorRT cannot be imported here"), cuda-python for the torch-free memory path;
#   - mmopt itself is imported from this tree (PYTHONPATH), so no install is needed.
# Results go to $OUT (default ./gpu-results): pytest's junit XML and output, and the bench report.
# A skipped test is reported as NOT RUN, never as passed.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-gpu-results}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python - <<'PY' | tee "$OUT/stack.txt"
import importlib
for m in ("torch", "onnxruntime", "tensorrt", "cuda.bindings.runtime"):
    try:
        mod = importlib.import_module(m)
        extra = f" cuda={mod.cuda.is_available()}" if m == "torch" else ""
        extra += f" providers={mod.get_available_providers()}" if m == "onnxruntime" else ""
        print(f"{m}: {getattr(mod, '__version__', 'present')}{extra}")
    except Exception as e:  # noqa: BLE001
        print(f"{m}: MISSING ({type(e).__name__}: {e})")
PY
timeout 480 python -m pytest -m gpu tests/gpu -rs -q -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml" 2>&1 \
  | tee "$OUT/gpu-tests.txt"
rc=${PIPESTATUS[0]}
# the ONNX Runtime CUDA bench of the embedded model: ratios against eager on CPU and CUDA, same run
timeout 240 python -m mmopt export mmopt/examples/vqa/mmopt.toml -o "$OUT/vqa-bundle" >"$OUT/export.txt" 2>&1 &&
  timeout 240 python -m mmopt bench "$OUT/vqa-bundle" -o "$OUT/bench" --backend onnxruntime \
    --backend onnxruntime-cuda --backend eager-cuda --batch 1,8 2>&1 | tee "$OUT/bench.txt"
grep -c "SKIPPED" "$OUT/gpu-tests.txt" | xargs -I{} echo "NOT RUN (skipped): {} GPU tests" | tee -a "$OUT/gpu-tests.txt"
exit "$rc"
