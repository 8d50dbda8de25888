"""Every command's --help reads cleanly at 80 and 120 columns: no bracketed word eaten as markup
([dims], [precision]), no option name cut short, no flag shown as taking a value, paragraphs re-wrapped
instead of broken mid-sentence, examples on lines of their own."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

COMMANDS = ["", "export", "quantize", "bench", "build", "inspect", "verify", "demo", "triton"]


def _help(command: str, width: int) -> str:
    env = {**os.environ, "COLUMNS": str(width), "TERM": "dumb", "NO_COLOR": "1"}
    r = subprocess.run([sys.executable, "-m", "mmopt", *([command] if command else []), "--help"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("width", [80, 120])
@pytest.mark.parametrize("command", COMMANDS)
def test_help_reads_cleanly(command, width):
    text = _help(command, width)
    assert "…" not in text, [ln for ln in text.splitlines() if "…" in ln]
    assert "<bool>" not in text  # flags take no value
    assert all(len(line) <= width for line in text.splitlines())
    # prose outside the option panels: a bracketed word eaten as markup leaves two spaces ("every  entry")
    prose = [ln.strip() for ln in text.splitlines() if not set(ln) & set("│╭╰") and not ln.strip().startswith(
        ("Usage:", "mmopt "))]
    assert not [ln for ln in prose if re.search(r"\w  +\w", ln)]


def test_bracketed_tables_and_examples_survive():
    export = _help("export", 120)
    assert "every [dims] entry" in " ".join(export.split())
    quantize = " ".join(_help("quantize", 120).split())
    for table in ("[precision]", "[calibration]", "[evaluation]", "[tolerance]"):
        assert table in quantize, table
    lines = _help("quantize", 80).splitlines()
    examples = [ln.strip() for ln in lines if ln.strip().startswith("mmopt quantize")]
    assert examples == ["mmopt quantize build/ -p image=int8 -p text=fp16",
                        "mmopt quantize build/ -p image=int8-cpu -p text=auto"]
    assert any(ln.strip() == "mmopt export mmopt.toml -o build/" for ln in _help("export", 80).splitlines())
