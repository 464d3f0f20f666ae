"""`import xclip` and the CLI's help stay light: no torch, transformers or matplotlib until a command needs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import xclip

HEAVY = ("torch", "transformers", "matplotlib")
REPOSITORY = Path(__file__).resolve().parents[1]


def _run(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it leaves its result in ``out``, returned with the heavy modules loaded."""
    probe = f"import json, sys\nout = {{}}\n{code}\nout['heavy'] = [m for m in {HEAVY!r} if m in sys.modules]\nprint(json.dumps(out))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_import_xclip_loads_no_heavy_library():
    assert _run("import xclip")["heavy"] == []


@pytest.mark.parametrize("argv", [["--help"], ["attribute", "--help"], ["render", "--help"], ["explain", "--help"],
                                  ["evaluate", "--help"]], ids=" ".join)
def test_cli_help_exits_0_without_heavy_libraries(argv):
    code = (
        "from typer.testing import CliRunner\nfrom xclip.cli.app import app\n"
        f"result = CliRunner().invoke(app, {argv!r})\n"
        "out.update(exit_code=result.exit_code, output=result.output, error=repr(result.exception))"
    )
    out = _run(code)
    assert out["exit_code"] == 0, out["output"] + out["error"]
    assert "Usage" in out["output"]
    assert out["heavy"] == []


def test_a_config_is_checked_and_refused_without_heavy_libraries(tmp_path):
    # a config is read and validated before torch loads: a bad one is refused in a fraction of a second (torch
    # alone takes a second or more to import), a good one loads torch only when the run starts
    deep = tmp_path / "deep.yaml"
    deep.write_text("model: " + "[" * 1000 + "]" * 1000 + "\n")
    demo = REPOSITORY / "configs" / "demo.yaml"
    code = (
        "from typer.testing import CliRunner\nfrom xclip.cli.app import app\nfrom xclip.config import load_config\n"
        f"config = load_config({str(demo)!r}, ['data.limit=1'])\n"
        f"result = CliRunner().invoke(app, ['attribute', {str(deep)!r}])\n"
        "out.update(exit_code=result.exit_code, output=result.output, name=config.model.name)"
    )
    out = _run(code)
    assert out["exit_code"] == 2 and "nested more than" in out["output"] and out["name"] == "xclip:demo"
    assert out["heavy"] == []


def test_every_subcommand_help_exits_0():
    from typer.testing import CliRunner

    from xclip.cli.app import app

    names = [c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands]
    assert {"attribute", "explain", "render", "evaluate"} <= set(names)
    for name in names:
        result = CliRunner().invoke(app, [name, "--help"], terminal_width=80)
        assert result.exit_code == 0, (name, result.output, result.exception)
        # a flag takes no value, so none is shown with one (Typer's Rich help printed "--overwrite <bool>"), and
        # the text wraps at the terminal's width
        assert "<bool>" not in result.output, (name, result.output)
        assert max(len(line) for line in result.output.splitlines()) <= 80, (name, result.output)


def test_explain_help_prints_the_open_clip_tag_literally():
    from typer.testing import CliRunner

    from xclip.cli.app import app

    result = CliRunner().invoke(app, ["explain", "--help"], terminal_width=200)
    assert result.exit_code == 0, result.exception
    assert "open_clip:ARCH[/TAG]" in result.output


def test_public_names_resolve_lazily():
    for name in xclip.__all__:
        assert getattr(xclip, name) is not None
    assert xclip.InteractionAttribution.__module__ == "xclip.attribution.engine"
    assert xclip.XclipError is __import__("xclip.errors", fromlist=["XclipError"]).XclipError
    assert set(xclip.__all__) <= set(dir(xclip))
    with pytest.raises(AttributeError, match="no_such_name"):
        xclip.no_such_name  # noqa: B018
    assert not hasattr(xclip, "no_such_name")


@pytest.mark.slow  # a fresh process per import
def test_from_import_in_a_fresh_process():
    out = _run("from xclip import InteractionAttribution, XclipError\nout['name'] = InteractionAttribution.__name__")
    assert out["name"] == "InteractionAttribution"
    assert "torch" in out["heavy"]  # the lazy names do load their modules
