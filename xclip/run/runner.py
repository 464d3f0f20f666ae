"""One batch attribution run: config in, HDF5 run directory out. No terminal code here: progress goes to a
callback, stopping is asked through ``should_stop``."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xclip.models.base import DualEncoderAdapter, ImageBatch, text_problem
from xclip.attribution.engine import InteractionAttribution, interaction_maps, pair_numbers
from xclip.config import RunConfig
from xclip.run.data import Dataset, read_dataset
from xclip.disk.files import install_file
from xclip.store.directory import remove_run_outputs
from xclip.disk.locking import writer_lock
from xclip.disk.digests import FileIdentity, Verify, file_identity, has_changed
from xclip.errors import XclipError
from xclip.run.identity import RunIdentity, check_resumable, identify_run, provenance
from xclip.store.describe import describe_accuracy, describe_crops, describe_failures, describe_truncated_captions, describe_unknown_words
from xclip.run.pairing import pairs_to_attribute, shard_dataset
from xclip.attribution.from_config import load_attributor
from xclip.attribution.result import Contributions, InteractionMap, PairNumbers
from xclip.store.schema import CAPTION_INDEX, CAPTIONS, DONE, FAILED, FILE_SIZE, IMAGE_INDEX, IMAGES, IS_TRUNCATED, MTIME_NS, PAIRS, PENDING, RUN_FILE, SHA256
from xclip.store.create import create_run_file
from xclip.store.reader import RunReader
from xclip.store.writer import BackgroundWrites, ImageSource, RunWriter
from xclip.threads import threads_for

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class RunSummary:
    directory: Path
    n_pairs: int
    n_done: int = 0  # pairs finished by this invocation
    n_skipped: int = 0  # pairs already finished before it
    n_failed: int = 0  # pairs
    n_rejected: int = 0  # records of the data files that name no usable pair (see xclip.run.data)
    n_truncated: int = 0  # captions longer than the model's context, attributed as far as it reads them
    accuracy: dict[str, Any] = field(default_factory=dict)  # see xclip.store.describe.describe_accuracy
    seconds: float = 0.0
    model_load_seconds: float = 0.0  # of ``seconds``: loading the checkpoint
    is_interrupted: bool = False
    failures: list[str] = field(default_factory=list)
    changed_images: list[str] = field(default_factory=list)  # finished before, their files changed: attributed again
    unknown_words: dict[str, Any] = field(default_factory=dict)  # see xclip.store.describe.describe_unknown_words
    cropped_images: dict[str, Any] = field(default_factory=dict)  # see xclip.store.describe.describe_crops
    truncated_captions: list[dict[str, Any]] = field(default_factory=list)  # see xclip.store.describe.describe_truncated_captions

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
    torch uses ``runtime.threads`` CPU threads during the run (by default the CPUs the process may use: see
    :func:`xclip.threads.decide_threads`), and its previous number again after it.

    Raises:
        ConfigError: the directory holds a run made with other settings (pass ``overwrite=True``).
        StoreError: another live process is writing the directory (see :func:`xclip.disk.locking.writer_lock`).
    """
    start = time.perf_counter()
    progress = on_progress or (lambda stage, done, total: None)
    directory = config.run_directory
    # the lock before --overwrite deletes anything; torch's threads as runtime.threads says for the run's duration
    with writer_lock(directory, command), threads_for(config.runtime.threads):
        summary = _run_locked(config, overwrite=overwrite, progress=progress, should_stop=should_stop, command=command)
    summary.seconds = time.perf_counter() - start
    return summary


def _run_locked(
    config: RunConfig, *, overwrite: bool, progress: Progress, should_stop: Callable[[], bool], command: str
) -> RunSummary:
    directory = config.run_directory
    run_path = directory / RUN_FILE
    if overwrite and directory.exists():  # only what xclip wrote: a user's own files in the directory stay
        remove_run_outputs(directory)
    dataset = read_dataset(config.data)
    identity = identify_run(config, dataset)
    if run_path.exists():
        check_resumable(run_path, config, identity)
    torch.manual_seed(config.runtime.seed)
    attributor, model_load_seconds = load_attributor(config)
    directory.mkdir(parents=True, exist_ok=True)
    if not run_path.exists():
        _create_run_file(run_path, config, dataset, attributor, identity, command, progress)
    with RunWriter(run_path) as run:
        changed = _redo_changed_images(run, config.data.root.resolve(), config.data.verify)
        n_skipped = int((run.status(PAIRS) == DONE).sum())
        check = _FiniteCheck(attributor.model)
        for stage in (_caption_stage, _image_stage, _pair_stage):
            if should_stop():
                break
            _run_stage(run, stage(run, attributor, config), check, progress, should_stop)
    summary = _summarise(directory, n_skipped, model_load_seconds, should_stop, config.image.crop_warning)
    summary.changed_images = changed
    if config.output.render and not summary.is_interrupted:
        from xclip.show.render import render_run

        render_run(directory)
    return summary


