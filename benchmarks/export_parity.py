"""Export time and parity per component for the embedded VQA model and three transformers models.

Writes benchmarks/results/export_parity.json. Run from the repository root:
    python benchmarks/export_parity.py
The transformers models are built from small configs with random weights (no hub access here); the
VQA model carries its trained weights.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    from models.hf import CONFIGS

    from mmopt.api import export
    from mmopt.provenance import tool_versions

    results = {"tools": tool_versions(), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        jobs = {"vqa": ROOT / "mmopt" / "examples" / "vqa" / "mmopt.toml"}
        for name, text in CONFIGS.items():
            d = Path(tmp) / name
            shutil.copytree(ROOT / "tests" / "models", d / "models")
            (d / "mmopt.toml").write_text(text)
            jobs[name] = d / "mmopt.toml"
        for name, cfg in jobs.items():
            r = export(cfg, Path(tmp) / f"{name}-bundle")
            for mod in [m for m in sys.modules if m == "models" or m.startswith("models.")]:
                sys.modules.pop(mod)
            results["models"][name] = {
                "export_seconds": r.manifest.results["export_seconds"],
                "parity_fp32": r.manifest.results["parity"]["fp32"],
                "components": {c: s.module or "(rest of forward)" for c, s in r.manifest.components.items()},
            }
            total = r.manifest.results["export_seconds"]["total"]
            pipe = r.manifest.results["parity"]["fp32"]["pipeline"]
            print(f"{name:12s} {total:6.1f} s  pipeline cos {pipe['cos_min']:.7f} max_abs {pipe['max_abs']:.2e}")
    out = ROOT / "benchmarks" / "results" / "export_parity.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
