"""Benchmark the attribution engine against plain embedding and the naive (reference-code-like) algorithm.

Builds a randomly initialised model of a real architecture (the cost of one quadrature node does not depend on
the weights), or loads the shipped demo model with held-out scenes of its synthetic world (``demo``: trained
weights, so the honest case for how many nodes the adaptive quadrature needs), then prints one JSON object:
throughput of plain embedding and of contributions at the default tolerance, the nodes each caption and image
took, pair maps per second, peak memory, completeness errors, the per-pair speed-up over the naive algorithm,
and how time scales with caption length, patch count and the number of quadrature steps.

    python scripts/bench.py --architecture vit-b-32 --device cpu
    python scripts/bench.py --architecture demo --device cpu
    python scripts/bench.py --architecture vit-b-16 --device cuda --dtype bfloat16 --batch-size 64
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the naive implementation lives there

from naive import integrated_jacobian, naive_interactions  # noqa: E402
from convergence import DEMO_MODEL  # noqa: E402  the script beside this one

import xclip  # noqa: E402
from xclip.models.base import ImageBatch, TextBatch  # noqa: E402
from xclip.core.quadrature import DEFAULT_TOLERANCE, quadrature  # noqa: E402
from xclip.core.transformer import Positions  # noqa: E402
from xclip.core.geometry import Preprocessing  # noqa: E402
from xclip.models.random_models import ARCHITECTURES, build_random_model  # noqa: E402
from xclip.analysis.synthetic import generate  # noqa: E402
from xclip.attribution.summary import summarise_maps  # noqa: E402

DEMO_SCENE_SEED = 20000  # held out: the demo model trained on seeds below 10000

WORDS = "a photo of the red dog and two blue cat on green square next to circle with".split()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Best (least) seconds of ``repeats`` calls after one warm-up call: on a shared machine the fastest run
    is the one least disturbed by others."""
    fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def caption(n_words: int, offset: int = 0) -> str:
    return " ".join(WORDS[(i + offset) % len(WORDS)] for i in range(n_words))


def input_side(model: xclip.DualEncoderAdapter) -> int:
    """The model's input image side, as its own preprocessing gives it."""
    return int(model.preprocess([Image.new("RGB", (8, 8))]).pixel_values.shape[-1])


def image_batch(model: xclip.DualEncoderAdapter, n: int, seed: int = 0) -> ImageBatch:
    side = input_side(model)
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, 3, side, side, generator=generator)
    geometry = Preprocessing((side, side), (0.0, 0.0, float(side), float(side)), (side, side), model.patch_grid)
    return ImageBatch(pixel_values=pixels.to(model.device, model.dtype), geometry=[geometry] * n, images=[])


def load(family: str, architecture: str, device: str, dtype: str, image_size: int | None = None):
    if architecture == "demo":
        return xclip.load_model(DEMO_MODEL, device=device, dtype=dtype)
    if family == "open_clip":
        return load_open_clip(architecture, device, dtype)
    hf_model, processor = build_random_model(family, architecture, seed=0, image_size=image_size)
    adapter_cls = xclip.get_adapter_cls(family)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}[dtype]
    return adapter_cls(hf_model.to(device, torch_dtype), processor, name=f"random {architecture}")