def _redo_changed_images(run: RunWriter, root: Path, verify: Verify) -> list[str]:
    """Finished images whose files changed since they were attributed (or are gone), marked pending again with
    their pairs; their paths. ``verify`` is ``data.verify``: see :func:`xclip.disk.digests.has_changed`."""
    paths = run.image_paths()
    done = np.flatnonzero(run.status(IMAGES) == DONE)
    sizes, times, digests = (run.column(IMAGES, name) for name in (FILE_SIZE, MTIME_NS, SHA256))  # read once
    changed = [int(i) for i in done
               if has_changed(root / paths[i], FileIdentity(int(sizes[i]), int(times[i]), digests[i].decode()), verify=verify)]
    run.redo_images(changed)
    return [paths[i] for i in changed]


def _create_run_file(
    run_path: Path,
    config: RunConfig,
    dataset: Dataset,
    attributor: InteractionAttribution,
    identity: RunIdentity,
    command: str,
    progress: Progress,
) -> None:
    """Choose the pairs and create ``run_path`` with every dataset this shard's run fills."""
    model = attributor.model
    chosen = pairs_to_attribute(config, dataset, model, identity, partial(progress, "ranking"))
    stores_pair_maps = _stores_pair_maps(config, len(chosen), model)  # decided on all shards' pairs together
    shard = shard_dataset(dataset, chosen, config)
    grid = model.patch_grid
    skeleton = run_path.with_suffix(".h5.tmp")
    skeleton.unlink(missing_ok=True)  # left by a run killed while creating it: never complete
    create_run_file(
        skeleton,
        attributes=provenance(config, attributor, command, identity),
        captions=shard.captions,
        images=[str(p.relative_to(config.data.root.resolve())) for p in shard.images],
        pairs=shard.given_pairs,
        rejected_records=shard.rejected,
        store_pair_maps=stores_pair_maps,
        precision=config.output.storage_precision(config.model.dtype),
        max_text_positions=model.max_text_positions,
        n_image_positions=model.n_image_prefix + grid[0] * grid[1],
        embedding_dim=model.embedding_dim,
        grid=grid,
        n_prefix=model.n_image_prefix,
    )
    install_file(skeleton, run_path)  # so a run.h5 that exists always has every dataset, also after a power cut


def _summarise(
    directory: Path, n_skipped: int, model_load_seconds: float, should_stop: Callable[[], bool], crop_warning: float
) -> RunSummary:
    """What the run file holds after this invocation, which found ``n_skipped`` pairs finished."""
    with RunReader(directory / RUN_FILE) as finished:
        status = finished.status(PAIRS)
        truncated = finished.column(CAPTIONS, IS_TRUNCATED) & (finished.status(CAPTIONS) == DONE)
        return RunSummary(
            directory=directory,
            n_pairs=len(status),
            n_done=int((status == DONE).sum()) - n_skipped,
            n_skipped=n_skipped,
            n_failed=int((status == FAILED).sum()),
            n_rejected=len(finished.rejected_records()),
            n_truncated=int(truncated.sum()),
            accuracy=describe_accuracy(finished),
            model_load_seconds=model_load_seconds,
            is_interrupted=should_stop() or bool((status == PENDING).any()),
            failures=describe_failures(finished, (CAPTIONS, IMAGES)),  # a pair fails with its input
            unknown_words=describe_unknown_words(finished),
            cropped_images=describe_crops(finished, crop_warning),
            truncated_captions=describe_truncated_captions(finished),
        )


# pairs mapped, written and committed together: one write per dataset and one fsync per batch
PAIR_BATCH = 1024
# output.pair_maps: auto stores the maps while they take at most this much (the demo's 144 pairs: 1.2 MB; COCO val's 25,014
# given pairs at ViT-B/16: 1.5 GB); beyond it readers compute each map from the stored contributions
AUTO_PAIR_MAPS_BYTES = 2 * 1024**3


