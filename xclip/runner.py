"""One batch attribution run: config in, HDF5 run directory out. No terminal code here: progress goes to a
callback, stopping is asked through ``should_stop``."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

import xclip
from xclip.adapters.base import DualEncoderAdapter, ImageBatch, read_image, text_problem
from xclip.attribution import InteractionAttribution, interaction_maps, pair_numbers
from xclip.config import ModelConfig, RunConfig, settings_differences
from xclip.data import Dataset, read_dataset
from xclip.errors import ConfigError, XclipError
from xclip.inspection import describe_accuracy, describe_failures
from xclip.loading import load_model
from xclip.result import PairNumbers
from xclip.store import (
    DONE,
    FAILED,
    PENDING,
    RUN_FILE,
    RunReader,
    RunWriter,
    create_run_file,
    writer_lock,
)

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class RunSummary:
    directory: Path
    n_pairs: int
    n_done: int = 0  # pairs finished by this invocation
    n_skipped: int = 0  # pairs already finished before it
    n_failed: int = 0  # pairs
    n_rejected: int = 0  # records of the data files that name no usable pair (see xclip.data)
    n_truncated: int = 0  # captions longer than the model's context, attributed as far as it reads them
    accuracy: dict[str, Any] = field(default_factory=dict)  # see xclip.inspection.describe_accuracy
    seconds: float = 0.0
    model_load_seconds: float = 0.0  # of ``seconds``: loading the checkpoint
    is_interrupted: bool = False
    failures: list[str] = field(default_factory=list)

    @property
    def pairs_per_second(self) -> float:
        return self.n_done / self.seconds if self.seconds else 0.0


def run(
    config: RunConfig,
    *,
    overwrite: bool = False,
    on_progress: Progress | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    command: str = "",
) -> RunSummary:
    """Attribute every pair of the configured data into ``config.output.directory / run.h5``.

    Rerunning on the same directory resumes: finished items are skipped, failed and pending ones retried.

    Raises:
        ConfigError: the directory holds a run made with other settings (pass ``overwrite=True``).
        StoreError: another live process is writing the directory (see :func:`xclip.store.writer_lock`).
    """
    start = time.perf_counter()
    progress = on_progress or (lambda stage, done, total: None)
    directory = config.run_directory
    with writer_lock(directory, command):  # before --overwrite deletes anything
        summary = _run_locked(config, overwrite=overwrite, progress=progress, should_stop=should_stop, command=command)
    summary.seconds = time.perf_counter() - start
    return summary


def _run_locked(
    config: RunConfig, *, overwrite: bool, progress: Progress, should_stop: Callable[[], bool], command: str
) -> RunSummary:
    directory = config.run_directory
    run_path = directory / RUN_FILE
    if overwrite and directory.exists():
        run_path.unlink(missing_ok=True)
        shutil.rmtree(directory / "heatmaps", ignore_errors=True)
    dataset = read_dataset(config.data)
    data_digest = dataset.digest(config.data.root)
    weights_digest = _weights_digest(config.model)  # hashes every weight file: once per run
    if run_path.exists():
        with RunReader(run_path) as stored:
            if stored.attrs["fingerprint"] != config.result_fingerprint():
                differences = "\n  ".join(settings_differences(stored.attrs["fingerprint"], config.result_fingerprint()))
                msg = f"{directory} holds a run made with other settings (stored -> now):\n  {differences}\nrerun with the stored settings to resume it, or pass --overwrite to replace it"
                raise ConfigError(msg)
            if stored.attrs.get("model_weights_sha256", "") != (weights_digest or ""):
                msg = f"{directory} was made with other weights at {config.model.name}; use --overwrite to replace it"
                raise ConfigError(msg)
            if stored.attrs["data_sha256"] != data_digest:
                msg = (
                    f"the data files changed since {directory} was made (their captions, image paths or pairs differ): "
                    "restore them to resume the run, or pass --overwrite to attribute the data as they are now"
                )
                raise ConfigError(msg)
    torch.manual_seed(config.runtime.seed)
    load_start = time.perf_counter()
    model = load_model(
        config.model.name,
        revision=config.model.revision,
        dtype=config.model.dtype,
        device=config.model.device,
        local_files_only=config.model.local_files_only,
        checkpoint=config.model.checkpoint,
    )
    model_load_seconds = time.perf_counter() - load_start
    # the config's attribution section holds InteractionAttribution's settings under the same names
    attributor = InteractionAttribution(
        model, **config.attribution.model_dump(), internal_batch_size=config.runtime.internal_batch_size
    )
    directory.mkdir(parents=True, exist_ok=True)
    if not run_path.exists():
        ranking = _ranking_path(config, data_digest, weights_digest)
        chosen = _choose_pairs(config, dataset, attributor, progress, ranking)[: config.data.limit]
        stores_pair_maps = _stores_pair_maps(config, len(chosen), model)  # decided on all shards' pairs together
        dataset = _subset(dataset, chosen, config)
        grid = model.patch_grid
        skeleton = run_path.with_suffix(".h5.tmp")
        skeleton.unlink(missing_ok=True)  # left by a run killed while creating it: never complete
        create_run_file(
            skeleton,
            attributes={
                **_provenance(config, model, command, weights_digest),
                "data_sha256": data_digest,
                # lets readers find the images after the project moved as a whole
                "data_root_from_run": os.path.relpath(config.data.root, directory),
            },
            captions=dataset.captions,
            images=[str(p.relative_to(config.data.root.resolve())) for p in dataset.images],
            pairs=dataset.given_pairs,
            rejected_records=dataset.rejected,
            store_pair_maps=stores_pair_maps,
            precision=config.output.precision,
            max_text_positions=model.max_text_positions,
            n_image_positions=model.n_image_prefix + grid[0] * grid[1],
            embedding_dim=model.embedding_dim,
            grid=grid,
            n_prefix=model.n_image_prefix,
        )
        skeleton.replace(run_path)  # so a run.h5 that exists always has every dataset

    summary = RunSummary(directory=directory, n_pairs=0, model_load_seconds=model_load_seconds)
    with RunWriter(run_path) as run:
        status = run.status("pairs")
        summary.n_pairs, summary.n_skipped = len(status), int((status == DONE).sum())
        check = _FiniteCheck(model)
        for stage in (_attribute_captions, _attribute_images, _attribute_pairs):
            if should_stop():
                break
            stage(run, attributor, check, config, progress, should_stop)
    with RunReader(run_path) as finished:
        status = finished.status("pairs")
        summary.n_done = int((status == DONE).sum()) - summary.n_skipped
        summary.n_failed = int((status == FAILED).sum())
        summary.is_interrupted = should_stop() or bool((status == PENDING).any())
        summary.accuracy = describe_accuracy(finished)
        truncated = finished.column("captions", "is_truncated") & (finished.status("captions") == DONE)
        summary.n_truncated = int(truncated.sum())
        summary.n_rejected = len(finished.rejected_records())
        summary.failures = describe_failures(finished, ("captions", "images"))  # a pair fails with its input
    if config.output.render and not summary.is_interrupted:
        from xclip.render import render_run

        render_run(directory)
    return summary


# pairs mapped, written and committed together: one write per dataset and one fsync per batch
PAIR_BATCH = 1024
# output.pair_maps: auto stores the maps while they take at most this much (the demo's 144 pairs: 1.2 MB; COCO val's 25,014
# given pairs at ViT-B/16: 1.5 GB); beyond it readers compute each map from the stored contributions
AUTO_PAIR_MAPS_BYTES = 2 * 1024**3


def _stores_pair_maps(config: RunConfig, n_pairs: int, model: DualEncoderAdapter) -> bool:
    if config.output.pair_maps != "auto":
        return config.output.pair_maps == "store"
    grid = model.patch_grid
    n_bytes = n_pairs * model.max_text_positions * (model.n_image_prefix + grid[0] * grid[1]) * (2 if config.output.precision == "float16" else 4)
    return n_bytes <= AUTO_PAIR_MAPS_BYTES


def _subset(dataset: Dataset, pairs: np.ndarray, config: RunConfig) -> Dataset:
    """This shard's contiguous block of the ``(P, 2)`` pairs, with just the captions and images they use (with
    ``data.limit`` or ``topk``, inputs without a pair are never attributed)."""
    index, n_shards = config.runtime.shard_index, config.runtime.num_shards
    size, extra = divmod(len(pairs), n_shards)  # the first `extra` shards take one pair more
    start = index * size + min(index, extra)
    block = pairs[start : start + size + (index < extra)]
    captions, caption_rows = np.unique(block[:, 0], return_inverse=True)
    images, image_rows = np.unique(block[:, 1], return_inverse=True)
    return Dataset(
        captions=[dataset.captions[c] for c in captions],
        images=[dataset.images[i] for i in images],
        given_pairs=np.stack([caption_rows, image_rows], axis=1),
        rejected=dataset.rejected,
    )


def _choose_pairs(
    config: RunConfig, dataset: Dataset, attributor: InteractionAttribution, progress: Progress, shared: Path
) -> np.ndarray:
    """``(P, 2)`` (caption, image) pairs of the pairing mode, as one integer array (``all`` of 5,000 x 25,000
    is 2 GB of it, where Python tuples would take ten times that). A top-k ranking is computed once per run
    and shared by its shards through the file ``shared`` in the output directory."""
    mode = config.pairing.mode
    n_captions, n_images = len(dataset.captions), len(dataset.images)
    if mode == "given":
        return np.asarray(dataset.given_pairs, dtype=np.int64).reshape(-1, 2)
    if mode == "all":
        return np.stack(np.divmod(np.arange(n_captions * n_images, dtype=np.int64), n_images), axis=1)
    # topk: each image with its k best captions by the model's own score (plain embeddings, cheap)
    if shared.is_file():
        return np.load(shared)
    scores = _similarities(attributor.model, dataset, config.runtime.batch_size, progress)
    k = min(config.pairing.k, n_captions)
    best = torch.topk(scores, k, dim=0).indices.cpu().numpy()  # (k, n_images)
    pairs = np.stack([best.reshape(-1), np.tile(np.arange(n_images), k)], axis=1).astype(np.int64)
    pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]  # caption-major, as the other modes
    shared.parent.mkdir(parents=True, exist_ok=True)
    partial = shared.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(partial, pairs)
    partial.replace(shared)  # atomic: shards that rank at the same time write the same array
    return pairs


def _ranking_path(config: RunConfig, data_digest: str, weights_digest: str | None) -> Path:
    """Where the shards of one run share their top-k ranking: named by everything the ranking depends on."""
    fingerprint = json.loads(config.result_fingerprint())
    fingerprint["runtime"].pop("shard_index")
    key = json.dumps([fingerprint, data_digest, weights_digest], sort_keys=True)
    return config.output.directory / f".topk-ranking-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npy"


@torch.no_grad()
def _similarities(model: DualEncoderAdapter, dataset: Dataset, batch_size: int, progress: Progress) -> torch.Tensor:
    """``(n_captions, n_images)`` cosine similarities, embedded in batches on the model's device; unreadable
    images score -inf (the image stage records why)."""
    text = [
        model.embed_text(model.tokenize(dataset.captions[start : start + batch_size])).float()
        for start in range(0, len(dataset.captions), batch_size)
    ]
    image = []
    for start in range(0, len(dataset.images), batch_size):
        paths = dataset.images[start : start + batch_size]
        try:
            image.append(model.embed_image(model.preprocess(paths).pixel_values).float())
        except (XclipError, ValueError):  # a bad image in the batch: embed its images one by one
            for path in paths:
                try:
                    image.append(model.embed_image(model.preprocess([path]).pixel_values).float())
                except (XclipError, ValueError):
                    image.append(torch.full_like(text[0][:1], float("nan")))
        progress("ranking", min(start + batch_size, len(dataset.images)), len(dataset.images))
    scores = torch.cat(text) @ torch.cat(image).T
    return scores.nan_to_num(nan=float("-inf"))


def _provenance(config: RunConfig, model: DualEncoderAdapter, command: str, weights_digest: str | None) -> dict[str, object]:
    import transformers

    attributes: dict[str, object] = {
        "xclip_version": xclip.__version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "model_name": config.model.name,
        "model_revision": config.model.revision or "",
        "model_family": model.family,
        "device": str(model.device),
        "dtype": config.model.dtype,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "config": config.model_dump_json(),
        "fingerprint": config.result_fingerprint(),
        "preprocessing": json.dumps(model.preprocessing_geometry()),
        "logit_scale": model.logit_scale,
    }
    if weights_digest is not None:
        attributes["model_weights_sha256"] = weights_digest
    if model.family == "open_clip":  # its tokenizer and transforms are open_clip's: their version matters
        import open_clip

        attributes["open_clip_version"] = open_clip.__version__
    return attributes


def _weights_digest(model: ModelConfig) -> str | None:
    """SHA-256 of a local checkpoint's weight files (it has no revision to pin): a checkpoint file, or a local
    directory's weights; None for hub names."""
    if model.checkpoint is not None:
        files = [Path(model.checkpoint)]
    elif Path(model.name).is_dir():
        weights = Path(model.name)
        files = sorted(weights.glob("*.safetensors")) + sorted(weights.glob("*.bin"))
    else:
        return None
    digest = hashlib.sha256()
    for file in files:
        with file.open("rb") as stream:  # in chunks: a large checkpoint need not fit in memory twice
            while chunk := stream.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def _batches(indices: np.ndarray, size: int) -> list[np.ndarray]:
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def _attribute_captions(
    run: RunWriter,
    attributor: InteractionAttribution,
    check: _FiniteCheck,
    config: RunConfig,
    progress: Progress,
    stop: Callable[[], bool],
) -> None:
    todo = run.pending("captions")
    texts = run.captions()
    model = attributor.model
    with _BackgroundWrites(run, "captions") as writes:
        for done, batch_indices in enumerate(_batches(todo, config.runtime.batch_size)):
            if stop():
                return
            good, failed = [], []
            for index in batch_indices:
                problem = text_problem(texts[index])
                if problem is None:
                    good.append(int(index))
                else:  # the data readers reject such captions; a file written by another tool may still hold one
                    failed.append((int(index), problem))
            written, token_ids, results = [], [], []
            if good:
                batch = model.tokenize([texts[index] for index in good])
                for index, ids, result in zip(good, batch.input_ids.tolist(), attributor.text_batch_contributions(batch)):
                    problem = check(result, "caption")
                    if problem is None:
                        written.append(index)
                        token_ids.append(ids)
                        results.append(result)
                    else:
                        failed.append((index, problem))
            writes.submit(failed, written, partial(run.write_captions, written, token_ids, results))
            progress("captions", min((done + 1) * config.runtime.batch_size, len(todo)), len(todo))


