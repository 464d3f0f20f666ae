"""``xclip render``: figures of a run's finished pairs, read from its run file and written into a folder."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xclip.core.tokens import check_span
from xclip.errors import ConfigError
from xclip.show.content import figure_content, halfranges_of
from xclip.show.figures import FORMATS, FigureOptions, Layout, check_box_inside, draw_content, with_layout
from xclip.show.pairs import load_pair_view
from xclip.store.directory import FIGURES_FOLDER
from xclip.store.reader import RunReader
from xclip.store.schema import CAPTION_INDEX, DONE, IMAGE_INDEX, IMAGES, ORIGINAL_SIZE, PAIRS


@dataclass
class RenderReport:
    written: list[Path]
    skipped_without_span: int = 0  # pairs whose caption lacks the span (when no pairs were named)
    notes: list[str] = field(default_factory=list)  # the figures' warnings, "pair 3: ..."
    # of those, the ones about the pair's inputs (unknown words, a crop), which a run's summary also reports
    input_notes: list[str] = field(default_factory=list)
    # finished pairs after the last one drawn, left for the limit (with a span: not checked for it)
    n_beyond_limit: int = 0


def render_run(run_dir: str | Path, *, pairs: list[int] | None = None, span: str | None = None,
               box: tuple[float, float, float, float] | None = None, out: Path | None = None,
               options: FigureOptions | None = None, file_format: str = "png", limit: int = 100,
               data_root: Path | None = None, layout: Layout | None = None,
               progress: Callable[[int, int], None] | None = None) -> RenderReport:
    """Draw finished pairs of a run (also while it is still running) into ``out`` (default RUN_DIR/heatmaps).

    Named ``pairs`` must be finished, and hold the ``span``; otherwise the first ``limit`` finished pairs are
    drawn, skipping those whose caption lacks the span, and the report counts the pairs left beyond the limit
    (``n_beyond_limit``). ``data_root`` replaces the run's ``data.root`` when the images have moved since the
    run. ``layout`` (``"wide"`` or ``"column"``) replaces the options' layout. ``progress`` is called with the
    figures written and the number to write."""
    options = with_layout(options, layout)
    if limit < 1:
        msg = f"limit must be at least 1, got {limit}"
        raise ConfigError(msg, setting="limit")
    if file_format not in FORMATS:
        msg = f"file_format must be one of {', '.join(FORMATS)}, got {file_format!r}"
        raise ConfigError(msg, setting="file_format")
    with RunReader(run_dir) as run:
        run.require_contributions("drawing figures (xclip render)")
        out = out or run.path.parent / FIGURES_FOLDER
        candidates = _finished_pairs(run, pairs)
        report = RenderReport(written=[])
        if span is not None:
            check_span(span)
        if span is not None and not pairs:  # keep the pairs whose caption holds the span
            candidates, report.skipped_without_span, report.n_beyond_limit = _holding_span(run, candidates, span, limit)
        selected = candidates if pairs else candidates[:limit]
        report.n_beyond_limit += len(candidates) - len(selected)
        if box is not None:
            sizes, image_index = run.column(IMAGES, ORIGINAL_SIZE), run.column(PAIRS, IMAGE_INDEX)
            for index in selected:
                check_box_inside(box, tuple(int(v) for v in sizes[int(image_index[index])]), f"pair {index}")  # type: ignore[arg-type]
        root = run.data_root(data_root)
        views = [load_pair_view(run, index, root) for index in selected]
    contents = [figure_content(view, span, box, options.skip_words) for view in views]
    halfranges = None
    if options.scale == "run":  # one scale for every figure of this call: the largest value any of them shows
        ranges = [halfranges_of(content) for content in contents]
        halfranges = (max((r[0] for r in ranges), default=0.0), max((r[1] for r in ranges), default=0.0))
    for view, content in zip(views, contents):
        drawn = draw_content(view, content, options, halfranges)
        report.written.append(drawn.save(out / f"{drawn.name}.{file_format}"))
        if progress is not None:
            progress(len(report.written), len(views))
        report.notes += [f"{view.title}: {warning}" for warning in drawn.warnings]
        report.input_notes += [f"{view.title}: {warning}" for warning in drawn.input_warnings]
    return report


def _finished_pairs(run: RunReader, pairs: list[int] | None) -> list[int]:
    """The named ``pairs``, refused unless each is finished, or, with none named, every finished pair."""
    status = run.status(PAIRS)
    if not pairs:
        return [int(i) for i in np.flatnonzero(status == DONE)]
    for index in pairs:
        if not 0 <= index < len(status) or status[index] != DONE:
            msg = f"pair {index} is not a finished pair of {run.path} (it has {len(status)} pairs)"
            raise ConfigError(msg)
    return list(pairs)


def _holding_span(run: RunReader, candidates: list[int], span: str, limit: int) -> tuple[list[int], int, int]:
    """The first ``limit`` of ``candidates`` whose caption holds ``span``, the number passed over on the way for
    lacking it, and the number of candidates after the last one kept, left unread."""
    caption_index = run.column(PAIRS, CAPTION_INDEX)
    holds: dict[int, bool] = {}
    kept: list[int] = []
    skipped = beyond = 0
    for position, index in enumerate(candidates):
        c = int(caption_index[index])
        if c not in holds:
            try:
                run.caption_tokens(c).span_rows(span)
                holds[c] = True
            except ConfigError:
                holds[c] = False
        if holds[c]:
            kept.append(index)
        elif len(kept) < limit:
            skipped += 1
        if len(kept) == limit:  # the rest are counted, not read (a run's captions can be millions)
            beyond = len(candidates) - position - 1
            break
    if not kept and candidates:
        msg = f"no finished pair's caption holds the span {span!r} ({len(candidates)} finished pairs)"
        raise ConfigError(msg, setting="span")
    return kept, skipped, beyond


__all__ = ["RenderReport", "render_run"]
