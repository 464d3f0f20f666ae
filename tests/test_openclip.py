"""The open_clip family: open_clip's own models, loaded through xclip's public path, against open_clip itself,
the naive algorithm, and the same weights converted to a transformers CLIPModel.

The models are random and tiny, built from configs registered with open_clip here (no downloads), saved as
checkpoint files, and loaded with `load_model("open_clip:ARCH", checkpoint=...)`.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from naive import integrated_jacobian, naive_interactions
from helpers import (CAPTIONS, assert_patches_where_the_processor_put_them, assert_read_as_text, expect, invoke, json_line,
                     jsonl_folder, make_images)

import xclip
from xclip.core.quadrature import quadrature
from xclip.core.transformer import Positions, embed_from_hidden
from xclip.errors import ModelFamilyError

open_clip = pytest.importorskip("open_clip")  # `make test` installs it; elsewhere these tests are skipped

TEXT = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 3}
VISION = {"image_size": 32, "layers": 3, "width": 32, "patch_size": 8, "head_width": 8}
CONFIGS = {
    # OpenAI-style: QuickGELU, CLS pooling, no LayerScale: what `transformers` CLIPModel also expresses
    "xclip-tiny-openai": {"embed_dim": 16, "quick_gelu": True, "vision_cfg": VISION, "text_cfg": TEXT},
    # LAION/DataComp-style GELU with LayerScale on both towers, mean pooling normalised after pooling, the text
    # tower as open_clip's TextTransformer (CustomTextCLIP) pooled at the tokenizer's EOT
    "xclip-tiny-custom": {
        "embed_dim": 16, "custom_text": True,
        "vision_cfg": {**VISION, "ls_init_value": 0.5, "pool_type": "avg", "final_ln_after_pool": True},
        "text_cfg": {**TEXT, "ls_init_value": 0.5, "pool_type": "eos", "eos_id": 49407},
    },
    # attentional pooling (CoCa-style): not supported, refused by name
    "xclip-tiny-attnpool": {"embed_dim": 16, "vision_cfg": {**VISION, "attentional_pool": True}, "text_cfg": TEXT},
}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Each config registered with open_clip and its random weights saved as .safetensors and as .pt."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("open_clip")
    files = {}
    for name, config in CONFIGS.items():
        (root / f"{name}.json").write_text(json.dumps(config))
        open_clip.add_model_config(root / f"{name}.json")
        torch.manual_seed(0)
        model = open_clip.create_model(name)
        with torch.no_grad():  # LayerScale vectors and biases away from their constant initial values
            for parameter_name, parameter in model.named_parameters():
                if parameter_name.endswith(("gamma", "bias")):
                    parameter.add_(0.1 * torch.randn_like(parameter))
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, root / f"{name}.safetensors")
        torch.save(state, root / f"{name}.pt")
        files[name] = root / f"{name}.safetensors"
        files[f"{name}.pt"] = root / f"{name}.pt"
    return files


def load(checkpoints, name: str, dtype: str = "float64", suffix: str = "") -> xclip.DualEncoderAdapter:
    return xclip.load_model(f"open_clip:{name}", checkpoint=checkpoints[name + suffix], dtype=dtype, device="cpu")


def reference(checkpoints, name: str):
    """open_clip's own model, transform and tokenizer for the same weights."""
    model, _, transform = open_clip.create_model_and_transforms(name, pretrained=str(checkpoints[name]), weights_only=True)
    return model.double().eval(), transform, open_clip.get_tokenizer(name)