class _BackgroundWrites:
    """Stores a stage's batches from one background thread while the main thread computes the next batch, so
    that writing and fsyncing leave the critical path. One thread with one batch in flight keeps the store's
    order (a batch's data reach the disk before its status) and bounds the results held in memory to two
    batches. A failed write surfaces in the main thread at the next batch, or when the stage ends; the stage
    always waits for the batch in flight, so an interrupted run keeps every batch it computed."""

    def __init__(self, run: RunWriter, group: str) -> None:
        self.run, self.group = run, group
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"xclip-{group}-writes")
        self._in_flight: Future[None] | None = None

    def submit(self, failed: Sequence[tuple[int, str]], written: Sequence[int], write: Callable[[], None]) -> None:
        """Mark ``failed`` items failed, ``write()`` the results of ``written``, then commit them. ``write``
        binds its arguments now (a ``functools.partial``; a lambda would see the next batch's lists)."""
        self.wait()
        self._in_flight = self._thread.submit(self._store, failed, written, write)

    def _store(self, failed: Sequence[tuple[int, str]], written: Sequence[int], write: Callable[[], None]) -> None:
        for index, reason in failed:
            self.run.fail(self.group, index, reason)
        write()
        self.run.commit(self.group, written)

    def wait(self) -> None:
        if self._in_flight is not None:
            in_flight, self._in_flight = self._in_flight, None
            in_flight.result()

    def __enter__(self) -> _BackgroundWrites:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.wait()
        finally:
            self._thread.shutdown()


