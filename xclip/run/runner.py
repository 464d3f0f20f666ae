"""One batch attribution run: config in, HDF5 run directory out. No terminal code here: progress goes to a
callback, stopping is asked through ``should_stop``."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xclip.models.base import DualEncoderAdapter, ImageBatch, text_problem
from xclip.attribution.engine import InteractionAttribution, interaction_maps, pair_numbers
from xclip.config import SHARDED_FORMATS, RunConfig
from xclip.run.data import Dataset, read_dataset
from xclip.disk.files import install_file
from xclip.store.directory import remove_run_outputs
from xclip.disk.locking import writer_lock
from xclip.disk.digests import FileIdentity, Verify, file_identity, has_changed
from xclip.disk.archives import ArchiveMembers, MemberBytes, is_present
from xclip.errors import XclipError
from xclip.run.identity import RunIdentity, check_resumable, identify_run, provenance
from xclip.store.describe import describe_accuracy, describe_crops, describe_failures, describe_truncated_captions, describe_unknown_words
from xclip.run.pairing import pairs_to_attribute, shard_dataset
from xclip.attribution.from_config import load_attributor
from xclip.attribution.result import Contributions, InteractionMap, PairNumbers
from xclip.attribution.summary import summarise_maps
from xclip.store.schema import CAPTION_INDEX, CAPTIONS, DONE, FAILED, FILE_SIZE, IMAGE_INDEX, IMAGES, IS_TRUNCATED, MTIME_NS, PAIRS, PENDING, RUN_FILE, SHA256
from xclip.store.create import create_run_file
from xclip.store.reader import RunReader
from xclip.store.writer import BackgroundWrites, ImageSource, RunWriter, WriteStep
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
    dataset = read_dataset(config.data, (config.runtime.shard_index, config.runtime.num_shards))
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
        if run.stores_contributions:
            for stage in (_caption_stage, _image_stage, _pair_stage):
                if should_stop():
                    break
                _run_stage(run, stage(run, attributor, config), check, progress, should_stop)
        elif not should_stop():
            _run_summary_stage(run, attributor, config, check, progress, should_stop)
    summary = summarise_run(directory, n_skipped, crop_warning=config.image.crop_warning,
                            model_load_seconds=model_load_seconds, should_stop=should_stop)
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
    with ArchiveMembers() as archives:  # images inside tar or parquet files: each archive indexed once
        changed = [int(i) for i in done
                   if has_changed(root / paths[i], FileIdentity(int(sizes[i]), int(times[i]), digests[i].decode()),
                                  verify=verify, archives=archives)]
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
    n_image_positions = model.n_image_prefix + grid[0] * grid[1]
    stores_contributions = config.output.contributions == "store"
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
        n_image_positions=n_image_positions,
        embedding_dim=model.embedding_dim,
        grid=grid,
        n_prefix=model.n_image_prefix,
        store_contributions=stores_contributions,
        n_top_cells=min(config.output.top_cells, model.max_text_positions * n_image_positions),
        vocabulary=model.vocabulary() if not stores_contributions else (),
    )
    install_file(skeleton, run_path)  # so a run.h5 that exists always has every dataset, also after a power cut


def summarise_run(
    directory: Path, n_skipped: int, *, crop_warning: float, model_load_seconds: float = 0.0,
    should_stop: Callable[[], bool] = lambda: False,
) -> RunSummary:
    """What ``directory``'s run file holds after an invocation that found ``n_skipped`` pairs finished (also a
    merge of shards: see :mod:`xclip.run.workers`); ``crop_warning`` is ``image.crop_warning``."""
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
    if config.data.format in SHARDED_FORMATS:  # a shard reads its own files only: no shard knows the run's size
        return False
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
            written, beside, results = _checked(stage.attribute(batch.ready) if batch.ready else [], check, stage.item, failed)
            writes.submit(failed, written, partial(stage.write, written, beside, results))
            n_finished += len(batch.ready) + len(batch.failed)
            progress(stage.group, n_finished, stage.n_items)


def _checked(attributed: Iterable[tuple[int, Any, Any]], check: _FiniteCheck, item: str, failed: list[tuple[int, str]]
             ) -> tuple[list[int], list[Any], list[Any]]:
    """The indices, beside-values and results of the ``attributed`` items that pass the finite check; the others
    are added to ``failed`` with the reason."""
    attributed = list(attributed)
    if check.all_finite([result for _, _, result in attributed]):  # the usual case, in one pass over the batch
        return [index for index, _, _ in attributed], [value for _, value, _ in attributed], [r for _, _, r in attributed]
    written, beside, results = [], [], []
    for index, value, result in attributed:
        problem = check(result, item)
        if problem is None:
            written.append(index)
            beside.append(value)
            results.append(result)
        else:
            failed.append((index, problem))
    return written, beside, results


def _caption_stage(run: RunWriter, attributor: InteractionAttribution, config: RunConfig) -> _Stage:
    """Captions in batches of ``runtime.batch_size``; a caption's token ids are stored beside its result."""
    todo = run.pending(CAPTIONS)
    texts = run.captions()
    batches = (_caption_batch(texts, indices) for indices in _batches(todo, config.runtime.batch_size))
    return _Stage("captions", "caption", len(todo), batches, partial(_attribute_captions, attributor, texts), run.write_captions)