@pytest.mark.parametrize("name", ["xclip-tiny-openai", "xclip-tiny-custom"])
@pytest.mark.parametrize("suffix", ["", ".pt"])
def test_embeddings_equal_open_clips_own_at_every_cut(checkpoints, name, suffix):
    adapter = load(checkpoints, name, suffix=suffix)
    model, transform, tokenizer = reference(checkpoints, name)
    images = make_images(3)
    with torch.no_grad():
        text_reference = F.normalize(model.encode_text(tokenizer(CAPTIONS)), dim=-1)
        pixels = torch.stack([transform(image) for image in images]).double()
        image_reference = F.normalize(model.encode_image(pixels), dim=-1)
    batch = adapter.tokenize(CAPTIONS)
    assert (batch.input_ids == tokenizer(CAPTIONS)[:, : batch.input_ids.shape[1]]).all()  # open_clip's own ids
    preprocessed = adapter.preprocess(images)
    assert (preprocessed.pixel_values == pixels).all()  # open_clip's own transform
    image_positions = Positions(pooled_index=adapter.image_pooled_index(len(images)))
    for layer in range(len(adapter.text_blocks)):
        hidden = adapter.text_hidden(batch.input_ids, batch.positions, layer)
        ours = embed_from_hidden(adapter.text_upper(layer), hidden, batch.positions, normalize=True)
        torch.testing.assert_close(ours, text_reference, rtol=0, atol=1e-12)
    for layer in range(len(adapter.image_blocks)):
        hidden = adapter.image_hidden(preprocessed.pixel_values, layer)
        ours = embed_from_hidden(adapter.image_upper(layer), hidden, image_positions, normalize=True)
        torch.testing.assert_close(ours, image_reference, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["xclip-tiny-openai", "xclip-tiny-custom"])
def test_maps_are_complete_and_equal_the_naive_algorithm(checkpoints, name):
    adapter = load(checkpoints, name)
    image = make_images(1)[0]
    attributor = xclip.InteractionAttribution(adapter)  # the default tolerance: 1e-3 of each input's own change
    (caption,) = attributor.text_contributions([CAPTIONS[1]])
    (picture,) = attributor.image_contributions([image])
    for item in (caption, picture):
        assert item.is_converged and item.relative_completeness_error <= 1e-3
    pair = xclip.interaction_map(caption, picture)
    assert pair.completeness_error <= pair.completeness_bound
    n_steps, layer = 6, len(adapter.text_blocks) - 1
    text = adapter.tokenize([CAPTIONS[1]])
    pixels = adapter.preprocess([image])
    text_hidden = adapter.text_hidden(text.input_ids, text.positions, layer)
    text_ref = adapter.text_hidden(adapter.text_reference_ids(text), text.positions, layer)
    image_hidden = adapter.image_hidden(pixels.pixel_values, layer)
    image_ref = adapter.image_hidden(adapter.image_reference_pixels(pixels), layer)
    alphas, weights = quadrature("gauss-legendre", n_steps)
    image_positions = Positions(pooled_index=adapter.image_pooled_index(1))
    naive = naive_interactions(
        integrated_jacobian(adapter.text_upper(layer), text_hidden, text_ref, text.positions, alphas, weights),
        (text_hidden - text_ref)[0],
        integrated_jacobian(adapter.image_upper(layer), image_hidden, image_ref, image_positions, alphas, weights),
        (image_hidden - image_ref)[0],
    )
    (engine,) = xclip.InteractionAttribution(adapter, n_steps=n_steps).attribute([CAPTIONS[1]], [image])
    torch.testing.assert_close(engine.interactions, naive, rtol=0, atol=1e-9 * naive.abs().max().item())


