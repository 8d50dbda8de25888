#!/usr/bin/env bash
# The Python environment of the Triton test server (tests/test_triton_server.py, benchmarks/triton_vqa.py):
# nvidia-pytriton's wheel carries a real tritonserver 2.51 (python backend + ensembles only). Its python
# backend stub needs numpy < 2, which mmopt's own environment does not have, so it gets a venv of its own.
# It lives outside the checkout (CI clones afresh) and is kept while its stamp matches these pins and this
# Python; otherwise it is made again. mmopt.triton.server finds it at the same place.
#   usage: bash .ci/triton-venv.sh [VENV]
#   default VENV: $MMOPT_TRITON_VENV, else ${XDG_CACHE_HOME:-~/.cache}/mmopt/triton-venv
set -euo pipefail
VENV=${1:-${MMOPT_TRITON_VENV:-${XDG_CACHE_HOME:-~/.cache}/mmopt/triton-venv}}
PY=$(command -v python3.11 || command -v python)
PINS='numpy<2 onnxruntime==1.32.0 tritonclient[http,grpc]==2.73.0'
WHEEL='nvidia-pytriton==0.7.0'
WANT="$PINS $WHEEL $("$PY" -c 'import sys; print(sys.version.split()[0], sys.base_prefix)')"
STAMP="$VENV/.mmopt-triton-venv"
mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9  # two checkouts making it at once: the second waits, then finds it made
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi
if [ -e "$VENV" ] && [ ! -f "$STAMP" ] && [ -n "$(ls -A "$VENV" 2>/dev/null)" ]; then
  echo "$VENV exists and was not made by this script (no $(basename "$STAMP")); refusing to replace it." \
       "Move it away or give another path (MMOPT_TRITON_VENV)." >&2
  exit 1
fi
rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check $PINS
# --no-deps: only the server binary, its libraries and the backend stubs are used, not PyTriton's Python
# API (whose ~45 dependencies are not needed to run tritonserver)
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps "$WHEEL"
echo "$WANT" > "$STAMP"
echo "made the Triton test venv at $VENV"
