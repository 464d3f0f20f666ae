"""``xclip words``: an audit of every word of a run, without annotations.

Each finished pair's map is read as its per-token summary (:class:`xclip.attribution.summary.PairSummary`: each
token's value, and where its positive mass on the patches sits), so a run that stored contributions and one that
stored summaries only give the same audit. A caption's words are its character spans
(:meth:`xclip.core.tokens.CaptionTokens.words`), lower-cased; special tokens belong to none.

Per occurrence of a word in a pair:

- **share**: the sum of its tokens' values over the sum of the sizes of every position's value. Where every value
  is positive it is the share of the pair's score the word carries; it stays in [-1, 1] always (a pair whose
  values cancel to a score near 0 does not blow it up) and is negative where the word lowers the score;
- **top share**: the share of its positive mass on the patches that lies in its ``top_patches`` largest patches
  (1: those few patches hold it all; ``top_patches / n_patches``: spread evenly);
- **entropy** of its positive mass over the patches, over ``log(n_patches)`` (0: one patch; 1: spread evenly);
- **centroid** (row, column, in [0, 1] of the grid) and **spread** (RMS distance from the centroid) of that mass.

A word of several tokens takes its tokens' top share, entropy, centroid and spread weighted by the size of each
token's value (summaries keep tokens, not words; a word of one token, as in the demo world, is exact).
Occurrences whose tokens have no positive mass on the patches have no concentration or position: they are
counted apart (``without_mass``).

Per word, over the run: the count, the pairs it occurs in, the mean size of its share (**share**: how much of the
map it carries, either way), its mean signed share, the share of its occurrences in which it raises the score,
and the mean top share, entropy, centroid and spread; the standard deviation of its top share (how much its
concentration varies between images) and the **centroid dispersion** (RMS distance of its centroids from their
mean: how much where it points moves between images). Two lists flag candidates for words the model does not
ground, or grounds on something that merely comes with them:

- **most diffuse**: the highest mean entropy;
- **least consistent**: the most **cancelled share**, ``share - |signed share|``: a word that carries much of the
  map but raises the score in some images and lowers it in others (0 for a word whose sign never changes, and
  small for a word that carries little either way).

Each word names its best and worst occurrence (the highest and the lowest signed share: where it raises the score
most, and where it lowers it most or raises it least) with a viewer link.

While the pairs stream past in blocks only running sums per word are held, and the best and worst occurrence so
far: memory grows with the vocabulary, never with the number of pairs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xclip.analysis.summaries import save_chart
from xclip.attribution.summary import TokenSummary
from xclip.core.geometry import Preprocessing
from xclip.core.tokens import CaptionTokens
from xclip.disk.files import write_text_atomically
from xclip.errors import ConfigError
from xclip.show.links import view_link
from xclip.store.reader import RunReader
from xclip.store.schema import CAPTION_INDEX, DONE, IMAGE_INDEX, IMAGES, PAIRS, PATH, PREPROCESSING, STATUS

BLOCK_PAIRS = 1024  # rows of the run's pairs read at once: what memory holds of them
CAPTION_CACHE = 4096  # captions whose tokens are kept between pairs (an `all` run pairs a caption with many images)


@dataclass(frozen=True)
class WordOccurrence:
    """One word of one pair's caption, as the pair's map shows it (see the module's definitions)."""

    word: str  # lower-cased
    start: int  # its characters in the caption
    end: int
    share: float  # signed; NaN where the pair's map is 0 everywhere
    top_share: float  # NaN (as the four below) where its tokens have no positive mass on the patches
    entropy: float
    centroid_row: float
    centroid_column: float
    spread: float


def word_occurrences(tokens: CaptionTokens, token: TokenSummary) -> list[WordOccurrence]:
    """Every word of a caption with its share of the pair's map and where its tokens' positive mass sits.

    ``token``: the pair's summary per position, one entry per position of ``tokens``.
    """
    values = np.asarray(token.values, dtype=np.float64)
    if len(values) != len(tokens):
        msg = f"a summary of {len(values)} positions does not match a caption of {len(tokens)} positions"
        raise ValueError(msg)
    size = float(np.abs(values).sum())
    facts = np.column_stack([token.top_share, token.entropy, np.asarray(token.centroid).reshape(-1, 2), token.spread])
    found = []
    for word in tokens.words():
        rows = word.rows
        share = float(values[rows].sum()) / size if size > 0 else math.nan
        found.append(WordOccurrence(word.text.lower(), word.start, word.end, share, *_weighted_facts(facts[rows], values[rows])))
    return found


def _weighted_facts(facts: np.ndarray, values: np.ndarray) -> tuple[float, ...]:
    """The tokens' (top share, entropy, centroid row, centroid column, spread), each token weighted by the size of
    its value (equally where every value is 0); tokens without positive mass (NaN) left out; all NaN when none has."""
    massed = ~np.isnan(facts).any(axis=1)
    if not massed.any():
        return (math.nan,) * facts.shape[1]
    weights = np.abs(values[massed])
    weights = weights if weights.sum() > 0 else np.ones_like(weights)
    return tuple(float(v) for v in weights @ facts[massed] / weights.sum())


@dataclass(frozen=True)
class Occurrence:
    """A word's occurrence picked out as its best or worst."""

    pair: int
    caption: str
    image: str  # as the run names it
    start: int  # the word's characters in the caption
    end: int
    share: float  # signed
    top_share: float  # NaN: no positive mass on the patches
    link: str  # the viewer's address of the pair with the word selected (see xclip.show.links.view_link)


@dataclass(frozen=True)
class WordStats:
    """One word over a run: means over its occurrences (concentration and position over those with mass)."""

    word: str
    count: int  # occurrences
    pairs: int  # pairs whose caption holds it (the images it was shown with, in a run of given pairs)
    without_mass: int  # occurrences whose tokens have no positive mass on the patches
    share: float  # mean size of the share: how much of the map it carries, either way
    signed_share: float
    raises_score: float  # the share of its occurrences whose share is positive
    top_share: float
    top_share_std: float  # 0 when its maps are as concentrated in every image
    entropy: float
    centroid: tuple[float, float]  # (row, column) in [0, 1] of the grid
    spread: float
    centroid_dispersion: float  # RMS distance of its occurrences' centroids from their mean
    best: Occurrence  # the highest signed share
    worst: Occurrence  # the lowest

    @property
    def cancelled_share(self) -> float:
        """The share its occurrences cancel: ``share - |signed share|`` (0 when its sign never changes)."""
        return self.share - abs(self.signed_share)


@dataclass(frozen=True)
class WordAudit:
    """What ``xclip words`` found in a run."""

    run: str  # the run file
    n_pairs: int  # finished pairs read
    n_patches: int
    top_patches: int  # the patches a top share counts
    min_count: int  # words with fewer occurrences are left out of ``words``
    n_words: int  # distinct words met, before ``min_count``
    words: list[WordStats]  # most frequent first
    most_diffuse: list[str]  # highest mean entropy first
    least_consistent: list[str]  # most cancelled share first

    @property
    def uniform_top_share(self) -> float:
        """The top share of a map spread evenly over the patches: concentration's floor."""
        return self.top_patches / self.n_patches

    def word(self, text: str) -> WordStats:
        """The statistics of one word (as lower-cased)."""
        return next(stats for stats in self.words if stats.word == text)

    def record(self) -> dict[str, Any]:
        """``words.json``: the audit, each word with its cancelled share, NaN written as null."""
        record = asdict(self)
        record["uniform_top_share"] = self.uniform_top_share
        for entry, stats in zip(record["words"], self.words):
            entry["cancelled_share"] = stats.cancelled_share
        return _nan_to_none(record)


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _nan_to_none(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    return value


# an occurrence as WordTally folds it in: a row of floats, these columns
_WORD, _PAIR, _CAPTION, _START, _END, _SHARE, _TOP, _ENTROPY, _ROW, _COLUMN, _SPREAD = range(11)
# and what is kept of the best and worst: the signed share first (what they are ranked by)
_KEPT = [_SHARE, _PAIR, _CAPTION, _START, _END, _TOP]


class WordTally:
    """Running sums per word over blocks of pairs, and each word's best and worst occurrence so far.

    :meth:`add` folds a block in and keeps nothing of it: memory grows with the vocabulary, not with the pairs.
    """

    SUMS = ("count", "pairs", "with_share", "share", "size", "raises", "with_mass", "top", "top_squared", "entropy",
            "row", "column", "centroid_squared", "spread")

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.sums = {name: np.zeros(0) for name in self.SUMS}
        self.extremes = {kind: np.full((0, len(_KEPT)), np.nan) for kind in ("best", "worst")}

    def _grow(self) -> None:
        size, needed = len(self.sums["count"]), len(self.ids)
        if needed <= size:
            return
        new = max(needed, 2 * size, 64)
        self.sums = {name: np.concatenate([values, np.zeros(new - size)]) for name, values in self.sums.items()}
        self.extremes = {kind: np.concatenate([values, np.full((new - size, len(_KEPT)), np.nan)])
                         for kind, values in self.extremes.items()}

    def add(self, pairs: Sequence[int], captions: Sequence[int], occurrences: Sequence[Sequence[WordOccurrence]]) -> None:
        """Fold in a block: ``occurrences[k]`` are the words of pair ``pairs[k]``, whose caption is row ``captions[k]``."""
        rows = [(self.ids.setdefault(o.word, len(self.ids)), pair, caption, o.start, o.end, o.share, o.top_share,
                 o.entropy, o.centroid_row, o.centroid_column, o.spread)
                for pair, caption, found in zip(pairs, captions, occurrences) for o in found]
        self._grow()
        if not rows:
            return
        table = np.array(rows, dtype=np.float64)
        word = table[:, _WORD].astype(np.int64)
        share, top = table[:, _SHARE], table[:, _TOP]
        row, column = table[:, _ROW], table[:, _COLUMN]
        n_words = len(self.sums["count"])

        def add(name: str, values: np.ndarray | float, where: np.ndarray) -> None:
            weights = np.broadcast_to(values, word.shape)[where]
            self.sums[name] += np.bincount(word[where], weights=weights, minlength=n_words)

        every = np.ones(len(word), dtype=bool)
        add("count", 1.0, every)
        first_in_pair = np.zeros(len(word), dtype=bool)  # a word twice in a caption is one pair
        first_in_pair[np.unique(table[:, [_WORD, _PAIR]], axis=0, return_index=True)[1]] = True
        add("pairs", 1.0, first_in_pair)
        finite = np.isfinite(share)
        add("with_share", 1.0, finite)
        add("share", share, finite)
        add("size", np.abs(share), finite)
        add("raises", (share > 0).astype(np.float64), finite)
        massed = np.isfinite(top)
        for name, values in (("with_mass", 1.0), ("top", top), ("top_squared", top**2), ("entropy", table[:, _ENTROPY]),
                             ("row", row), ("column", column), ("centroid_squared", row**2 + column**2),
                             ("spread", table[:, _SPREAD])):
            add(name, values, massed)
        self._keep_extremes(word[finite], table[finite][:, _KEPT])

    def _keep_extremes(self, word: np.ndarray, candidates: np.ndarray) -> None:
        """Each word's highest and lowest signed share among ``candidates`` (rows of :data:`_KEPT`) against those kept
        so far; on a tie the earlier pair stays."""
        for kind, sign in (("best", -1.0), ("worst", 1.0)):
            order = np.lexsort((candidates[:, 1], sign * candidates[:, 0], word))
            first = order[np.r_[True, word[order][1:] != word[order][:-1]]]  # each word's first in that order
            kept = self.extremes[kind][word[first]]
            challenger = candidates[first]
            better = np.isnan(kept[:, 0]) | (sign * challenger[:, 0] < sign * kept[:, 0])
            self.extremes[kind][word[first][better]] = challenger[better]

    def stats(self) -> dict[str, dict[str, Any]]:
        """Each word's statistics: the fields of :class:`WordStats`, its best and worst as rows of :data:`_KEPT`."""
        s = self.sums
        with np.errstate(invalid="ignore", divide="ignore"):  # NaN for a word with no share or no mass
            top = s["top"] / s["with_mass"]
            row, column = s["row"] / s["with_mass"], s["column"] / s["with_mass"]
            means = {
                "share": s["size"] / s["with_share"], "signed_share": s["share"] / s["with_share"],
                "raises_score": s["raises"] / s["with_share"], "top_share": top,
                "top_share_std": np.sqrt(np.maximum(s["top_squared"] / s["with_mass"] - top**2, 0)),
                "entropy": s["entropy"] / s["with_mass"], "spread": s["spread"] / s["with_mass"],
                "centroid_dispersion": np.sqrt(np.maximum(s["centroid_squared"] / s["with_mass"] - row**2 - column**2, 0)),
            }
        return {
            word: {
                "count": int(s["count"][k]), "pairs": int(s["pairs"][k]), "without_mass": int(s["count"][k] - s["with_mass"][k]),
                **{name: float(values[k]) for name, values in means.items()},
                "centroid": (float(row[k]), float(column[k])),
                "best": self.extremes["best"][k], "worst": self.extremes["worst"][k],
            }
            for word, k in self.ids.items()
        }


def audit_words(run_dir: str | Path, *, min_count: int = 5, flagged: int = 8,
                progress: Callable[[int, int], None] | None = None) -> WordAudit:
    """Every word of the run's finished pairs (see the module's definitions): those that occur ``min_count`` times
    or more, and the ``flagged`` most diffuse and least consistent of them. ``progress(done, total)`` after each
    block of pairs.

    Raises:
        ConfigError: the run has no finished pair, or no word occurs ``min_count`` times.
    """
    with RunReader(run_dir) as reader:
        tally = WordTally()
        cache: dict[int, CaptionTokens] = {}
        n_rows, n_finished = reader.n_items(PAIRS), 0
        # a block of the run's rows at a time, its status and indices too: nothing is read whole
        for start in range(0, n_rows, BLOCK_PAIRS):
            rows = np.arange(start, min(start + BLOCK_PAIRS, n_rows))
            block = rows[reader.values(PAIRS, STATUS, rows) == DONE]
            if len(block):
                captions = [int(c) for c in reader.values(PAIRS, CAPTION_INDEX, block)]
                _read_captions(reader, cache, captions)
                found = [word_occurrences(cache[caption], summary.token)
                         for caption, summary in zip(captions, reader.pair_summaries(block))]
                tally.add(block, captions, found)
                n_finished += len(block)
            if progress is not None:
                progress(int(rows[-1]) + 1, n_rows)
        if not n_finished:
            msg = (f"{reader.path} has no finished pairs, so there are no maps to audit yet: attribute its pairs first "
                   "(a run still being written is audited on the pairs finished so far)")
            raise ConfigError(msg)
        counted = tally.stats()
        kept = {word: stats for word, stats in counted.items() if stats["count"] >= min_count}
        if not kept:
            most = max((stats["count"] for stats in counted.values()), default=0)
            msg = (f"no word of {reader.path} occurs {min_count} times or more in its {n_finished} finished pairs "
                   f"(the most frequent {most} times): lower it")
            raise ConfigError(msg, setting="min_count")
        ordered = sorted(kept.items(), key=lambda item: (-item[1]["count"], item[0]))
        picked = _occurrences(reader, [stats[kind] for _, stats in ordered for kind in ("best", "worst")])
        words = [WordStats(word=word, **{key: value for key, value in stats.items() if key not in ("best", "worst")},
                           best=best, worst=worst) for (word, stats), best, worst in zip(ordered, picked[::2], picked[1::2])]
        return WordAudit(str(reader.path), n_finished, reader.grid[0] * reader.grid[1], reader.settings.output.top_patches,
                         min_count, len(counted), words, most_diffuse(words, flagged), least_consistent(words, flagged))


def most_diffuse(words: Sequence[WordStats], n: int) -> list[str]:
    """The ``n`` words whose maps are spread widest: the highest mean entropy (then the lowest top share)."""
    ranked = [w for w in words if not math.isnan(w.entropy)]
    return [w.word for w in sorted(ranked, key=lambda w: (-w.entropy, w.top_share, w.word))[:n]]


def least_consistent(words: Sequence[WordStats], n: int) -> list[str]:
    """The ``n`` words with the most cancelled share: much of the map carried, in both directions."""
    ranked = [w for w in words if not math.isnan(w.share)]
    return [w.word for w in sorted(ranked, key=lambda w: (-w.cancelled_share, w.word))[:n]]


def _read_captions(reader: RunReader, cache: dict[int, CaptionTokens], captions: Sequence[int]) -> None:
    """Put the tokens of ``captions`` in ``cache`` (one read of those it lacks), dropping the captions read first
    among those not needed now until at most :data:`CAPTION_CACHE` others remain."""
    needed = set(captions)
    spare = [caption for caption in cache if caption not in needed]  # oldest first: an `all` run's pairs of one caption lie together
    for caption in spare[: max(0, len(spare) - CAPTION_CACHE)]:
        del cache[caption]
    missing = sorted(needed - set(cache))
    cache.update(zip(missing, reader.captions_tokens(missing)))


def _occurrences(reader: RunReader, kept: Sequence[np.ndarray]) -> list[Occurrence]:
    """Kept rows (:data:`_KEPT`) as occurrences with their links: their captions and images read at once."""
    rows = np.array(kept)
    pairs, captions, starts, ends = (rows[:, k].astype(np.int64) for k in range(1, 5))
    images = reader.values(PAIRS, IMAGE_INDEX, pairs)
    tokens = reader.captions_tokens(captions)
    paths = reader.values(IMAGES, PATH, images, text=True)
    geometry = [Preprocessing.from_row(row) for row in reader.values(IMAGES, PREPROCESSING, images)]
    return [Occurrence(int(pair), found.caption, str(path), int(start), int(end), float(row[0]), float(row[5]),
                       view_link(int(pair), found, where, span=(int(start), int(end))))
            for row, pair, found, path, where, start, end in zip(rows, pairs, tokens, paths, geometry, starts, ends)]


def write_words_report(audit: WordAudit, folder: Path) -> list[Path]:
    """``words.json`` and ``words.png`` (:func:`words_chart`) in ``folder``: the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    report = write_text_atomically(folder / "words.json", json.dumps(audit.record(), indent=2) + "\n")
    return [report, save_chart(words_chart(audit), folder / "words.png")]


def words_chart(audit: WordAudit, *, labelled: int = 40) -> Any:
    """Each word as a point: the share of the map it carries (x, log scale) against its mean top share (y, 0 to 1),
    a whisker of one standard deviation of the top share through it; the flagged words coloured, the ``labelled``
    most frequent and every flagged word named; a dotted line at the top share of a map spread evenly."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 5.5), layout="constrained")
    axes = figure.add_subplot()
    diffuse, inconsistent = set(audit.most_diffuse), set(audit.least_consistent)
    named = {w.word for w in audit.words[:labelled]} | diffuse | inconsistent
    groups = {  # a word in both lists is drawn as inconsistent: its share, the x axis, says more
        "least consistent": ("#b2182b", lambda w: w.word in inconsistent),
        "most diffuse": ("#ef8a62", lambda w: w.word in diffuse - inconsistent),
        "other words": ("#2166ac", lambda w: w.word not in diffuse | inconsistent),
    }
    plotted = [w for w in audit.words if w.share > 0 and not math.isnan(w.top_share)]
    for label, (colour, member) in groups.items():
        chosen = [w for w in plotted if member(w)]
        if not chosen:
            continue
        x, y = np.array([w.share for w in chosen]), np.array([w.top_share for w in chosen])
        axes.errorbar(x, y, yerr=[w.top_share_std for w in chosen], fmt="o", color=colour, ecolor=colour, alpha=0.8,
                      elinewidth=0.8, capsize=0, markersize=4, label=f"{label} ({len(chosen)})")
        for word, xi, yi in zip(chosen, x, y):
            if word.word in named:
                axes.annotate(word.word, (xi, yi), xytext=(3, 3), textcoords="offset points", fontsize=7)
    axes.axhline(audit.uniform_top_share, color="black", linestyle=":", linewidth=1,
                 label=f"a map spread evenly ({audit.top_patches} of {audit.n_patches} patches)")
    axes.set_xscale("log")
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("share of the map the word carries, either sign: mean over its pairs of\n"
                    "|its tokens' values| / Σ |every position's value| (log scale)")
    axes.set_ylabel(f"share of its positive mass in its top {audit.top_patches} patches, mean\n(whisker: ± 1 SD over its occurrences)")
    left_out = len(audit.words) - len(plotted)
    title = f"{len(audit.words)} words of {audit.n_pairs} pairs, each at least {audit.min_count} times"
    axes.set_title(title + (f" ({left_out} with no share or no mass not drawn)" if left_out else ""), fontsize=9)
    axes.legend(loc="lower left", fontsize="small", frameon=False)
    return figure