def clip_tokenizer_files(folder: Path) -> None:
    """transformers' CLIPTokenizer files for the vocabulary open_clip ships (the original CLIP BPE)."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    vocabulary = list(bytes_to_unicode().values())
    vocabulary += [v + "</w>" for v in vocabulary] + ["".join(m.split()) for m in merges]
    vocabulary += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocabulary)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def to_transformers(model, folder: Path) -> Path:
    """The same weights as a transformers CLIPModel checkpoint (OpenAI-style towers only)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    text, vision = TEXT, VISION
    config = CLIPConfig(
        text_config={"vocab_size": text["vocab_size"], "hidden_size": text["width"], "intermediate_size": 4 * text["width"],
                     "num_hidden_layers": text["layers"], "num_attention_heads": text["heads"],
                     "max_position_embeddings": text["context_length"], "hidden_act": "quick_gelu",
                     "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407},
        vision_config={"hidden_size": vision["width"], "intermediate_size": 4 * vision["width"],
                       "num_hidden_layers": vision["layers"], "num_attention_heads": vision["width"] // vision["head_width"],
                       "image_size": vision["image_size"], "patch_size": vision["patch_size"], "hidden_act": "quick_gelu"},
        projection_dim=16,
    )
    state = model.state_dict()
    converted = {
        "logit_scale": state["logit_scale"],
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_model.final_layer_norm.weight": state["ln_final.weight"],
        "text_model.final_layer_norm.bias": state["ln_final.bias"],
        "text_projection.weight": state["text_projection"].T,
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": state["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": state["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": state["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": state["visual.ln_post.bias"],
        "visual_projection.weight": state["visual.proj"].T,
    }
    for source, target, layers in (("transformer", "text_model", text["layers"]), ("visual.transformer", "vision_model", vision["layers"])):
        for i in range(layers):
            old, new = f"{source}.resblocks.{i}", f"{target}.encoder.layers.{i}"
            for part in ("weight", "bias"):
                for q, name in zip(state[f"{old}.attn.in_proj_{part}"].chunk(3), ("q_proj", "k_proj", "v_proj")):
                    converted[f"{new}.self_attn.{name}.{part}"] = q
                converted[f"{new}.self_attn.out_proj.{part}"] = state[f"{old}.attn.out_proj.{part}"]
                converted[f"{new}.layer_norm1.{part}"] = state[f"{old}.ln_1.{part}"]
                converted[f"{new}.layer_norm2.{part}"] = state[f"{old}.ln_2.{part}"]
                converted[f"{new}.mlp.fc1.{part}"] = state[f"{old}.mlp.c_fc.{part}"]
                converted[f"{new}.mlp.fc2.{part}"] = state[f"{old}.mlp.c_proj.{part}"]
    hf = CLIPModel(config)
    missing, unexpected = hf.load_state_dict(converted, strict=False)
    assert not unexpected and all("position_ids" in key for key in missing), (missing, unexpected)
    hf.save_pretrained(folder)
    clip_tokenizer_files(folder)
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>")
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_the_transformers_family_gives_the_same_maps(checkpoints, tmp_path):
    name = "xclip-tiny-openai"
    adapter = load(checkpoints, name)
    model, _, _ = reference(checkpoints, name)
    converted = xclip.load_model(to_transformers(model.float(), tmp_path / "hf"), dtype="float64", device="cpu")
    assert converted.family == "clip"
    text = adapter.tokenize(CAPTIONS)
    theirs = converted.tokenize(CAPTIONS)
    assert theirs.n_positions == text.n_positions  # one vocabulary: the same ids up to EOT (padding differs)
    assert all((a[:n] == b[:n]).all() for a, b, n in zip(theirs.input_ids, text.input_ids, text.n_positions))
    images = adapter.preprocess(make_images(2))  # the pixels of one transform, for both
    maps = []
    for family in (adapter, converted):
        attributor = xclip.InteractionAttribution(family, n_steps=8)
        captions = attributor.text_batch_contributions(text)
        pictures = attributor.image_batch_contributions(images)
        maps.append(xclip.interaction_maps(captions, pictures, [(c, i) for c in range(len(CAPTIONS)) for i in range(2)]))
    for ours, theirs in zip(*maps):
        torch.testing.assert_close(ours.interactions, theirs.interactions, rtol=0, atol=1e-10)
        assert abs(ours.score - theirs.score) < 1e-10


def test_a_checkpoint_holding_a_pickled_object_is_refused(checkpoints, tmp_path):
    state = torch.load(checkpoints["xclip-tiny-openai.pt"], weights_only=True)
    torch.save({"state_dict": state, "extra": np.random.default_rng(0)}, tmp_path / "epoch_3.pt")  # not a tensor
    with pytest.raises(ModelFamilyError, match=r"holds pickled objects that are not tensors.*weights_only=True"):
        xclip.load_model("open_clip:xclip-tiny-openai", checkpoint=tmp_path / "epoch_3.pt", device="cpu")


def test_unsupported_tower_features_are_named(checkpoints):
    with pytest.raises(ModelFamilyError, match=r"not supported: attentional pooling of the image tower"):
        load(checkpoints, "xclip-tiny-attnpool")


def test_names_are_checked_before_anything_loads(checkpoints, tmp_path):
    with pytest.raises(ModelFamilyError, match="unknown open_clip architecture 'ViT-Q-99'"):
        xclip.load_model("open_clip:ViT-Q-99/openai", device="cpu")
    with pytest.raises(xclip.XclipError, match="has no weights: add a pretrained tag"):
        xclip.load_model("open_clip:xclip-tiny-openai", device="cpu")
    with pytest.raises(xclip.XclipError, match=r"checkpoint: no file at .*missing.pt"):
        xclip.load_model("open_clip:xclip-tiny-openai", checkpoint=tmp_path / "missing.pt", device="cpu")


def test_both_families_load_in_one_environment(checkpoints, model_dirs):
    import torchvision  # the open_clip extra's torchvision: its compiled ops load beside this torch
    from transformers import CLIPImageProcessor  # noqa: F401  (breaks when torchvision's ops do not load)

    assert torchvision.ops.nms(torch.rand(3, 4), torch.rand(3), 0.5).numel() >= 1
    families = [xclip.load_model(model_dirs["clip"], device="cpu"), load(checkpoints, "xclip-tiny-openai", "float32")]
    assert [f.family for f in families] == ["clip", "open_clip"]
    for family in families:
        (pair,) = xclip.InteractionAttribution(family).attribute(["a red dog"], make_images(1))
        assert np.isfinite(pair.score)


def test_attribute_runs_on_an_open_clip_model_from_a_config(checkpoints, tmp_path):

    jsonl_folder(tmp_path, '{"file_name": "img0.png", "text": "a cat"}')
    config = {
        "model": {"name": "open_clip:xclip-tiny-custom", "checkpoint": str(checkpoints["xclip-tiny-custom"]), "device": "cpu"},
        "data": {"format": "imagefolder", "root": "images", "metadata": "images/metadata.jsonl"},
        "output": {"directory": "run"},
    }
    (tmp_path / "run.yaml").write_text(json.dumps(config))
    code, output = invoke("attribute", tmp_path / "run.yaml", "-q", "--json")
    assert code == 0, output
    assert json.loads(output)["done"] == 3
    from xclip.store.reader import RunReader

    with RunReader(tmp_path / "run") as run:
        assert run.attrs["model_family"] == "open_clip" and run.attrs["open_clip_version"] == open_clip.__version__
        assert len(run.attrs["model_weights_sha256"]) == 64
        assert run.caption_tokens(0).tokens[0] == "<start_of_text>"


def test_the_production_config_names_a_known_architecture():
    from xclip.config import load_config

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "coco-openclip-b16-laion.yaml")
    architecture, _, tag = config.model.name.removeprefix("open_clip:").partition("/")
    assert architecture in open_clip.list_models()
    assert tag in open_clip.list_pretrained_tags_by_model(architecture)


