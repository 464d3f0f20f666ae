"""One image and its captions to numbers and figures, without a config file (``xclip explain``).

It writes what ``xclip attribute`` would read: the image copied into ``OUTPUT/inputs/`` with a metadata file,
and ``OUTPUT/explain.yaml``; then it runs the same pipeline and draws the finished pairs. So the numbers are
those of an equivalent ``xclip attribute`` run, and ``OUTPUT`` is a run directory that ``render``, ``inspect``,
``evaluate`` and ``view`` read.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from xclip.config import load_config
from xclip.disk.archives import ArchiveMembers, MemberBytes, is_present
from xclip.errors import ConfigError
from xclip.core.geometry import check_image_resize
from xclip.attribution.inputs_read import input_notes
from xclip.store.describe import inputs_read_of_pair
from xclip.show.figures import FigureOptions
from xclip.show.render import render_run
from xclip.run.runner import Progress, RunSummary, run
from xclip.store.schema import CAPTION_INDEX, CAPTIONS, COMPLETENESS_ERROR, DONE, FAILED, FOUR_TERM_VALUE, IMAGES, MAP_ERROR_BOUND, PAIRS, SCORE
from xclip.store.reader import RunReader

_NUMBERS = (SCORE, FOUR_TERM_VALUE, COMPLETENESS_ERROR, MAP_ERROR_BOUND)  # the ExplainedPair fields read from the run file


@dataclass(frozen=True)
class ExplainedPair:
    caption: str
    score: float  # NaN where the pair failed
    four_term_value: float
    completeness_error: float
    map_error_bound: float  # relative to the map's own size; a figure notes a map whose bound passes the tolerance far
    figure: Path | None  # None where the pair failed
    error: str = ""
    # what the model read of the caption and image where it is less than given (truncation, unknown words, a crop)
    input_notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Explanation:
    run_directory: Path
    pairs: list[ExplainedPair]
    summary: RunSummary
    notes: list[str]  # what the figures note beyond the summary's warnings about inputs (clipped values, a zero map)


def explain(
    image: str | Path,
    captions: Sequence[str],
    *,
    output: Path,
    model: str | None = None,
    checkpoint: Path | None = None,
    device: str = "auto",
    dtype: str = "float32",
    image_resize: str = "native",
    figures: Path | None = None,
    options: FigureOptions | None = None,
    file_format: str = "png",
    overwrite: bool = False,
    on_progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Explanation:
    """Attribute ``image`` with each caption into the run directory ``output`` and draw each finished pair
    (per-word figures, into ``figures``, default ``output/heatmaps``). ``model``: a hub id or a local
    checkpoint; the shipped demo model (``xclip:demo``) when None. ``checkpoint``: a weights file for ``open_clip:ARCH``;
    ``image_resize``: how a non-square image becomes square (see :func:`xclip.load_model`)."""
    image = Path(image)
    if not is_present(image):  # a file, or a member of a tar or parquet file (part-00000.tar/000000001.jpg)
        msg = f"image {image} is not there"
        raise ConfigError(msg)
    if not captions:
        msg = "give at least one caption after the image"
        raise ConfigError(msg)
    check_image_resize(image_resize)  # before the config is written, so that the message names --resize
    inputs = output / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    copy = inputs / image.name
    with ArchiveMembers(max_open=1) as archives:
        source = archives.image(image)
        data = source.data if isinstance(source, MemberBytes) else source.read_bytes()
    if not copy.exists() or copy.read_bytes() != data:
        copy.write_bytes(data)  # the run directory keeps its input: it renders after the original moved
    metadata = inputs / "metadata.jsonl"
    metadata.write_text(json.dumps({"file_name": image.name, "text": list(captions)}, ensure_ascii=False) + "\n", encoding="utf-8")
    config = {
        "model": {"name": str(model) if model else "xclip:demo", "device": device, "dtype": dtype,
                  **({"checkpoint": str(Path(checkpoint).resolve())} if checkpoint else {})},
        "image": {"resize": image_resize},
        "data": {"format": "imagefolder", "root": "inputs", "metadata": "inputs/metadata.jsonl"},
        "output": {"directory": "."},
    }
    config_path = output / "explain.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    summary = run(load_config(config_path), overwrite=overwrite, on_progress=on_progress,
                  should_stop=should_stop or (lambda: False), command=f"xclip explain {image.name}")
    with RunReader(output) as stored:
        status = stored.status(PAIRS)
        texts = stored.captions()
        caption_index = stored.column(PAIRS, CAPTION_INDEX)
        errors = stored.errors(PAIRS, list(range(len(status))))
        # a pair's own error is cut short ("image 0 failed: ..."): a failed input's error is the whole reason
        image_error = stored.errors(IMAGES, [0])[0] if stored.status(IMAGES)[0] == FAILED else ""
        failed_captions = np.flatnonzero(stored.status(CAPTIONS) == FAILED).tolist()
        caption_errors = dict(zip(failed_captions, stored.errors(CAPTIONS, failed_captions)))
        columns = stored.finished_columns(PAIRS, _NUMBERS, status)  # NaN for unfinished pairs: they hold no results
        read = {p: input_notes(*inputs_read_of_pair(stored, p)) for p in np.flatnonzero(status == DONE).tolist()}
    numbers = np.stack([columns[name] for name in _NUMBERS], axis=1)
    finished = np.flatnonzero(status == DONE).tolist()
    report = render_run(output, pairs=finished, out=figures, options=options, file_format=file_format) if finished else None
    paths = dict(zip(finished, report.written if report else []))

    def error(p: int) -> str:  # about the user's file, not the run directory's copy of it
        if p in paths:
            return ""
        told = image_error or caption_errors.get(int(caption_index[p])) or errors[p]
        return (told or "not attributed: the run was interrupted").replace(str(copy), str(image))

    pairs = [ExplainedPair(texts[int(caption_index[p])], *numbers[p].tolist(), figure=paths.get(p), error=error(p),
                           input_notes=read.get(p, [])) for p in range(len(status))]
    return Explanation(run_directory=output, pairs=pairs, summary=summary, notes=[note for note in report.notes if note not in report.input_notes] if report else [])