class _FiniteCheck:
    """Says why a result must not be stored as done (NaN or inf in it). The model's weights are scanned for
    the cause once, at the first such result, not once per item."""

    def __init__(self, model: DualEncoderAdapter) -> None:
        self.model = model
        self._cause: str | None = None

    def __call__(self, result: xclip.Contributions | PairNumbers, what: str) -> str | None:
        if isinstance(result, xclip.Contributions):
            arrays = (result.values, result.embedding)
        elif isinstance(result, xclip.InteractionMap):
            arrays = (result.interactions, result.terms)
        else:
            arrays = (result.terms, torch.tensor(result.completeness_error))
        if all(bool(torch.isfinite(array).all()) for array in arrays):
            return None
        if self._cause is None:
            parameters = self.model.model.named_parameters()
            broken = [name for name, parameter in parameters if not bool(torch.isfinite(parameter).all())]
            more = f" and {len(broken) - 3} more" if len(broken) > 3 else ""
            self._cause = (
                f"the model's weights hold NaN or inf in {', '.join(broken[:3])}{more}" if broken
                else "check the input and the model's weights (an overflow in a low-precision dtype?)"
            )
        return f"non-finite values in the {what}'s results: {self._cause}"


class _ImageFiles(torch.utils.data.Dataset):
    """Decodes and preprocesses images (in DataLoader workers when ``num_workers > 0``)."""

    def __init__(self, root: Path, paths: list[str], indices: np.ndarray, processor: object) -> None:
        self.root, self.paths, self.indices, self.processor = root, paths, indices, processor

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[int, object, str]:
        index = int(self.indices[position])
        try:
            image, notes = read_image(self.root / self.paths[index])
            pixels = self.processor(images=[image], return_tensors="pt")["pixel_values"][0]  # type: ignore[operator]
        except XclipError as e:
            return index, None, str(e)
        except ValueError as e:  # how transformers' image processors refuse an image they cannot handle
            return index, None, f"the image processor refused image {self.paths[index]}: {e}"
        return index, (pixels, image, notes), ""