def test_hub_repositories_load_offline_at_a_pinned_revision(checkpoints, tmp_path, monkeypatch):
    """hf-hub:ORG/NAME from the Hugging Face cache (as after a download): the revision picks the snapshot."""
    import shutil

    from huggingface_hub import constants

    repository = tmp_path / "cache" / "models--someone--tiny-open-clip"
    commits = {"old": "1" * 40, "new": "2" * 40}
    for which, commit in commits.items():  # two snapshots with different weights; main points at the new one
        snapshot = repository / "snapshots" / commit
        snapshot.mkdir(parents=True)
        name = "xclip-tiny-openai" if which == "old" else "xclip-tiny-custom"
        (snapshot / "open_clip_config.json").write_text(json.dumps({"model_cfg": CONFIGS[name]}))
        shutil.copyfile(checkpoints[name], snapshot / "open_clip_model.safetensors")
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text(commits["new"])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    pinned = xclip.load_model("hf-hub:someone/tiny-open-clip", revision=commits["old"], local_files_only=True, dtype="float64", device="cpu")
    latest = xclip.load_model("hf-hub:someone/tiny-open-clip", local_files_only=True, dtype="float64", device="cpu")
    assert pinned.visual.pool_type == "tok" and latest.visual.pool_type == "avg"  # the old and the new model
    reference_model = load(checkpoints, "xclip-tiny-openai")
    batch = reference_model.tokenize(CAPTIONS)
    torch.testing.assert_close(pinned.embed_text(batch), reference_model.embed_text(batch), rtol=0, atol=0)
    with pytest.raises(ModelFamilyError, match=r"'hf-hub:someone/elsewhere'.*not found in the Hugging Face cache \(offline\)"):
        xclip.load_model("hf-hub:someone/elsewhere", local_files_only=True, device="cpu")
    with pytest.raises(xclip.XclipError, match="revision pins hub repositories"):
        xclip.load_model("open_clip:ViT-B-32/openai", revision="main", device="cpu")


