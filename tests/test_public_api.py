"""The public surface and the import boundary of the math."""

from __future__ import annotations

import subprocess
import sys

import xclip


def test_public_names():
    assert sorted(xclip.__all__) == sorted(
        [
            "ConfigError", "Contributions", "DualEncoderAdapter", "InputError", "InteractionAttribution",
            "InteractionMap", "ModelFamilyError", "PairNumbers", "RunUnavailable", "StoreError", "XclipError", "__version__",
            "get_adapter_cls", "interaction_map", "interaction_maps", "list_families", "load_model", "pair_numbers",
            "quadrature",
        ]
    )
    for name in xclip.__all__:
        assert hasattr(xclip, name)
    assert xclip.list_families() == ["clip", "open_clip", "siglip"]


def test_core_imports_no_model_family_or_io_library():
    code = (
        "import sys, xclip.core.interaction, xclip.core.quadrature, xclip.core.transformer; "
        "print(sorted(m for m in ('transformers', 'open_clip', 'h5py', 'matplotlib', 'rich', 'typer') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_renamed_and_misspelt_arguments_say_what_to_write(model_dirs):
    import pytest

    model = xclip.load_model(model_dirs["clip"], device="cpu")
    with pytest.raises(TypeError, match=r"^InteractionAttribution\(\) got an unexpected keyword argument 'steps': it is called n_steps now$"):
        xclip.InteractionAttribution(model, steps=20)
    with pytest.raises(TypeError, match=r"'method': it is called rule now$"):
        xclip.InteractionAttribution(model, method="riemann-right")
    with pytest.raises(TypeError, match=r"'tolerence': did you mean tolerance\?$"):
        xclip.InteractionAttribution(model, tolerence=1e-3)
    assert xclip.InteractionAttribution(model, n_steps=4, rule="riemann-right").n_steps == 4  # the right names pass


def test_version_is_the_installed_distributions_and_the_cli_prints_it():
    import importlib.metadata

    from typer.testing import CliRunner

    from xclip.cli.app import app

    assert xclip.__version__ == importlib.metadata.version("xclip")  # one version, as pyproject.toml states it
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output == f"xclip {xclip.__version__}\n"
