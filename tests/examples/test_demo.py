"""The embedded VQA model end to end through the CLI, as a new user runs it."""
from __future__ import annotations

import json

import pytest
from support import run_cli

pytestmark = pytest.mark.slow


def test_demo_writes_a_verified_bundle(tmp_path):
    out = tmp_path / "demo"
    r = run_cli("demo", "-o", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"bundle written: {out}" in r.stdout.replace("\n", "")
    flat = " ".join(r.stdout.split())
    assert flat.startswith(f"mmopt demo: the bundle goes to {out}/, the bench reports to {out}-bench/")
    assert "what you just saw: 1. one ONNX graph per encoder" in flat and "docs/config.md" in flat
    m = json.loads((out / "manifest.json").read_text())
    fp32 = m["results"]["parity"]["fp32"]
    assert fp32["pipeline"]["failed"] == 0 and fp32["pipeline"]["argmax"] == 1.0
    assert {c: s["module"] for c, s in m["components"].items()} == {
        "image": "image_encoder", "text": "text_encoder", "fusion": ""}
    assert m["components"]["text"]["sources"] == {"input_ids": "input:input_ids",
                                                  "attention_mask": "input:attention_mask"}
    assert run_cli("verify", str(out)).returncode == 0
    # the demo ends with the bench table, and its reports beside the bundle
    assert "bench: pipeline latency" in r.stdout and "gates passed" in r.stdout
    report = json.loads((tmp_path / "demo-bench" / "report.json").read_text())
    assert report["variants"][0]["task"]["score"] > 0.95 and report["gates"]["passed"]
    # the precision table comes from that same bench report: one variant per precision and the mixed
    # policy quantize judged, each scored on the full test split
    assert "precision variants: accuracy on 9673 test samples" in r.stdout and "image=int8-cpu+" in r.stdout
    by_id = {v["id"]: v for v in report["variants"]}
    chosen = next(iter(v for v in by_id.values() if v["precision"] == "mixed"))
    assert chosen["precisions"]["image"] == "int8-cpu" and chosen["task"]["samples"] == 9673
    # fp16 is judged on its CPU emulation: its error shows, where ONNX Runtime's fp32 compute would hide it
    fp16, fp32 = by_id["onnxruntime/fp16"]["task"]["vs_eager"], by_id["onnxruntime/fp32"]["task"]["vs_eager"]
    assert fp16["max_abs"] > 100 * fp32["max_abs"]