def _stores_pair_maps(config: RunConfig, n_pairs: int, model: DualEncoderAdapter) -> bool:
    if config.output.pair_maps != "auto":
        return config.output.pair_maps == "store"
    grid = model.patch_grid
    n_bytes = n_pairs * model.max_text_positions * (model.n_image_prefix + grid[0] * grid[1]) * {"float16": 2, "float32": 4, "float64": 8}[config.output.storage_precision(config.model.dtype)]
    return n_bytes <= AUTO_PAIR_MAPS_BYTES


@dataclass
class _Batch:
    """One batch of a stage's pending items, sorted before anything is computed."""

    ready: list[Any] = field(default_factory=list)  # items to attribute, in their stage's own form
    failed: list[tuple[int, str]] = field(default_factory=list)  # (index, reason): items that cannot be attributed


@dataclass(frozen=True)
class _Stage:
    """What one stage of a run has of its own; :func:`_run_stage` does the rest."""

    group: str  # the store's group, and the stage's name in progress reports
    item: str  # what the finite check calls an item
    n_items: int  # pending items when the stage starts
    batches: Iterable[_Batch]
    # a batch's ready items -> (index, what the write stores beside the result, result) each
    attribute: Callable[[list[Any]], Iterable[tuple[int, Any, Contributions | PairNumbers]]]
    # stores (indices, their beside-values, their results) of the items that passed the finite check
    write: Callable[[list[int], list[Any], list[Any]], None]


def _run_stage(
    run: RunWriter, stage: _Stage, check: _FiniteCheck, progress: Progress, stop: Callable[[], bool]
) -> None:
    """Attribute a stage's batches, each stored in the background while the next one is computed; ``stop()``
    is asked before each batch."""
    n_finished = 0
    with BackgroundWrites(run, stage.group) as writes:
        for batch in stage.batches:
            if stop():
                return
            failed = list(batch.failed)
            written, beside, results = [], [], []
            if batch.ready:
                for index, value, result in stage.attribute(batch.ready):
                    problem = check(result, stage.item)
                    if problem is None:
                        written.append(index)
                        beside.append(value)
                        results.append(result)
                    else:
                        failed.append((index, problem))
            writes.submit(failed, written, partial(stage.write, written, beside, results))
            n_finished += len(batch.ready) + len(batch.failed)
            progress(stage.group, n_finished, stage.n_items)


def _caption_stage(run: RunWriter, attributor: InteractionAttribution, config: RunConfig) -> _Stage:
    """Captions in batches of ``runtime.batch_size``; a caption's token ids are stored beside its result."""
    todo = run.pending(CAPTIONS)
    texts = run.captions()
    model = attributor.model

    def batches() -> Iterator[_Batch]:
        for indices in _batches(todo, config.runtime.batch_size):
            batch = _Batch()
            for index in indices:
                problem = text_problem(texts[index])
                if problem is None:
                    batch.ready.append(int(index))
                else:  # the data readers reject such captions; a file written by another tool may still hold one
                    batch.failed.append((int(index), problem))
            yield batch

    def attribute(indices: list[int]) -> Iterable[tuple[int, list[int], Contributions]]:
        tokens = model.tokenize([texts[index] for index in indices])
        return zip(indices, tokens.input_ids.tolist(), attributor.text_batch_contributions(tokens))

    return _Stage("captions", "caption", len(todo), batches(), attribute, run.write_captions)


class _ImageFiles(torch.utils.data.Dataset):
    """Decodes and preprocesses images through the model's adapter (in DataLoader workers when
    ``num_workers > 0``)."""

    def __init__(self, root: Path, paths: list[str], indices: np.ndarray, preprocess: Callable[[Path], Any]) -> None:
        self.root, self.paths, self.indices, self.preprocess = root, paths, indices, preprocess

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[int, object, str]:
        index = int(self.indices[position])
        path = self.root / self.paths[index]
        try:
            file = file_identity(path) if path.is_file() else None  # the reader names what is wrong otherwise
            return index, (self.preprocess(path), file), ""
        except XclipError as e:
            return index, None, str(e)
        except OSError as e:  # unreadable while hashing: the item fails, the run goes on
            return index, None, f"cannot read image {self.paths[index]}: {e.strerror or e}"


