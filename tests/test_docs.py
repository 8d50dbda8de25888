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