def _caption_batch(texts: list[str], indices: Iterable[int]) -> _Batch:
    """Captions ready to attribute, and those that cannot be (their reasons)."""
    batch = _Batch()
    for index in indices:
        problem = text_problem(texts[index])
        if problem is None:
            batch.ready.append(int(index))
        else:  # the data readers reject such captions; a file written by another tool may still hold one
            batch.failed.append((int(index), problem))
    return batch


def _attribute_captions(attributor: InteractionAttribution, texts: list[str], indices: list[int]
                        ) -> list[tuple[int, list[int], Contributions]]:
    """(index, token ids, contributions) of each caption."""
    tokens = attributor.model.tokenize([texts[index] for index in indices])
    return list(zip(indices, tokens.input_ids.tolist(), attributor.text_batch_contributions(tokens)))


class _ImageFiles(torch.utils.data.Dataset):
    """Decodes and preprocesses images through the model's adapter (in DataLoader workers when
    ``num_workers > 0``)."""

    def __init__(self, root: Path, paths: list[str], indices: np.ndarray, preprocess: Callable[[Path | MemberBytes], Any]) -> None:
        self.root, self.paths, self.indices, self.preprocess = root, paths, indices, preprocess
        self.archives = ArchiveMembers()  # images inside tar and parquet files; each DataLoader worker opens its own

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[int, object, str]:
        index = int(self.indices[position])
        path = self.root / self.paths[index]
        try:
            image = self.archives.image(path)  # a member of a tar or parquet file: its bytes, read once; else the path
            file = file_identity(image) if is_present(image) else None  # the reader names what is wrong otherwise
            return index, (self.preprocess(image), file), ""
        except XclipError as e:
            return index, None, str(e)
        except OSError as e:  # unreadable while hashing: the item fails, the run goes on
            return index, None, f"cannot read image {self.paths[index]}: {e.strerror or e}"


def _image_stage(run: RunWriter, attributor: InteractionAttribution, config: RunConfig) -> _Stage:
    """Images decoded by a DataLoader in batches of ``runtime.batch_size``; an image's preprocessing notes are
    stored beside its result."""
    todo = run.pending(IMAGES)
    return _Stage("images", "image", len(todo), _image_batches(run, attributor, config, todo),
                  partial(_attribute_images, attributor), run.write_images)


def _image_batches(run: RunWriter, attributor: InteractionAttribution, config: RunConfig, indices: np.ndarray) -> Iterator[_Batch]:
    """The images ``indices`` decoded by a DataLoader in batches of ``runtime.batch_size``: each batch's ready
    images ``(index, (preprocessed, file))`` and those that could not be read (their reasons)."""
    files = _ImageFiles(config.data.root.resolve(), run.image_paths(), indices, attributor.model.preprocess_image)
    loader = torch.utils.data.DataLoader(
        files, batch_size=config.runtime.batch_size, num_workers=config.runtime.num_workers, collate_fn=list
    )
    for items in loader:
        batch = _Batch()
        for index, loaded, reason in items:
            if loaded is None:
                batch.failed.append((index, reason))
            else:
                batch.ready.append((index, loaded))
        yield batch


def _attribute_images(attributor: InteractionAttribution, ready: list[tuple[int, Any]]) -> list[tuple[int, ImageSource, Contributions]]:
    """(index, what is stored beside it, contributions) of each decoded image."""
    model = attributor.model
    images = ImageBatch(
        pixel_values=torch.stack([loaded.pixels for _, (loaded, _) in ready]).to(model.device, model.dtype),
        geometry=[loaded.geometry for _, (loaded, _) in ready],
        images=[loaded.image for _, (loaded, _) in ready],
    )
    results = attributor.image_batch_contributions(images)
    return [(index, ImageSource(loaded.notes, file), result) for (index, (loaded, file)), result in zip(ready, results)]


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


# summary runs: pending pairs mapped, summarised, written and committed together (bounds the maps held, P x L x S)
SUMMARY_PAIR_CHUNK = 256
# summary runs: the caption contributions kept between chunks (pairing.mode all reuses each caption with every image)
CAPTION_CACHE_BYTES = 512 * 1024**2


