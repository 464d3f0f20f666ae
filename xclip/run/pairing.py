"""Which (caption, image) pairs a run attributes: the pairing mode, ``data.limit``, and this shard's block."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from xclip.disk.archives import ArchiveMembers
from xclip.models.base import DualEncoderAdapter
from xclip.config import RunConfig
from xclip.run.data import Dataset
from xclip.errors import XclipError
from xclip.run.identity import RunIdentity
from xclip.run.shards import contiguous_block


def pairs_to_attribute(
    config: RunConfig,
    dataset: Dataset,
    model: DualEncoderAdapter,
    identity: RunIdentity,
    on_ranking: Callable[[int, int], None],
) -> np.ndarray:
    """All shards' pairs: those of ``pairing.mode``, the first ``data.limit`` of them (of a webdataset or parquet
    input, read by whole files: this shard's files' pairs, the first ``data.limit`` of them).

    ``all`` of 5,000 x 25,000 is 2 GB as one integer array, where Python tuples would take ten times that. A
    top-k ranking is computed once per run and shared by its shards through a file in ``output.directory``.

    Args:
        on_ranking: called with (images embedded, images) while the top-k ranking embeds the images.

    Returns:
        ``(P, 2)`` int64 (caption index, image index) rows into ``dataset``.
    """
    mode = config.pairing.mode
    n_captions, n_images = len(dataset.captions), len(dataset.images)
    if mode == "given":
        pairs = np.asarray(dataset.given_pairs, dtype=np.int64).reshape(-1, 2)
    elif mode == "all":
        pairs = np.stack(np.divmod(np.arange(n_captions * n_images, dtype=np.int64), n_images), axis=1)
    else:
        pairs = _top_k(config, dataset, model, _ranking_path(config, identity), on_ranking)
    return pairs[: config.data.limit]


def shard_dataset(dataset: Dataset, pairs: np.ndarray, config: RunConfig) -> Dataset:
    """This shard's contiguous block of ``pairs``, with just the captions and images they use (with
    ``data.limit`` or ``topk``, inputs without a pair are never attributed). A webdataset or parquet input was
    split by whole files as it was read: its shard's pairs are all its own.

    Returns:
        A dataset whose ``given_pairs`` index its own captions and images.
    """
    is_split_by_file = dataset.shard_files is not None  # its pairs are this shard's already
    index, n_shards = (0, 1) if is_split_by_file else (config.runtime.shard_index, config.runtime.num_shards)
    block = pairs[contiguous_block(len(pairs), index, n_shards)]
    captions, caption_rows = np.unique(block[:, 0], return_inverse=True)
    images, image_rows = np.unique(block[:, 1], return_inverse=True)
    return Dataset(
        captions=[dataset.captions[c] for c in captions],
        images=[dataset.images[i] for i in images],
        given_pairs=np.stack([caption_rows, image_rows], axis=1),
        rejected=dataset.rejected,
        shard_files=dataset.shard_files,
    )


def _top_k(
    config: RunConfig,
    dataset: Dataset,
    model: DualEncoderAdapter,
    shared: Path,
    on_ranking: Callable[[int, int], None],
) -> np.ndarray:
    """Each image with its k best captions by the model's own score (plain embeddings, cheap), read from the
    ranking file ``shared`` when another shard wrote it."""
    if shared.is_file():
        return np.load(shared)
    scores = _similarities(model, dataset, config.runtime.batch_size, on_ranking)
    n_images = len(dataset.images)
    k = min(config.pairing.k, len(dataset.captions))
    best = torch.topk(scores, k, dim=0).indices.cpu().numpy()  # (k, n_images)
    pairs = np.stack([best.reshape(-1), np.tile(np.arange(n_images), k)], axis=1).astype(np.int64)
    pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]  # caption-major, as the other modes
    shared.parent.mkdir(parents=True, exist_ok=True)
    partial = shared.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(partial, pairs)
    partial.replace(shared)  # atomic: shards that rank at the same time write the same array
    return pairs


def _ranking_path(config: RunConfig, identity: RunIdentity) -> Path:
    """Where the shards of one run share their top-k ranking: named by everything the ranking depends on (a
    shard of a webdataset or parquet input ranks its own files' inputs, which its shard data digest names)."""
    fingerprint = json.loads(config.result_fingerprint())
    fingerprint["runtime"].pop("shard_index")
    key = json.dumps([fingerprint, identity.data_digest, identity.shard_data_digest, identity.weights_digest], sort_keys=True)
    return config.output.directory / f".topk-ranking-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npy"


@torch.no_grad()
def _similarities(
    model: DualEncoderAdapter, dataset: Dataset, batch_size: int, on_ranking: Callable[[int, int], None]
) -> torch.Tensor:
    """``(n_captions, n_images)`` cosine similarities, embedded in batches on the model's device; unreadable
    images score -inf (the image stage records why)."""
    text = [
        model.embed_text(model.tokenize(dataset.captions[start : start + batch_size])).float()
        for start in range(0, len(dataset.captions), batch_size)
    ]
    image = []
    with ArchiveMembers() as archives:  # images inside tar or parquet files: each archive indexed once
        for start in range(0, len(dataset.images), batch_size):
            paths = dataset.images[start : start + batch_size]
            try:
                image.append(model.embed_image(model.preprocess([archives.image(p) for p in paths]).pixel_values).float())
            except (XclipError, ValueError, OSError):  # a bad image in the batch: embed its images one by one
                for path in paths:
                    try:
                        image.append(model.embed_image(model.preprocess([archives.image(path)]).pixel_values).float())
                    except (XclipError, ValueError, OSError):
                        image.append(torch.full_like(text[0][:1], float("nan")))
            on_ranking(min(start + batch_size, len(dataset.images)), len(dataset.images))
    scores = torch.cat(text) @ torch.cat(image).T
    return scores.nan_to_num(nan=float("-inf"))
