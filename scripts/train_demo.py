"""Train the demo model: a small CLIP that must bind colour to shape in the synthetic world of xclip.synthetic.

    python scripts/train_demo.py [--steps 6000] [--batch-size 128] [--seed 0] [--out xclip/models/shapes-clip]

The defaults reproduce the shipped model: 2 text blocks (the first one's attention fixed to each word and the
word before it) and 1 image block of width 128, so that the default cut sees local features on both sides.

Contrastive (symmetric InfoNCE) training on freshly captioned scenes, with two hard negatives per image added to
the text side: the caption with colours swapped between objects, and the caption naming one object the scene
lacks. Deterministic for a seed on one device; runs on CPU in under half an hour, or on a GPU when one is
available. Prints held-out retrieval and binding accuracy.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from xclip.synthetic import VOCABULARY, describe, draw_scene, generate, hard_negative, replacement_negative

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
    tokens.register_hook(lambda grad: torch.cat([torch.zeros_like(grad[:, :positions]), grad[:, positions:]], 1))
    for frozen in (text.embeddings.position_embedding, attention.q_proj, attention.k_proj, text.encoder.layers[0].layer_norm1):
        frozen.requires_grad_(False)


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


def evaluate(model, processor, seed: int, n: int = 500) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Held-out retrieval accuracy (R@1 among n scenes) both ways, and binding accuracy: the true caption scores
    above its hard negative. Held-out scenes come from seeds the training pool never used."""
    scenes = generate(n, seed=seed, size=IMAGE_SIZE)
    rng = np.random.default_rng(seed)
    scores = similarities(model, processor, scenes, [s.caption for s in scenes])
    negatives = similarities(model, processor, scenes, [hard_negative(rng, s) for s in scenes]).diagonal()
    truth = torch.arange(n)
    return {
        "text_to_image_r1": float((scores.argmax(1) == truth).float().mean()),
        "image_to_text_r1": float((scores.argmax(0) == truth).float().mean()),
        "binding_accuracy": float((scores.diagonal() > negatives).float().mean()),
    }


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
    args = parser.parse_args()
    if args.evaluate:
        import xclip

        adapter = xclip.load_model(args.evaluate, device="cpu")
        print(json.dumps(evaluate(adapter.model, adapter.processor, seed=10_000 + args.seed, n=1000)))
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, processor = build(args.seed, args.layers, args.width, args.vision_layers)
    if args.bind_neighbouring_words:
        bind_neighbouring_words(model)
    model.to(device).train()
    rng = np.random.default_rng(args.seed)
    pool = [draw_scene(rng, IMAGE_SIZE) for _ in range(args.pool)]
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
            captions += [replacement_negative(rng, s) for s in scenes]
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
    report = evaluate(model, processor, seed=10_000 + args.seed, n=1000)
    print(json.dumps(report))
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    (args.out / "training.json").write_text(json.dumps({**vars(args), "out": str(args.out.name), **report}, indent=2))


if __name__ == "__main__":
    main()