class _CaptionCache:
    """Caption contributions by caption index, least recently used dropped past ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.n_bytes = max_bytes, 0
        self._items: OrderedDict[int, Contributions] = OrderedDict()

    def get(self, caption: int) -> Contributions | None:
        item = self._items.get(caption)
        if item is not None:
            self._items.move_to_end(caption)
        return item

    def put(self, caption: int, item: Contributions) -> None:
        self._items[caption] = item
        self.n_bytes += _size(item)
        while self.n_bytes > self.max_bytes and len(self._items) > 1:
            _, dropped = self._items.popitem(last=False)
            self.n_bytes -= _size(dropped)


def _size(item: Contributions) -> int:
    return item.values.numel() * item.values.element_size()


def _run_summary_stage(
    run: RunWriter, attributor: InteractionAttribution, config: RunConfig, check: _FiniteCheck, progress: Progress,
    stop: Callable[[], bool],
) -> None:
    """A summary run (``output.contributions: none``) in one stage, image-major, since it keeps no contributions to
    read back: each batch of images with pending pairs is attributed, then its pending pairs in chunks of
    :data:`SUMMARY_PAIR_CHUNK`: the captions a chunk needs (through a bounded cache), the chunk's maps, their
    numbers and summaries. Each chunk's inputs are committed before its pairs; an input finished by an earlier
    run whose pairs are pending is attributed again (its contributions were not kept) but not rewritten. Memory
    holds one image batch, one chunk's maps and the cache, whatever the number of pairs. ``stop()`` is asked
    before each chunk."""
    todo = run.pending(PAIRS)
    caption_index, image_index = run.column(PAIRS, CAPTION_INDEX), run.column(PAIRS, IMAGE_INDEX)
    todo = todo[np.lexsort((caption_index[todo], image_index[todo]))]  # image-major: each image's pairs together
    images = np.unique(image_index[todo])
    bounds = np.searchsorted(image_index[todo], images)  # where each image's pairs start in todo
    bounds = np.append(bounds, len(todo))
    texts = run.captions()
    is_done = {CAPTIONS: run.status(CAPTIONS) == DONE, IMAGES: run.status(IMAGES) == DONE}
    cache = _CaptionCache(CAPTION_CACHE_BYTES)
    failed_captions: dict[int, str] = {}  # why the captions that failed in this run failed: their pairs fail with them
    output, model = config.output, attributor.model
    n_finished = n_images = 0
    with BackgroundWrites(run, PAIRS) as writes:
        for batch in _image_batches(run, attributor, config, images):
            first, n_images = n_images, n_images + len(batch.ready) + len(batch.failed)
            failed_images = list(batch.failed)
            written, beside, results = _checked(_attribute_images(attributor, batch.ready) if batch.ready else [],
                                                check, "image", failed_images)
            attributed_images = dict(zip(written, results))
            steps = [_input_step(run, IMAGES, is_done, failed_images, written, beside, results)]
            image_reasons = dict(failed_images)
            batch_pairs = todo[bounds[first] : bounds[n_images]]
            for start in range(0, len(batch_pairs), SUMMARY_PAIR_CHUNK):
                if stop():
                    return
                chunk = batch_pairs[start : start + SUMMARY_PAIR_CHUNK]
                failed_pairs = [(int(p), f"image {int(image_index[p])} failed: {image_reasons[int(image_index[p])]}")
                                for p in chunk if int(image_index[p]) in image_reasons]
                chunk = np.array([p for p in chunk if int(image_index[p]) not in image_reasons], dtype=np.int64)
                caption_step, captions = _chunk_captions(run, attributor, texts, caption_index[chunk], cache,
                                                         failed_captions, is_done, check, config.runtime.batch_size)
                steps.append(caption_step)
                failed_pairs += [(int(p), f"caption {int(caption_index[p])} failed: {failed_captions[int(caption_index[p])]}")
                                 for p in chunk if int(caption_index[p]) in failed_captions]
                ready = [int(p) for p in chunk if int(caption_index[p]) not in failed_captions]
                steps.append(_pair_step(ready, failed_pairs, caption_index, image_index, captions, attributed_images,
                                        attributor.logit_scale, check, run, model, output))
                writes.submit_steps(steps)
                steps = []
                n_finished += len(ready) + len(failed_pairs)
                progress(PAIRS, n_finished, len(todo))


def _input_step(run: RunWriter, group: str, is_done: dict[str, np.ndarray], failed: list[tuple[int, str]],
                written: list[int], beside: list[Any], results: list[Contributions]) -> WriteStep:
    """The write of a summary run's attributed captions or images: those an earlier run finished are not
    rewritten (only attributed again, for their pending pairs)."""
    new = [k for k, index in enumerate(written) if not is_done[group][index]]
    indices = [written[k] for k in new]
    is_done[group][indices] = True
    write = run.write_captions if group == CAPTIONS else run.write_images
    return WriteStep(group, failed, indices, partial(write, indices, [beside[k] for k in new], [results[k] for k in new]))


def _chunk_captions(
    run: RunWriter, attributor: InteractionAttribution, texts: list[str], captions: np.ndarray, cache: _CaptionCache,
    failed_captions: dict[int, str], is_done: dict[str, np.ndarray], check: _FiniteCheck, batch_size: int,
) -> tuple[WriteStep, dict[int, Contributions]]:
    """The contributions of the ``captions`` a chunk needs, from the cache or attributed now (into the cache, or
    ``failed_captions``), and the write of those attributed or failed now. The chunk holds its own captions: the
    cache may drop some of them while it takes the others in."""
    held = {int(c): cache.get(int(c)) for c in np.unique(captions) if int(c) not in failed_captions}
    missing = [c for c, item in held.items() if item is None]
    failed: list[tuple[int, str]] = []
    written, beside, results = [], [], []
    for indices in _batches(np.asarray(missing, dtype=np.int64), batch_size):
        batch = _caption_batch(texts, indices)
        failed += batch.failed
        attributed = _attribute_captions(attributor, texts, batch.ready) if batch.ready else []
        for part, values in zip((written, beside, results), _checked(attributed, check, "caption", failed)):
            part += values
    for caption, result in zip(written, results):
        cache.put(caption, result)
        held[caption] = result
    failed_captions.update(failed)
    step = _input_step(run, CAPTIONS, is_done, failed, written, beside, results)
    return step, {c: item for c, item in held.items() if item is not None}


def _pair_step(
    ready: list[int], failed: list[tuple[int, str]], caption_index: np.ndarray, image_index: np.ndarray,
    captions: dict[int, Contributions], images: dict[int, Contributions], logit_scale: float, check: _FiniteCheck,
    run: RunWriter, model: DualEncoderAdapter, output: Any,
) -> WriteStep:
    """The maps of a chunk's ``ready`` pairs, each summarised and checked; the write of their numbers and
    summaries, and of the ``failed`` pairs."""
    caption_list = sorted({int(caption_index[p]) for p in ready})
    image_list = sorted({int(image_index[p]) for p in ready})
    rows = {c: k for k, c in enumerate(caption_list)}
    columns = {i: k for k, i in enumerate(image_list)}
    maps = interaction_maps([captions[c] for c in caption_list], [images[i] for i in image_list],
                            [(rows[int(caption_index[p])], columns[int(image_index[p])]) for p in ready],
                            logit_scale=logit_scale, block=SUMMARY_PAIR_CHUNK)
    written, _, results = _checked(((p, None, result) for p, result in zip(ready, maps)), check, "pair", failed)
    if not written:
        return WriteStep(PAIRS, failed, [], lambda: None)
    stacked = torch.nn.utils.rnn.pad_sequence([result.interactions for result in results], batch_first=True)
    summaries = summarise_maps(stacked, [result.interactions.shape[0] for result in results], model.patch_grid,
                               model.n_image_prefix, top_cells=output.top_cells, top_patches=output.top_patches)
    # the numbers only: the maps are not kept past this chunk
    numbers = [PairNumbers(**{f.name: getattr(result, f.name) for f in fields(PairNumbers)}) for result in results]
    return WriteStep(PAIRS, failed, written,
                     partial(run.write_pairs, written, numbers, [summaries.rows(k) for k in range(len(written))]))


def _batches(indices: np.ndarray, size: int) -> list[np.ndarray]:
    return [indices[i : i + size] for i in range(0, len(indices), size)]


class _FiniteCheck:
    """Says why a result must not be stored as done (NaN or inf in it). The model's weights are scanned for
    the cause once, at the first such result, not once per item."""

    def __init__(self, model: DualEncoderAdapter) -> None:
        self.model = model
        self._cause: str | None = None

    def __call__(self, result: Contributions | PairNumbers, what: str) -> str | None:
        if self.all_finite([result]):
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

    def all_finite(self, results: Sequence[Contributions | PairNumbers]) -> bool:
        """Whether every number of every result is finite: one check over the whole batch's tensors (a batch's
        results lie on one device), its Python numbers checked as such."""
        tensors = [array.reshape(-1) for result in results for array in _checked_tensors(result)]
        numbers = [result.completeness_error for result in results if type(result) is PairNumbers]  # a map's: from its tensors
        return all(math.isfinite(n) for n in numbers) and (not tensors or bool(torch.isfinite(torch.cat(tensors)).all()))


def _checked_tensors(result: Contributions | PairNumbers) -> tuple[torch.Tensor, ...]:
    if isinstance(result, Contributions):
        return result.values, result.embedding
    if isinstance(result, InteractionMap):
        return result.interactions, result.terms
    return (result.terms,)
