"""The fast subset of benchmarks/architectures.py that CI runs: each architecture through export, verify,
fp16, int8 and bench, in its own process and folder, exactly as the benchmark runs the whole set."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBSET = ["film-fusion", "pre-layernorm-transformer", "dict-batch-forward", "siamese-shared-tower"]


@pytest.mark.parametrize("name", SUBSET)
def test_architecture_through_every_stage(name, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "architectures.py"), "--one", name, "--work",
                        str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, r.stdout[-2000:] + r.stderr[-2000:]
    stages = json.loads(line[7:])["stages"]
    failed = {s: v["error"] for s, v in stages.items() if not v["ok"]}
    assert failed == {} and list(stages) == ["export", "verify", "fp16", "int8", "bench"]
