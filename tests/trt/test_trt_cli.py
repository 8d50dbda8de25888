"""``mmopt build`` through a throwaway Typer app (the real main app is assembled in mmopt.cli)."""
from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from mmopt.cli.build import register
from mmopt.errors import UsageError
from mmopt.jobs import build
from mmopt.trt import device
from mmopt_runtime.trt import api
from mmopt.trt.errors import TensorRTUnavailable
from trt_fake_bundle import FAKE_ENV, FakeEngineWriter, make_bundle


@pytest.fixture
def app():
    app = typer.Typer()
    register(app)

    @app.callback()
    def main() -> None:  # keeps `build` a subcommand, as in the real app
        pass
    return app


def test_help_teaches(app):
    out = CliRunner().invoke(app, ["build", "--help"], env={"COLUMNS": "200"}).output
    for text in ("target GPU", "identical GPU and software image", "--profile", "batch=1", "--timing-cache",
                 "--hardware-compat", "same_compute_capability", "--version-compatible", "--sparse", "strongly"):
        assert text in out, text


def test_without_tensorrt_or_gpu_the_error_propagates_with_exit_code_1(app, tmp_path, monkeypatch):
    monkeypatch.setattr(device, "current_gpu", lambda index=0: None)
    result = CliRunner().invoke(app, ["build", str(tmp_path)])
    assert isinstance(result.exception, TensorRTUnavailable)
    assert result.exception.exit_code == 1
    assert "mmopt build BUNDLE" in str(result.exception)


def test_builds_and_prints_a_table(app, tmp_path, monkeypatch):
    bundle = make_bundle(tmp_path / "b")
    writer = FakeEngineWriter()
    monkeypatch.setattr(build, "preflight", lambda: FAKE_ENV)
    monkeypatch.setattr(api, "build_engine", writer)
    result = CliRunner().invoke(app, ["build", str(bundle), "--precision", "fp16", "--profile", "batch=1",
                                      "--timing-cache", str(tmp_path / "c.cache"), "--hardware-compat", "ampere+",
                                      "--version-compatible", "--sparse", "--workspace-mib", "256"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "image.fp16.engine" in result.output and "text.fp16.engine" in result.output
    assert "captured, batch=1" in result.output and "FAKE Orin" in result.output
    assert (tmp_path / "c.cache").exists()
    assert [c[1] for c in writer.calls] == [["captured", "batch=1"]] * 2
    opts = writer.options[0]  # every flag reached the build
    assert (opts.workspace_mib, opts.sparse_weights, opts.version_compatible, opts.hardware_compatibility) == \
        (256, True, True, "ampere+")
    assert opts.timing_cache == tmp_path / "c.cache" and opts.profiles == ({"batch": 1},)


def test_bad_profile_text_is_a_usage_error(app, tmp_path):
    result = CliRunner().invoke(app, ["build", str(tmp_path), "--profile", "batch"])
    assert isinstance(result.exception, UsageError) and result.exception.exit_code == 2