def _attribute_images(
    run: RunWriter,
    attributor: InteractionAttribution,
    check: _FiniteCheck,
    config: RunConfig,
    progress: Progress,
    stop: Callable[[], bool],
) -> None:
    todo = run.pending("images")
    model = attributor.model
    files = _ImageFiles(config.data.root.resolve(), run.image_paths(), todo, model.image_processor)
    loader = torch.utils.data.DataLoader(
        files, batch_size=config.runtime.batch_size, num_workers=config.runtime.num_workers, collate_fn=list
    )
    finished = 0
    with _BackgroundWrites(run, "images") as writes:
        for items in loader:
            if stop():
                return
            good, failed = [], []
            for index, loaded, reason in items:
                if loaded is None:
                    failed.append((index, reason))
                else:
                    good.append((index, *loaded))
            written, sizes, notes, results = [], [], [], []
            if good:
                batch = ImageBatch(
                    pixel_values=torch.stack([pixels for _, pixels, _, _ in good]).to(model.device, model.dtype),
                    original_sizes=[image.size for _, _, image, _ in good],
                    images=[image for _, _, image, _ in good],
                )
                for (index, _, image, note), result in zip(good, attributor.image_batch_contributions(batch)):
                    problem = check(result, "image")
                    if problem is None:
                        written.append(index)
                        sizes.append(image.size)
                        notes.append(note)
                        results.append(result)
                    else:
                        failed.append((index, problem))
            writes.submit(failed, written, partial(run.write_images, written, sizes, notes, results))
            finished += len(items)
            progress("images", finished, len(todo))


