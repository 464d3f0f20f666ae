"""The second shipped model, ``xclip:demo-no-star``: the demo fine-tuned on a world without stars (scripts/train_demo.py
--init xclip/models/shapes-clip --without-shape star). Its fixed first-block attention is the demo's, bitwise; its
training record says how it was made; and on held-out scenes its star boxes lose their phrase while other classes
hardly move, which is what `make compare` shows."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

import xclip
from xclip.cli.app import app
from xclip.analysis.comparison import compare_runs
from xclip.models.loading import SHIPPED_MODELS
from xclip.analysis.synthetic import generate, write_scenes

runner = CliRunner()
N_STAR_SCENES = 60  # the first 60 scenes of seed 20000 (make grounding's) whose caption names a star
METRIC = "box_to_phrase/pointing_game"


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    return (xclip.load_model("xclip:demo", device="cpu").model,
            xclip.load_model("xclip:demo-no-star", device="cpu").model)


def _frozen(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What train_demo.py's freeze_neighbouring_words keeps fixed: the one-hot position embeddings, the first text
    block's query and key maps and the layer norm before them, and the token embeddings' position subspace."""
    text = model.text_model
    block = text.encoder.layers[0]
    positions = text.config.max_position_embeddings
    return {
        "position_embedding": text.embeddings.position_embedding.weight,
        "token_embedding[:, :positions]": text.embeddings.token_embedding.weight[:, :positions],
        **{f"layers.0.{name}": p for name, p in block.named_parameters()
           if name.startswith(("self_attn.q_proj.", "self_attn.k_proj.", "layer_norm1."))},
    }


def test_the_no_star_model_loads_by_name_and_keeps_the_demos_fixed_attention_bitwise(models):
    demo, no_star = models
    assert SHIPPED_MODELS["demo-no-star"].name == "shapes-clip-no-star"
    frozen_demo, frozen_no_star = _frozen(demo), _frozen(no_star)
    assert len(frozen_demo) == 8  # position and token embeddings, q and k weights and biases, layer norm's two
    for name, value in frozen_demo.items():
        assert torch.equal(value, frozen_no_star[name]), name
    assert not frozen_no_star["token_embedding[:, :positions]"].any()
    # and it was fine-tuned: everything else may move, and the image tower and the second text block did
    for module in ("vision_model.embeddings.patch_embedding.weight", "text_model.encoder.layers.1.mlp.fc1.weight"):
        assert not torch.equal(demo.get_parameter(module), no_star.get_parameter(module)), module


def test_its_training_record_names_the_demo_and_the_removed_shape():
    record = json.loads((SHIPPED_MODELS["demo-no-star"] / "training.json").read_text())
    assert record["init"] == SHIPPED_MODELS["demo"].name == "shapes-clip"
    assert record["without_shape"] == "star"
    assert record["steps"] > 0 and record["bind_neighbouring_words"] is True
    assert record["out"] == "shapes-clip-no-star"
    # its held-out retrieval of captions naming a star collapsed while the others held (train_demo.py prints both)
    assert record["naming_star_text_to_image_r1"] < record["not_naming_star_text_to_image_r1"] / 2


@pytest.mark.slow  # two runs of the held-out scenes
def test_star_boxes_lose_their_phrase_and_the_other_classes_hardly_move(tmp_path):
    """The first 60 star scenes of seed 20000, measured: the star box -> phrase pointing game falls from 0.871 to
    0.714 (-0.157 [-0.26, -0.07], 70 phrases: 11 star boxes lose their phrase), the other four classes in the same
    captions (92 phrases) by 0.054. On make grounding's 500 scenes the star difference is -0.083 [-0.13, -0.04]
    and no other class's interval lies below 0 (circle's comes closest: -0.027 [-0.06, 0.00]). The phrase -> image
    pointing game of stars does not move there (-0.005 [-0.04, +0.04]): the demo already grounds a star phrase by
    its colour word (its star token's rows carry a fourth to a ninth of the mass of the other shape words' rows;
    beside another object of the same colour it points at the star 1 time in 5), so forgetting stars leaves it."""
    scenes = [s for s in generate(160, seed=20000) if any(p.shape == "star" for p in s.phrases)][:N_STAR_SCENES]
    assert len(scenes) == N_STAR_SCENES
    folder = write_scenes(scenes, tmp_path / "scenes")
    runs = []
    for model in ("xclip:demo", "xclip:demo-no-star"):
        output = tmp_path / model.removeprefix("xclip:")
        config = {
            "model": {"name": model, "device": "cpu"},
            "data": {"format": "imagefolder", "root": str(folder), "metadata": str(folder / "metadata.jsonl")},
            "pairing": {"mode": "given"},
            "output": {"directory": str(output)},
            "runtime": {"batch_size": 64},
        }
        (tmp_path / f"{output.name}.yaml").write_text(yaml.safe_dump(config))
        result = runner.invoke(app, ["attribute", str(tmp_path / f"{output.name}.yaml"), "-q"])
        assert result.exit_code == 0, result.output
        runs.append(output)
    report = compare_runs(runs, folder / "annotations.jsonl")
    star = report["per_class"]["star"]
    others = [stats for label, stats in report["per_class"].items() if label != "star"]
    assert len(others) == 4
    n_others = sum(stats["n_phrases"] for stats in others)
    star_change = star[METRIC]["B-A"]["mean"]
    others_change = sum(stats[METRIC]["B-A"]["mean"] * stats["n_phrases"] for stats in others) / n_others
    assert star["n_phrases"] >= 60 and n_others >= 60
    assert star_change <= -0.10  # measured -0.157: 4 of its 11 lost boxes may come back
    assert abs(others_change) <= abs(star_change) / 2  # measured 0.054 against 0.157 / 2
    assert star[METRIC]["B-A"]["ci95"][1] < 0
