"""Every README / docs example is checked: TOML blocks parse as mmopt.toml, commands exist."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from mmopt.cli import app
from mmopt.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _blocks(lang: str):
    for page in PAGES:
        for i, block in enumerate(re.findall(rf"```{lang}\n(.*?)```", page.read_text(), re.S)):
            yield pytest.param(block, id=f"{page.name}-{i}")


@pytest.mark.parametrize("text", list(_blocks("toml")))
def test_toml_examples_parse(text, tmp_path):
    if "[model]" not in text:
        pytest.skip("a fragment, not a whole mmopt.toml")
    (tmp_path / "mmopt.toml").write_text(text)
    load_spec(tmp_path / "mmopt.toml")


@pytest.mark.parametrize("text", list(_blocks("bash")))
def test_commands_exist(text):
    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    for line in text.splitlines():
        for part in line.split("&&"):
            words = shlex.split(part.split("#")[0])
            if words and words[0] == "mmopt" and len(words) > 1:
                assert words[1] in commands, f"`{part.strip()}` uses an unknown command"
