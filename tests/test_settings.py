"""One settings object from the run config to the engine, with each default and each check written once; one
reading of model names for the run config and the loader."""

from __future__ import annotations

import inspect
import re
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

import xclip
from xclip.attribution import from_config
from xclip.config import AttributionConfig, RuntimeConfig, load_config
from xclip.core.rules import DEFAULT_INTERNAL_BATCH_SIZE, DEFAULT_SETTINGS, AttributionSettings
from xclip.models.base import DualEncoderAdapter
from xclip.models.names import OPEN_CLIP_CONFIG, resolve_model_name

SETTING_NAMES = [f.name for f in fields(AttributionSettings)]


@pytest.fixture(scope="module")
def demo() -> DualEncoderAdapter:
    return xclip.load_model("xclip:demo", device="cpu")


def _run_config(root: Path, attribution: dict, **sections: dict) -> Path:
    path = root / "run.yaml"
    config = {
        "model": {"name": "xclip:demo", "device": "cpu"},
        "attribution": attribution,
        "data": {"format": "queries", "root": ".", "queries": ["a red circle"]},
        "output": {"directory": "run"},
        **sections,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# --- one object, its defaults written once --------------------------------------------------------------------------
def test_the_config_and_the_engine_take_their_defaults_from_the_settings_object():
    config_fields = AttributionConfig.model_fields
    engine = inspect.signature(xclip.InteractionAttribution).parameters
    assert set(config_fields) == {*SETTING_NAMES, "panel_layout"}
    assert set(engine) == {"model", "settings", *SETTING_NAMES, "internal_batch_size", "panel_layout"}
    for name in SETTING_NAMES:
        assert config_fields[name].default == engine[name].default == getattr(DEFAULT_SETTINGS, name), name
    assert AttributionConfig().settings == DEFAULT_SETTINGS
    assert engine["panel_layout"].default == config_fields["panel_layout"].default
    internal_batch_size = RuntimeConfig.model_fields["internal_batch_size"].default
    assert engine["internal_batch_size"].default == internal_batch_size == DEFAULT_INTERNAL_BATCH_SIZE
    reference = inspect.signature(DualEncoderAdapter.image_reference_pixels).parameters
    assert (reference["reference"].default, reference["seed"].default, reference["blur_radius"].default) == (
        DEFAULT_SETTINGS.image_reference, DEFAULT_SETTINGS.reference_seed, DEFAULT_SETTINGS.blur_radius
    )


def test_load_attributor_hands_the_engine_the_configs_settings_object(tmp_path, monkeypatch):
    attribution = {"n_steps": 3, "tolerance": None, "image_reference": "blur", "blur_radius": 3, "text_layer": 1,
                   "panel_layout": "default"}
    config = load_config(_run_config(tmp_path, attribution, runtime={"internal_batch_size": 7}))
    calls = []
    monkeypatch.setattr(from_config, "load_model", lambda *args, **kwargs: "the model")
    monkeypatch.setattr(from_config, "InteractionAttribution", lambda *args, **kwargs: calls.append((args, kwargs)))
    from_config.load_attributor(config)
    assert calls == [(("the model",), {"settings": config.attribution.settings, "internal_batch_size": 7, "panel_layout": "default"})]
    expected = AttributionSettings(n_steps=3, tolerance=None, image_reference="blur", blur_radius=3.0, text_layer=1)
    assert config.attribution.settings == expected


def test_an_engine_from_a_config_holds_its_settings(tmp_path, demo):
    config = load_config(_run_config(tmp_path, {"n_steps": 2, "image_reference": "noise", "reference_seed": 9, "text_layer": 1}))
    attributor, _ = from_config.load_attributor(config)
    assert attributor.settings == config.attribution.settings
    assert (attributor.n_steps, attributor.image_reference, attributor.reference_seed, attributor.text_layer) == (2, "noise", 9, 1)


def test_keyword_arguments_build_the_settings_object_and_do_not_mix_with_one(demo):
    attributor = xclip.InteractionAttribution(demo, n_steps=3, image_reference="noise", reference_seed=5)
    assert attributor.settings == AttributionSettings(n_steps=3, image_reference="noise", reference_seed=5)
    same = xclip.InteractionAttribution(demo, settings=attributor.settings)
    assert same.settings is attributor.settings and (same.n_steps, same.reference_seed) == (3, 5)
    with pytest.raises(TypeError, match=r"not both \(got settings= and n_steps=, mode=\)"):
        xclip.InteractionAttribution(demo, settings=attributor.settings, n_steps=4, mode="reverse")
    with pytest.raises(TypeError, match="settings must be an AttributionSettings, got AttributionConfig"):
        xclip.InteractionAttribution(demo, settings=AttributionConfig())


# --- one check ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad",
    [
        {"tolerance": 2.0},
        {"tolerance": 0.0},
        {"n_steps": 0},
        {"n_steps": 5000},
        {"max_steps": 5000},
        {"blur_radius": -1.0},
        {"reference_seed": -1},
        {"text_filler": -1},
        {"n_steps": None, "tolerance": None},
        {"n_steps": None, "convention": "reference"},
        {"n_steps": None, "rule": "midpoint"},
        {"n_steps": None, "max_steps": 8},
    ],
)
def test_the_api_and_the_config_refuse_a_setting_with_the_same_words(tmp_path, demo, bad):
    settings = {"n_steps": 2, **bad}
    with pytest.raises(xclip.ConfigError) as from_api:
        xclip.InteractionAttribution(demo, **settings)
    path = _run_config(tmp_path, settings)
    with pytest.raises(xclip.ConfigError) as from_file:
        load_config(path)
    setting = from_api.value.setting
    line = next(number for number, row in enumerate(path.read_text().splitlines(), start=1) if row.startswith(f"  {setting}:"))
    assert f"{path}:{line}: attribution.{setting}: {from_api.value}" in str(from_file.value)