def _image_stage(run: RunWriter, attributor: InteractionAttribution, config: RunConfig) -> _Stage:
    """Images decoded by a DataLoader in batches of ``runtime.batch_size``; an image's preprocessing notes are
    stored beside its result."""
    todo = run.pending(IMAGES)
    model = attributor.model
    files = _ImageFiles(config.data.root.resolve(), run.image_paths(), todo, model.preprocess_image)
    loader = torch.utils.data.DataLoader(
        files, batch_size=config.runtime.batch_size, num_workers=config.runtime.num_workers, collate_fn=list
    )

    def batches() -> Iterator[_Batch]:
        for items in loader:
            batch = _Batch()
            for index, loaded, reason in items:
                if loaded is None:
                    batch.failed.append((index, reason))
                else:
                    batch.ready.append((index, loaded))
            yield batch

    def attribute(ready: list[tuple[int, Any]]) -> Iterable[tuple[int, ImageSource, Contributions]]:
        images = ImageBatch(
            pixel_values=torch.stack([loaded.pixels for _, (loaded, _) in ready]).to(model.device, model.dtype),
            geometry=[loaded.geometry for _, (loaded, _) in ready],
            images=[loaded.image for _, (loaded, _) in ready],
        )
        results = attributor.image_batch_contributions(images)
        return [(index, ImageSource(loaded.notes, file), result) for (index, (loaded, file)), result in zip(ready, results)]

    return _Stage("images", "image", len(todo), batches(), attribute, run.write_images)


def _pair_stage(run: RunWriter, attributor: InteractionAttribution, config: RunConfig) -> _Stage:
    """Pairs in batches of ``PAIR_BATCH``, from their inputs' stored contributions; a pair whose caption or
    image failed fails with its input's reason."""
    todo = run.pending(PAIRS)
    caption_index, image_index = run.column(PAIRS, CAPTION_INDEX), run.column(PAIRS, IMAGE_INDEX)
    caption_status, image_status = run.status(CAPTIONS), run.status(IMAGES)
    # why each failed input failed, read once: all of an input's pairs fail with its reason
    reasons: dict[str, dict[int, str]] = {}
    for group, status in (("captions", caption_status), ("images", image_status)):
        failed = np.flatnonzero(status == FAILED)
        reasons[group] = dict(zip(failed.tolist(), run.errors(group, failed)))
    scale = attributor.logit_scale
    # without stored maps a pair's numbers come from its inputs' summed contributions: no L x S map
    compute = interaction_maps if run.has_pair_maps else pair_numbers
    cache: dict[tuple[str, int], Contributions] = {}

    def stored(group: str, index: int) -> Contributions:
        if (group, index) not in cache:
            cache[group, index] = run.contributions(group, index)
        return cache[group, index]

    def batches() -> Iterator[_Batch]:
        for indices in _batches(todo, PAIR_BATCH):
            batch = _Batch()
            for index in indices:
                c, i = int(caption_index[index]), int(image_index[index])
                if caption_status[c] != DONE:
                    batch.failed.append((int(index), f"caption {c} failed: {reasons['captions'].get(c, '')}"))
                elif image_status[i] != DONE:
                    batch.failed.append((int(index), f"image {i} failed: {reasons['images'].get(i, '')}"))
                else:
                    batch.ready.append((int(index), c, i))
            yield batch

    def attribute(ready: list[tuple[int, int, int]]) -> Iterable[tuple[int, None, PairNumbers]]:
        if len(cache) > 4096:  # bounds the inputs' contributions held between batches
            cache.clear()
        text = [stored("captions", c) for _, c, _ in ready]
        image = [stored("images", i) for _, _, i in ready]
        maps = compute(text, image, [(k, k) for k in range(len(ready))], logit_scale=scale)
        return [(index, None, result) for (index, _, _), result in zip(ready, maps)]

    def write(indices: list[int], _nothing_beside: list[None], results: list[PairNumbers]) -> None:
        run.write_pairs(indices, results)

    return _Stage("pairs", "pair", len(todo), batches(), attribute, write)


def _batches(indices: np.ndarray, size: int) -> list[np.ndarray]:
    return [indices[i : i + size] for i in range(0, len(indices), size)]


class _FiniteCheck:
    """Says why a result must not be stored as done (NaN or inf in it). The model's weights are scanned for
    the cause once, at the first such result, not once per item."""

    def __init__(self, model: DualEncoderAdapter) -> None:
        self.model = model
        self._cause: str | None = None

    def __call__(self, result: Contributions | PairNumbers, what: str) -> str | None:
        if isinstance(result, Contributions):
            arrays = (result.values, result.embedding)
        elif isinstance(result, InteractionMap):
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
