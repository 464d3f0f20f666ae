"""Train the demo model: a small CLIP that must bind colour to shape in the synthetic world of xclip.analysis.synthetic.

    python scripts/train_demo.py [--steps 6000] [--batch-size 128] [--seed 0] [--out xclip/models/shapes-clip]

The second shipped model, xclip/models/shapes-clip-no-star (``xclip:demo-no-star``), is the demo fine-tuned on a
world without stars (its training.json holds the exact command and its held-out figures):

    python scripts/train_demo.py --init xclip/models/shapes-clip --without-shape star --steps 2000 --lr 1e-3 --seed 1 \
        --pool 8000 --out xclip/models/shapes-clip-no-star --threads 1

The defaults reproduce the shipped model: 2 text blocks (the first one's attention fixed to each word and the
word before it) and 1 image block of width 128, so that the default cut sees local features on both sides.

Contrastive (symmetric InfoNCE) training on freshly captioned scenes, with two hard negatives per image added to
the text side: the caption with colours swapped between objects, and the caption naming one object the scene
lacks. Deterministic for a seed on one device; runs on CPU in under half an hour, or on a GPU when one is
available. Prints held-out retrieval and binding accuracy.

``--init MODEL_DIR`` fine-tunes a saved model (its weights and processor) instead of building one: the first text
block's fixed attention is not re-initialised but stays frozen, and the script asserts after training that the
frozen parameters (and the position subspace of the token embeddings) are bitwise those it started from.
``--without-shape SHAPE`` trains on a world that never holds SHAPE: the pool's scenes draw their objects from the
other shapes (the same object counts, colours and layouts otherwise), and no caption or negative names it. The
held-out evaluation still covers every shape, and then also prints its figures split by whether the caption names
the removed shape.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from xclip.analysis.synthetic import (
    SHAPES,
    VOCABULARY,
    Scene,
    describe,
    draw_scene,
    generate,
    hard_negative,
    replacement_negative,
)

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE, PATCH = 64, 8
MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's normalisation, also written to the processor config
STD = (0.26862954, 0.26130258, 0.27577711)


def build(seed: int, n_layers: int, width: int, n_vision_layers: int):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, PreTrainedTokenizerFast

    specials = ["<pad>", "<|startoftext|>", "<unk>", "<|endoftext|>"]  # EOS id 3: HF's legacy EOS rule needs != 2
    vocab = {token: i for i, token in enumerate(specials + VOCABULARY)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 1), ("<|endoftext|>", 3)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<pad>",
        unk_token="<unk>", model_max_length=32,
    )
    text = {"vocab_size": len(vocab), "hidden_size": width, "intermediate_size": 4 * width, "num_hidden_layers": n_layers,
            "num_attention_heads": 4, "max_position_embeddings": 32, "pad_token_id": 0, "bos_token_id": 1,
            "eos_token_id": 3}
    vision = {"hidden_size": width, "intermediate_size": 4 * width, "num_hidden_layers": n_vision_layers,
              "num_attention_heads": 4,
              "image_size": IMAGE_SIZE, "patch_size": PATCH}
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=width))
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(MEAN), image_std=list(STD),
    )
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def bind_neighbouring_words(model, strength: float = 3.0, gain: float = 2.0) -> None:  # type: ignore[no-untyped-def]
    """Fix the first text block's attention to read only each word itself (first half of the heads) and the word
    before it (second half): position embeddings are frozen one-hot vectors in a subspace that token embeddings never
    enter, and the query and key maps read only that subspace. Colour and shape meet at the shape word, and no
    position below the last block summarises the caption, so the default cut sees one word and its neighbour."""
    text = model.text_model
    positions, n_heads = text.config.max_position_embeddings, text.config.num_attention_heads
    head_dim = text.config.hidden_size // n_heads
    assert head_dim == positions, "each head reads the one-hot positions: head width must equal their number"
    tokens, attention = text.embeddings.token_embedding.weight, text.encoder.layers[0].self_attn
    with torch.no_grad():
        text.embeddings.position_embedding.weight.copy_(torch.eye(positions, text.config.hidden_size) * strength)
        tokens[:, :positions] = 0
        for projection in (attention.q_proj, attention.k_proj):
            projection.weight.zero_()
            projection.bias.zero_()
        for head in range(n_heads):
            rows = slice(head * head_dim, (head + 1) * head_dim)
            attention.q_proj.weight[rows, :positions] = torch.eye(positions) * gain
            shift = 0 if head < n_heads // 2 else 1  # key of position j answers the query of position j + shift
            attention.k_proj.weight[rows, :positions] = torch.eye(positions).roll(shift, dims=0).tril() * gain
    freeze_neighbouring_words(model)


def freeze_neighbouring_words(model) -> None:  # type: ignore[no-untyped-def]
    """Keep the fixed first-block attention of :func:`bind_neighbouring_words` fixed through training: the position
    embeddings, the first block's query and key maps and the layer norm before them take no gradient, nor does the
    position subspace of the token embeddings (zero, and kept zero: AdamW's decay of zero is zero)."""
    text = model.text_model
    positions = text.config.max_position_embeddings
    tokens, attention = text.embeddings.token_embedding.weight, text.encoder.layers[0].self_attn
    tokens.register_hook(lambda grad: torch.cat([torch.zeros_like(grad[:, :positions]), grad[:, positions:]], 1))
    for frozen in (text.embeddings.position_embedding, attention.q_proj, attention.k_proj, text.encoder.layers[0].layer_norm1):
        frozen.requires_grad_(False)


def frozen_state(model) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """Copies of what :func:`freeze_neighbouring_words` keeps fixed: every parameter that takes no gradient, and
    the position subspace of the token embeddings."""
    state = {name: p.detach().cpu().clone() for name, p in model.named_parameters() if not p.requires_grad}
    text = model.text_model
    positions = text.config.max_position_embeddings
    state["token_embedding[:, :positions]"] = text.embeddings.token_embedding.weight[:, :positions].detach().cpu().clone()
    return state


def replacement_negative_without(rng: np.random.Generator, scene: Scene, shape: str | None) -> str:
    """A replacement negative that does not name ``shape`` (in a scene without it, only a shape replacement can
    name it): drawn again until it does not. With no shape, the first one drawn."""
    while True:
        negative = replacement_negative(rng, scene)
        if shape not in negative.split():
            return negative


def pixels(images: list) -> torch.Tensor:  # type: ignore[type-arg]
    """Scenes are already IMAGE_SIZE square: the processor's resize and crop leave them as they are."""
    array = torch.from_numpy(np.stack([np.asarray(image) for image in images])).float() / 255
    return ((array - torch.tensor(MEAN)) / torch.tensor(STD)).permute(0, 3, 1, 2).contiguous()


def similarities(model, processor, scenes, captions) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        tokens = processor.tokenizer(captions, padding=True, return_tensors="pt")
        text = F.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)
        image = F.normalize(model.get_image_features(pixel_values=pixels([s.image for s in scenes])).pooler_output, dim=-1)
    return text @ image.T


