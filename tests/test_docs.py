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


# what a fragment (a [precision] / [calibration] / [tolerance] example) is appended to, to be checked whole
BASE = """
[model]
factory = "my_project.model:build"
[inputs.pixel_values]
shape = ["batch", 3, 8, 8]
[inputs.input_ids]
shape = ["batch", 4]
dtype = "int64"
range = [0, 9]
[dims]
batch = { min = 1, opt = 2, max = 4 }
[components]
image = "vision"
text = "text"
"""


@pytest.mark.parametrize("text", list(_blocks("toml")))
def test_toml_examples_parse(text, tmp_path):
    """A whole mmopt.toml parses as it is; a fragment parses appended to a minimal one (every key it uses
    must be a real key with a valid value)."""
    (tmp_path / "mmopt.toml").write_text(text if "[model]" in text else BASE + "\n" + text)
    spec = load_spec(tmp_path / "mmopt.toml")
    if "[precision]" in text:
        assert spec.precision, "the fragment's [precision] table was not read"


@pytest.mark.parametrize("text", list(_blocks("bash")))
def test_commands_parse(text):
    """Every `mmopt ...` line of the docs names a real command and parses with its real options and
    argument types (an option renamed or removed fails here), without running it."""
    import click
    import typer.main

    group = typer.main.get_command(app)
    for line in text.splitlines():
        for part in line.split("&&"):
            words = shlex.split(part.split("#")[0])
            if not words or words[0] != "mmopt" or len(words) < 2 or words[1].startswith("-"):
                continue
            with click.Context(group) as ctx:
                cmd = group.get_command(ctx, words[1])
                assert cmd is not None, f"`{part.strip()}` uses an unknown command"
                try:
                    cmd.make_context(words[1], words[2:], parent=ctx)
                except click.UsageError as e:
                    pytest.fail(f"`{part.strip()}` does not parse: {e.format_message()}")