def _attribute_pairs(
    run: RunWriter,
    attributor: InteractionAttribution,
    check: _FiniteCheck,
    config: RunConfig,
    progress: Progress,
    stop: Callable[[], bool],
) -> None:
    todo = run.pending("pairs")
    caption_index, image_index = run.column("pairs", "caption_index"), run.column("pairs", "image_index")
    caption_status, image_status = run.status("captions"), run.status("images")
    # why each failed input failed, read once: all of an input's pairs fail with its reason
    reasons: dict[str, dict[int, str]] = {}
    for group, status in (("captions", caption_status), ("images", image_status)):
        failed = np.flatnonzero(status == FAILED)
        reasons[group] = dict(zip(failed.tolist(), run.errors(group, failed)))
    scale = attributor.logit_scale
    # without stored maps a pair's numbers come from its inputs' summed contributions: no L x S map
    compute = interaction_maps if run.has_pair_maps else pair_numbers
    cache: dict[tuple[str, int], xclip.Contributions] = {}

    def stored(group: str, index: int) -> xclip.Contributions:
        if (group, index) not in cache:
            cache[group, index] = run.contributions(group, index)
        return cache[group, index]

    with _BackgroundWrites(run, "pairs") as writes:
        for done, batch_indices in enumerate(_batches(todo, PAIR_BATCH)):
            if stop():
                return
            ready, failed = [], []
            for index in batch_indices:
                c, i = int(caption_index[index]), int(image_index[index])
                if caption_status[c] != DONE:
                    failed.append((int(index), f"caption {c} failed: {reasons['captions'].get(c, '')}"))
                elif image_status[i] != DONE:
                    failed.append((int(index), f"image {i} failed: {reasons['images'].get(i, '')}"))
                else:
                    ready.append((int(index), c, i))
            written, results = [], []
            if ready:
                text = [stored("captions", c) for _, c, _ in ready]
                image = [stored("images", i) for _, _, i in ready]
                maps = compute(text, image, [(k, k) for k in range(len(ready))], logit_scale=scale)
                for (index, _, _), result in zip(ready, maps):
                    problem = check(result, "pair")
                    if problem is None:
                        written.append(index)
                        results.append(result)
                    else:
                        failed.append((index, problem))
            writes.submit(failed, written, partial(run.write_pairs, written, results))
            if len(cache) > 4096:
                cache.clear()
            progress("pairs", min((done + 1) * PAIR_BATCH, len(todo)), len(todo))