def load_open_clip(architecture: str, device: str, dtype: str) -> xclip.DualEncoderAdapter:
    """A randomly initialised open_clip model of a named architecture (``ViT-B-16``, or a config file), loaded
    through xclip's public path from a weights file."""
    import atexit
    import shutil
    import tempfile

    import open_clip

    if architecture.endswith(".json"):  # a model config of your own (open_clip's format), named by its file
        open_clip.add_model_config(architecture)
        architecture = Path(architecture).stem
    if architecture not in open_clip.list_models():
        sys.exit(f"unknown open_clip architecture {architecture!r} (open_clip.list_models())")
    folder = Path(tempfile.mkdtemp(prefix="xclip-bench-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    torch.manual_seed(0)
    save_weights(open_clip.create_model(architecture), folder / "weights.safetensors")
    return xclip.load_model(f"open_clip:{architecture}", checkpoint=folder / "weights.safetensors", device=device, dtype=dtype)


def save_weights(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({name: value.contiguous() for name, value in model.state_dict().items()}, path)


def plain_embedders(model: xclip.DualEncoderAdapter, caption_texts: list[str], images: ImageBatch) -> tuple[Callable[[], object], Callable[[], object]]:
    """The model's own image and text embedding, without attribution (open_clip's encoders take its full
    context of tokens)."""
    if model.family == "open_clip":
        ids = model.tokenize(caption_texts).input_ids  # padded with zeros to the full context, as open_clip pads
        tokens = torch.nn.functional.pad(ids, (0, model.max_text_positions - ids.shape[1]))
        return (lambda: model.model.encode_image(images.pixel_values)), (lambda: model.model.encode_text(tokens))
    captions = model.tokenize(caption_texts)
    return (lambda: model.model.get_image_features(pixel_values=images.pixel_values)), \
        (lambda: model.model.get_text_features(input_ids=captions.input_ids))


def inputs(model, architecture: str, n: int, caption_words: int) -> tuple[list[str], ImageBatch]:
    """Captions and images: demo scenes and their captions, or varied word sequences of one length and Gaussian
    pixels for random weights."""
    if architecture == "demo":
        scenes = generate(n, seed=DEMO_SCENE_SEED)
        return [scene.caption for scene in scenes], model.preprocess([scene.image for scene in scenes])
    return [caption(caption_words, offset=b) for b in range(n)], image_batch(model, n)


def first(images: ImageBatch) -> ImageBatch:
    return ImageBatch(images.pixel_values[:1], images.geometry[:1], images.images[:1])


def quadrature_settings(args: argparse.Namespace) -> dict[str, object]:
    if args.n_steps is not None:
        return {"n_steps": args.n_steps}
    return {"tolerance": args.tolerance}


def naive_pair_seconds(model, text: TextBatch, images: ImageBatch, n_steps: int) -> tuple[float, float]:
    """Seconds for one pair by the naive algorithm (default layers, the paper's code's right Riemann rule),
    and the sum of its map."""
    attributor = xclip.InteractionAttribution(model, n_steps=n_steps, rule="riemann-right")
    alphas, weights = quadrature("riemann-right", n_steps)
    start = time.perf_counter()
    layer = attributor.text_layer
    t_hidden = model.text_hidden(text.input_ids, text.positions, layer)
    t_ref = model.text_hidden(model.text_reference_ids(text), text.positions, layer)
    i_hidden = model.image_hidden(images.pixel_values, attributor.image_layer)
    i_ref = model.image_hidden(model.image_reference_pixels(images), attributor.image_layer)
    i_pos = Positions(pooled_index=model.image_pooled_index(1))
    j_text = integrated_jacobian(model.text_upper(layer), t_hidden, t_ref, text.positions, alphas, weights)
    j_image = integrated_jacobian(model.image_upper(attributor.image_layer), i_hidden, i_ref, i_pos, alphas, weights)
    interactions = naive_interactions(j_text, (t_hidden - t_ref)[0], j_image, (i_hidden - i_ref)[0])
    seconds = time.perf_counter() - start
    return seconds, float(interactions.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="clip", choices=["clip", "siglip", "open_clip"])
    parser.add_argument("--architecture", default="vit-b-32",
                        help=f"{', '.join(ARCHITECTURES)} or demo; for --family open_clip an open_clip architecture "
                             "(ViT-B-16) or a model config file")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="relative completeness tolerance")
    parser.add_argument("--n-steps", type=int, help="a fixed rule of N nodes instead of the adaptive one")
    parser.add_argument("--panel-layout", default="auto", help="auto (the model's calibrated layout, if any), default, or a layout file")
    parser.add_argument("--naive-steps", type=int, default=10, help="nodes of the naive algorithm (the paper's N)")
    parser.add_argument("--internal-batch-size", type=int, default=64)
    parser.add_argument("--caption-words", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-naive", action="store_true", help="skip the (slow) naive algorithm")
    parser.add_argument("--no-scaling", action="store_true", help="skip the scaling sweeps")
    parser.add_argument("--end-to-end", type=int, default=64, metavar="N",
                        help="also run `xclip attribute` on N image files and N captions (0: skip)")
    parser.add_argument("--num-workers", type=int, default=2, help="image-decoding workers of the end-to-end run")
    parser.add_argument("--evaluation-pairs", type=int, default=16,
                        help="pairs of the end-to-end run scored by `xclip evaluate --baselines all` (its cost per pair)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    if args.family != "open_clip" and args.architecture not in (*ARCHITECTURES, "demo"):
        parser.error(f"--architecture must be one of {', '.join(ARCHITECTURES)} or demo for --family {args.family}")

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = load(args.family, args.architecture, args.device, args.dtype)
    attributor = xclip.InteractionAttribution(
        model, **quadrature_settings(args), internal_batch_size=args.internal_batch_size, panel_layout=args.panel_layout
    )
    n = args.batch_size
    caption_texts, images = inputs(model, args.architecture, n, args.caption_words)
    captions = model.tokenize(caption_texts)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    embed_images, embed_texts = plain_embedders(model, caption_texts, images)
    with torch.no_grad():  # plain inference: the model's own forward pass (padding masks do not change its cost)
        plain_image_s = timed(embed_images, device, args.repeats)
        plain_text_s = timed(embed_texts, device, args.repeats)
    image_s = timed(lambda: attributor.image_batch_contributions(images), device, args.repeats)
    text_s = timed(lambda: attributor.text_batch_contributions(captions), device, args.repeats)
    text_contributions = attributor.text_batch_contributions(captions)
    image_contributions = attributor.image_batch_contributions(images)
    # pair maps from stored contributions: 8x more captions than the batch, so the map stage dominates
    many_captions = text_contributions * 8
    pairs = [(t, i) for t in range(len(many_captions)) for i in range(len(image_contributions))]
    maps_s = timed(lambda: xclip.interaction_maps(many_captions, image_contributions, pairs), device, args.repeats)
    numbers_s = timed(lambda: xclip.pair_numbers(many_captions, image_contributions, pairs), device, args.repeats)
    maps = xclip.interaction_maps(many_captions, image_contributions, pairs)

    def summaries() -> object:  # what a summary run (output.contributions: none) computes of each pair
        stacked = torch.nn.utils.rnn.pad_sequence([m.interactions for m in xclip.interaction_maps(many_captions, image_contributions, pairs)], batch_first=True)
        return summarise_maps(stacked, [m.interactions.shape[0] for m in maps], model.patch_grid, model.n_image_prefix, top_cells=16, top_patches=5)

    summaries_s = timed(summaries, device, args.repeats)
    relative = [m.relative_completeness_error for m in maps]
    single_caption = model.tokenize(caption_texts[:1])
    single_image = first(images)

    def one_pair() -> xclip.InteractionMap:
        (text,) = attributor.text_batch_contributions(single_caption)
        (image,) = attributor.image_batch_contributions(single_image)
        return xclip.interaction_map(text, image)

    pair_s = timed(one_pair, device, args.repeats)

    report: dict[str, object] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "family": model.family,
        "architecture": args.architecture,
        "dtype": args.dtype,
        "batch_size": n,
        "quadrature": f"fixed, {args.n_steps} nodes" if args.n_steps else f"adaptive, tolerance {args.tolerance:g}",
        "panel_layout": None if args.n_steps else "calibrated" if attributor.panel_layout.is_calibrated else "default",
        "caption_tokens": max(captions.n_positions),
        "image_positions": int(image_contributions[0].values.shape[0]),
        "text_positions": model.max_text_positions,  # the stored arrays' sizes (scripts/plan.py reads them)
        "embedding_dim": model.embedding_dim,
        "plain_images_per_s": n / plain_image_s,
        "plain_captions_per_s": n / plain_text_s,
        "images_per_s": n / image_s,
        "captions_per_s": n / text_s,
        "image_ratio_to_plain": plain_image_s / image_s,
        "caption_ratio_to_plain": plain_text_s / text_s,
        **node_counts("caption", text_contributions),
        **node_counts("image", image_contributions),
        "pair_maps_per_s": len(pairs) / maps_s,
        "pair_numbers_per_s": len(pairs) / numbers_s,  # a pair's score and terms without its map
        "pair_summaries_per_s": len(pairs) / summaries_s,  # a pair's map, numbers and token summary (a summary run)
        "engine_seconds_per_pair_unbatched": pair_s,
        "completeness_error_relative_mean": sum(relative) / len(relative),
        "completeness_error_relative_max": max(relative),
    }
    if device.type == "cuda":
        report["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        report["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    if not args.no_naive:
        naive_s, _ = naive_pair_seconds(model, single_caption, single_image, args.naive_steps)
        report["naive_steps"] = args.naive_steps
        report["naive_seconds_per_pair"] = naive_s
        report["speedup_vs_naive_unbatched"] = naive_s / pair_s
        report["speedup_vs_naive_batched"] = naive_s / (image_s / n + text_s / n + maps_s / len(pairs))

    if args.end_to_end:
        report["end_to_end"] = end_to_end(model, attributor, args, caption_texts, image_s / n + text_s / n)

    if not args.no_scaling and args.architecture != "demo":
        if args.family != "open_clip":  # the sweeps rebuild random transformers models of other sizes
            report["scaling"] = scaling(model, args, device)
        report["memory_knob"] = memory_knob(model, args, device)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


def end_to_end(model, attributor, args, caption_texts: list[str], engine_seconds_per_input_pair: float) -> dict[str, float]:
    """`xclip attribute` on N image files and N captions (given pairs), against the engine alone on the same
    work: decoding and preprocessing, writing and committing are what the difference costs. The model is
    saved and loaded by the run; the run times its loading, which is left out."""
    import tempfile

    import numpy as np
    import yaml

    from xclip.config import load_config
    from xclip.run.runner import run

    n = args.end_to_end
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        if model.family == "open_clip":
            save_weights(model.model, root / "weights.safetensors")
            model_config = {"name": model.name, "checkpoint": "weights.safetensors"}
        else:
            model.model.save_pretrained(root / "model")
            model.processor.save_pretrained(root / "model")
            model_config = {"name": "model"}
        (root / "images").mkdir()
        rng = np.random.default_rng(0)
        side = input_side(model)
        if args.architecture == "demo":
            pictures = [scene.image for scene in generate(n, seed=DEMO_SCENE_SEED)]
            texts = [scene.caption for scene in generate(n, seed=DEMO_SCENE_SEED)]
        else:  # photo-sized files, so that decoding and resizing cost what they cost on real data
            pictures = [Image.fromarray((rng.random((480, 640, 3)) * 255).astype("uint8")) for _ in range(n)]
            texts = [caption(args.caption_words, offset=k) for k in range(n)]
        lines = []
        for k, (picture, text) in enumerate(zip(pictures, texts)):
            picture.save(root / "images" / f"{k:05d}.jpg", quality=90)
            lines.append(json.dumps({"file_name": f"{k:05d}.jpg", "text": text}))
        (root / "images" / "metadata.jsonl").write_text("\n".join(lines) + "\n")
        config = {
            "model": {**model_config, "device": args.device, "dtype": args.dtype},
            "attribution": {**quadrature_settings(args)},
            "data": {"format": "imagefolder", "root": "images", "metadata": "images/metadata.jsonl"},
            "output": {"directory": "run"},
            "runtime": {"batch_size": args.batch_size, "internal_batch_size": args.internal_batch_size, "num_workers": args.num_workers},
        }
        (root / "run.yaml").write_text(yaml.safe_dump(config))
        summary = run(load_config(root / "run.yaml"))
        seconds = summary.seconds - summary.model_load_seconds
        evaluation = evaluation_cost(root / "run", attributor, min(n, args.evaluation_pairs))
    engine_seconds = n * engine_seconds_per_input_pair  # N captions and N images, at the batch's engine speed
    return {
        "pairs": summary.n_done,
        "num_workers": args.num_workers,
        "image_side_on_disk": "demo scenes" if args.architecture == "demo" else "640x480 JPEG",
        "model_input_side": side,
        "seconds_without_model_load": seconds,
        "engine_seconds_same_work": engine_seconds,
        "pairs_per_s": summary.n_done / seconds,
        "ratio_to_engine": engine_seconds / seconds,
        **evaluation,
    }


def evaluation_cost(run_dir: Path, attributor, n_pairs: int) -> dict[str, object]:
    """Seconds per pair of `xclip evaluate --baselines` on the run (no annotations: insertion/deletion only),
    for the second-order maps alone and with every first-order method the family supports."""
    from xclip.analysis.baseline_evaluation import score_methods
    from xclip.analysis.baselines import check_methods

    costs: dict[str, object] = {"evaluation_pairs": n_pairs}
    for name, methods in (("second_order_only", []), ("all_baselines", ["all"])):
        start = time.perf_counter()
        score_methods(run_dir, methods, attribution=attributor, limit=n_pairs)
        costs[f"evaluation_seconds_per_pair_{name}"] = (time.perf_counter() - start) / n_pairs
    costs["evaluation_baselines"] = ", ".join(check_methods(["all"], attributor.model))
    return costs


def node_counts(kind: str, items: list[xclip.Contributions]) -> dict[str, float]:
    """Nodes the quadrature spent per input, and the inputs' relative completeness errors."""
    nodes = [item.n_nodes for item in items]
    relative = [item.relative_completeness_error for item in items]
    return {
        f"{kind}_nodes_mean": sum(nodes) / len(nodes),
        f"{kind}_nodes_max": max(nodes),
        # panel edges: plain forward passes of the layers above the cut, counted apart from the nodes
        f"{kind}_endpoints_mean": sum(item.n_endpoints for item in items) / len(items),
        f"{kind}_relative_error_max": max(relative),
        f"{kind}_map_error_bound_max": max(item.map_error_bound for item in items),
        f"{kind}_not_converged": sum(not item.is_converged for item in items),
    }


def scaling(model, args, device) -> dict[str, dict[str, float]]:
    """Seconds per input as caption length, quadrature steps and patch count grow, at a fixed rule (N = 10
    unless given) so that only the named size changes."""
    n = max(1, args.batch_size // 2)
    fixed = {"n_steps": args.n_steps or 10, "internal_batch_size": args.internal_batch_size}
    attributor = xclip.InteractionAttribution(model, **fixed)
    out: dict[str, dict[str, float]] = {"caption_seconds_by_tokens": {}, "image_seconds_by_steps": {}, "image_seconds_by_patches": {}}
    for words in (4, 16, 32, 64):
        batch = model.tokenize([caption(words)] * n)
        seconds = timed(lambda: attributor.text_batch_contributions(batch), device, 1)
        out["caption_seconds_by_tokens"][str(len(batch.tokens[0]))] = seconds / n
    images = image_batch(model, n)
    for n_steps in (2, 5, 10, 20):
        stepped = xclip.InteractionAttribution(model, n_steps=n_steps, internal_batch_size=args.internal_batch_size)
        out["image_seconds_by_steps"][str(n_steps)] = timed(lambda: stepped.image_batch_contributions(images), device, 1) / n
    base = model.model.config.vision_config
    for factor in (1, 2):
        size = base.image_size * factor
        resized = load(args.family, args.architecture, args.device, args.dtype, image_size=size)
        sized = xclip.InteractionAttribution(resized, **fixed)
        batch = image_batch(resized, n)
        patches = (size // base.patch_size) ** 2
        out["image_seconds_by_patches"][str(patches)] = timed(lambda: sized.image_batch_contributions(batch), device, 1) / n
    return out


def memory_knob(model, args, device) -> dict[str, dict[str, float]]:
    """Seconds per image and peak GPU memory as ``internal_batch_size`` grows (memory is CUDA-only)."""
    images = image_batch(model, args.batch_size)
    out: dict[str, dict[str, float]] = {}
    for size in (8, 16, 32, 64, 128, 256):
        attributor = xclip.InteractionAttribution(model, **quadrature_settings(args), internal_batch_size=size)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        seconds = timed(lambda: attributor.image_batch_contributions(images), device, 1) / args.batch_size
        row = {"image_seconds": seconds}
        if device.type == "cuda":
            row["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        out[str(size)] = row
    return out


if __name__ == "__main__":
    main()