def evaluate(model, processor, seed: int, n: int = 500, shape: str | None = None) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Held-out retrieval accuracy (R@1 among n scenes) both ways, and binding accuracy: the true caption scores
    above its hard negative. Held-out scenes come from seeds the training pool never used.

    With ``shape``, the same three figures also restricted to the captions that name it and to the rest
    (``naming_star_binding_accuracy``, ``not_naming_star_...``, with their counts): retrieval still ranks among
    all n scenes; image -> text counts a scene where its own caption is."""
    scenes = generate(n, seed=seed, size=IMAGE_SIZE)
    rng = np.random.default_rng(seed)
    scores = similarities(model, processor, scenes, [s.caption for s in scenes])
    negatives = similarities(model, processor, scenes, [hard_negative(rng, s) for s in scenes]).diagonal()
    truth = torch.arange(n)
    hits = {
        "text_to_image_r1": scores.argmax(1) == truth,
        "image_to_text_r1": scores.argmax(0) == truth,
        "binding_accuracy": scores.diagonal() > negatives,
    }
    report = {name: float(hit.float().mean()) for name, hit in hits.items()}
    if shape is not None:
        names = torch.tensor([any(p.shape == shape for p in s.phrases) for s in scenes])
        for label, members in ((f"naming_{shape}", names), (f"not_naming_{shape}", ~names)):
            report[f"{label}_captions"] = int(members.sum())
            report.update({f"{label}_{name}": float(hit[members].float().mean()) for name, hit in hits.items()})
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--layers", type=int, default=2, help="blocks of the text tower")
    parser.add_argument("--width", type=int, default=128,
                        help="with --bind-neighbouring-words, 4 heads of width 32 (one per position) need 128")
    parser.add_argument("--vision-layers", type=int, default=1,
                        help="blocks of the image tower: one keeps the default cut on local patch embeddings")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--replacement-negatives", action=argparse.BooleanOptionalAction, default=True,
                        help="a second hard negative per image naming one object the scene lacks")
    parser.add_argument("--bind-neighbouring-words", action=argparse.BooleanOptionalAction, default=True,
                        help="fix the first text block's attention to each word and the one before it")
    parser.add_argument("--pool", type=int, default=30000, help="scenes drawn once; captions are drawn anew")
    parser.add_argument("--out", type=Path, default=ROOT / "xclip" / "models" / "shapes-clip")
    parser.add_argument("--evaluate", type=Path, metavar="MODEL_DIR",
                        help="only print the held-out retrieval and binding accuracy of a saved model")
    parser.add_argument("--init", type=Path, metavar="MODEL_DIR",
                        help="fine-tune a saved model (weights and processor) instead of building one; --layers, "
                             "--width and --vision-layers are then its own, and with --bind-neighbouring-words its "
                             "fixed first-block attention is kept frozen rather than set anew")
    parser.add_argument("--without-shape", choices=SHAPES, metavar="SHAPE",
                        help=f"train on a world that never holds SHAPE ({', '.join(SHAPES)}): no pool scene draws it "
                             "and no caption or negative names it; the held-out figures are also split by it")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads torch uses")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.evaluate:
        import xclip

        adapter = xclip.load_model(args.evaluate, device="cpu")
        report = evaluate(adapter.model, adapter.processor, seed=10_000 + args.seed, n=1000, shape=args.without_shape)
        print(json.dumps(report))
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.init:
        from transformers import AutoProcessor, CLIPModel

        model, processor = CLIPModel.from_pretrained(args.init), AutoProcessor.from_pretrained(args.init)
        args.layers, args.width = model.config.text_config.num_hidden_layers, model.config.text_config.hidden_size
        args.vision_layers = model.config.vision_config.num_hidden_layers
        if args.bind_neighbouring_words:
            freeze_neighbouring_words(model)  # the init's fixed attention, as it is
    else:
        model, processor = build(args.seed, args.layers, args.width, args.vision_layers)
        if args.bind_neighbouring_words:
            bind_neighbouring_words(model)
    frozen = frozen_state(model) if args.bind_neighbouring_words else {}
    model.to(device).train()
    rng = np.random.default_rng(args.seed)
    shapes = [shape for shape in SHAPES if shape != args.without_shape]  # every shape without --without-shape
    pool = [draw_scene(rng, IMAGE_SIZE, shapes=shapes) for _ in range(args.pool)]
    pool_pixels = pixels([s.image for s in pool])
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05, betas=(0.9, 0.98))
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, args.steps) / args.steps))
    )
    start = time.perf_counter()
    for step in range(args.steps):
        index = rng.choice(len(pool), size=args.batch_size, replace=False)
        scenes = [describe(rng, pool[i]) for i in index]
        captions = [s.caption for s in scenes] + [hard_negative(rng, s) for s in scenes]
        if args.replacement_negatives:
            captions += [replacement_negative_without(rng, s, args.without_shape) for s in scenes]
        if args.without_shape:
            assert not any(args.without_shape in caption.split() for caption in captions), "a caption names it"
        tokens = processor.tokenizer(captions, padding=True, return_tensors="pt").to(device)
        text = F.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)
        image = F.normalize(model.get_image_features(pixel_values=pool_pixels[index].to(device)).pooler_output, dim=-1)
        scale = model.logit_scale.clamp(max=math.log(100)).exp()
        logits = scale * image @ text.T  # (B, 2B or 3B): each image against true captions and hard negatives
        target = torch.arange(args.batch_size, device=device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, : args.batch_size].T, target)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 200 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  scale {scale.item():.1f}  {time.perf_counter() - start:.0f}s",
                  flush=True)
    model.eval().cpu()
    after = frozen_state(model) if args.bind_neighbouring_words else {}
    for name, before in frozen.items():  # what training must not touch, bitwise
        assert torch.equal(before, after[name]), f"{name}, frozen, changed in training"
    report = evaluate(model, processor, seed=10_000 + args.seed, n=1000, shape=args.without_shape)
    print(json.dumps({k: v for k, v in report.items() if k in ("text_to_image_r1", "image_to_text_r1", "binding_accuracy")}))
    if args.without_shape:
        print(json.dumps({k: v for k, v in report.items() if "naming_" in k}))
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    with tempfile.TemporaryDirectory() as temporary:
        processor.save_pretrained(temporary)
        for name in os.listdir(temporary):  # a fine-tuned model's processor is the init's: ship its files as they were
            source = args.init / name if args.init and (args.init / name).is_file() else Path(temporary) / name
            shutil.copyfile(source, args.out / name)
    record = {**vars(args), "out": str(args.out.name), "init": args.init.name if args.init else None, **report}
    (args.out / "training.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