def test_explain_draws_an_open_clip_model(checkpoints, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_images(1)[0].save(tmp_path / "photo.png")
    code, output = invoke("explain", "photo.png", "a red dog", "--model", "open_clip:xclip-tiny-custom",
                          "--checkpoint", checkpoints["xclip-tiny-custom"], "--json")
    assert code == 0, output
    (pair,) = json_line(output)["pairs"]
    assert Path(pair["figure"]).is_file() and np.isfinite(pair["score"])


@pytest.mark.slow  # two runs and two evaluations
def test_evaluate_reads_an_open_clip_run_like_the_same_weights_in_transformers(checkpoints, tmp_path):
    """evaluate needs no tokenizer: the run file holds the tokens' spans and the images' geometry. An open_clip
    run scores as the same weights converted to transformers do, and a run whose local checkpoint was deleted
    afterwards scores as before."""
    import shutil

    name = "xclip-tiny-openai"
    model, _, _ = reference(checkpoints, name)
    converted = to_transformers(model.float(), tmp_path / "hf")
    assert invoke("synth", tmp_path / "scenes", "--n", "6", "--seed", "3", "--size", "48")[0] == 0
    annotations = tmp_path / "scenes" / "annotations.jsonl"

    def evaluate(label: str) -> dict:
        code, output = invoke("evaluate", tmp_path / label, "-a", annotations)
        assert code == 0, output
        return json.loads((tmp_path / label / "evaluation" / "report.json").read_text())

    reports = {}
    for label, model_config in (("open_clip", {"name": f"open_clip:{name}", "checkpoint": str(checkpoints[name])}),
                                ("clip", {"name": str(converted)})):
        config = {"model": {**model_config, "device": "cpu", "dtype": "float64"}, "attribution": {"n_steps": 4},
                  "data": {"format": "imagefolder", "root": "scenes", "metadata": "scenes/metadata.jsonl"},
                  "output": {"directory": label}}
        (tmp_path / f"{label}.yaml").write_text(json.dumps(config))
        assert invoke("attribute", tmp_path / f"{label}.yaml", "-q")[0] == 0
        reports[label] = evaluate(label)
    ours, theirs = reports["open_clip"]["overall"], reports["clip"]["overall"]
    assert ours["n_phrases"] == theirs["n_phrases"] == sum(len(json.loads(line)["phrases"]) for line in annotations.read_text().splitlines())
    for key, value in ours.items():  # the two processors' pixels differ in float32 rounding only
        if key != "n_phrases":
            assert value["mean"] == pytest.approx(theirs[key]["mean"], abs=1e-3), key
    # the first-order baselines load each run's model: the same weights give the same scores in both families
    baselines = {}
    for label in reports:
        code, output = invoke("evaluate", tmp_path / label, "-a", annotations, "--baselines", "all", "-q")
        assert code == 0, output
        baselines[label] = json.loads((tmp_path / label / "evaluation" / "baselines.json").read_text())
    assert baselines["open_clip"]["methods"] == baselines["clip"]["methods"] == [
        "second_order", "second_order_interactions", "integrated_gradients", "gradient_input", "maskclip", "grad_eclip", "rollout", "chefer", "random", "centre"]
    for section in ("grounding", "faithfulness"):
        ours_scores, theirs_scores = (baselines[label][section] for label in ("open_clip", "clip"))
        ours_scores = ours_scores["overall"] if section == "grounding" else ours_scores
        theirs_scores = theirs_scores["overall"] if section == "grounding" else theirs_scores
        for method, metrics in ours_scores.items():
            if method == "n_phrases":
                continue
            for metric, value in metrics.items():
                assert value["mean"] == pytest.approx(theirs_scores[method][metric]["mean"], abs=1e-3), (section, method, metric)
    shutil.rmtree(converted)
    assert evaluate("clip") == reports["clip"]


@pytest.mark.parametrize("name", ["xclip-tiny-openai", "xclip-tiny-custom"])  # pooled at argmax, at the EOT id
def test_special_strings_in_captions_are_text(checkpoints, name):
    """open_clip's tokenizer matches <start_of_text>/<end_of_text> in the text (any case) before anything else:
    a caption spelling one is still read as its characters, not cut at a second EOT."""
    adapter = load(checkpoints, name)
    for caption in ("<end_of_text> a red circle", "a <START_OF_TEXT> red circle <end_of_text>", "<|endoftext|> a dog"):
        assert_read_as_text(adapter, caption)
    assert adapter._tokenizer.encode("<end_of_text>") == [adapter.eos_token_id]  # open_clip's own tokenizer is left alone


def test_a_tokenizer_whose_pattern_is_not_known_refuses_special_strings(checkpoints):
    """Where xclip cannot take the special tokens out of the tokenizer's pattern, it refuses such a caption."""
    import copy

    import regex

    adapter = load(checkpoints, "xclip-tiny-openai")
    adapter._tokenizer = copy.copy(adapter._tokenizer)
    adapter._tokenizer.pat = regex.compile(r"<end_of_text>|[\p{L}]+|[^\s\p{L}\p{N}]+", regex.IGNORECASE)
    with pytest.raises(xclip.InputError, match=r"the caption holds '<end_of_text>', a special token of the tokenizer"):
        adapter.tokenize(["a dog <END_OF_TEXT>"])
    assert adapter.tokenize(["a dog"]).n_positions == [4]


@pytest.mark.parametrize("damage", ["pickled", "truncated"])
def test_an_open_clip_folder_with_bad_weights_names_the_file(checkpoints, tmp_path, damage):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": CONFIGS["xclip-tiny-openai"]}))
    if damage == "pickled":
        weights = folder / "open_clip_pytorch_model.bin"
        state = torch.load(checkpoints["xclip-tiny-openai.pt"], weights_only=True)
        torch.save({"state_dict": state, "extra": np.random.default_rng(0)}, weights)  # not a tensor
        message = rf"cannot load {re.escape(str(weights))}: it holds pickled objects that are not tensors"
    else:
        weights = folder / "open_clip_model.safetensors"
        weights.write_bytes(checkpoints["xclip-tiny-openai"].read_bytes()[:1000])
        message = rf"cannot load model '{re.escape(str(folder))}': {re.escape(str(weights))} is not a readable safetensors file"
    make_images(1)[0].save(tmp_path / "photo.png")
    output = expect(["explain", tmp_path / "photo.png", "a red dog", "--model", folder], 1, message)
    assert "None" not in output and "weights_only=False" not in output


@pytest.mark.parametrize("resize", ["native", "crop", "pad", "squash"])
def test_open_clip_patches_lie_where_the_geometry_says_for_every_resize(checkpoints, resize):

    model = xclip.load_model("open_clip:xclip-tiny-openai", checkpoint=checkpoints["xclip-tiny-openai"], device="cpu",
                             image_resize=resize)
    for size in [(150, 90), (90, 150)]:
        assert_patches_where_the_processor_put_them(model, size)