# --- one reading of model names -------------------------------------------------------------------------------------
class _Reached(Exception):
    """Raised by a stubbed loader: what load_model would have loaded, and with which library."""


@pytest.mark.parametrize(
    "name",
    ["xclip:demo", "xclip:demo-no-star", "xclip:nope", "open_clip:ViT-B-32/openai", "hf-hub:org/name",
     "openai/clip-vit-base-patch32", "hf", "./hf", "oc", "empty", "./missing", "missing/deeper/still"],
)
def test_the_config_and_the_loader_read_a_model_name_alike(tmp_path, monkeypatch, name):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "oc").mkdir()
    (tmp_path / "oc" / OPEN_CLIP_CONFIG).write_text("{}")
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)  # the loader reads a relative name against the working directory, a config against its folder
    path = _run_config(tmp_path, {"n_steps": 2}, model={"name": name})

    def reached(library: str):
        def stub(location, *args, **kwargs):
            raise _Reached(library, location)

        return stub

    monkeypatch.setattr("xclip.models.hf.from_pretrained", reached("transformers"))
    monkeypatch.setattr("xclip.models.loading._load_open_clip", reached("open_clip"))
    try:
        source = resolve_model_name(name, tmp_path)
    except xclip.XclipError as e:
        with pytest.raises(xclip.ConfigError, match="^" + re.escape(str(e))):
            load_config(path)
        with pytest.raises(type(e)) as from_loader:
            xclip.load_model(name, device="cpu")
        assert str(from_loader.value) == str(e)
        return
    assert load_config(path).model.name == source.name
    with pytest.raises(_Reached) as loaded:
        xclip.load_model(name, device="cpu")
    location = str(source.directory) if name.startswith("xclip:") else name
    assert loaded.value.args == (source.library, location)
    assert (source.library == "open_clip") == (name.startswith(("open_clip:", "hf-hub:")) or name == "oc")


@pytest.mark.parametrize(("environ", "n_gpus", "expected"), [
    ({}, 4, "cuda:0"),
    ({"LOCAL_RANK": "2"}, 4, "cuda:2"),  # torchrun
    ({"SLURM_LOCALID": "3"}, 4, "cuda:3"),  # srun
    ({"LOCAL_RANK": "1", "SLURM_LOCALID": "3"}, 4, "cuda:1"),  # torchrun inside an srun allocation: its own rank
    ({"SLURM_LOCALID": "3"}, 1, "cuda:0"),  # srun bound one GPU to the task: it is the only one it sees
    ({"LOCAL_RANK": "2"}, 0, "cpu"),  # no CUDA: the rank changes nothing
])
def test_device_auto_takes_the_gpu_of_the_local_rank(monkeypatch, environ, n_gpus, expected):
    import torch

    from xclip.models.loading import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: n_gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n_gpus)
    assert resolve_device("auto", environ) == torch.device(expected)


@pytest.mark.parametrize(("environ", "message"), [
    ({"LOCAL_RANK": "4"}, r"LOCAL_RANK=4 names a GPU this process cannot see \(4 visible\)"),
    ({"SLURM_LOCALID": "x"}, r"reads the local rank from SLURM_LOCALID, which is 'x', not a number"),
])
def test_device_auto_refuses_a_local_rank_past_the_gpus(monkeypatch, environ, message):
    import torch

    from xclip.errors import ConfigError
    from xclip.models.loading import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(ConfigError, match=message) as raised:
        resolve_device("auto", environ)
    assert raised.value.setting == "device"
