"""What the commands show on the console: their tables, fitted to the terminal's width, and the warnings about
results that mean less than they seem. Results go to stdout; progress, warnings and errors to stderr."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from xclip.analysis.grounding import Evaluation
    from xclip.analysis.words import WordAudit
    from xclip.attribution.panels import Calibration
    from xclip.run.explain import ExplainedPair
    from xclip.run.runner import RunSummary
    from xclip.run.workers import WorkerResult

INEXACT_PAIR_HINT = (
    "For exact maps of these pairs, attribute their captions and images again with a tighter "
    "attribution.tolerance (the bound shrinks in proportion)"
)
NOT_CONVERGED_HINT = (
    "raise attribution.max_steps or loosen attribution.tolerance; in float32 the relative error stops between "
    "about 3e-7 and 5e-6 (demo model), so tolerances below 1e-5 may need model.dtype float64"
)

stderr = Console(stderr=True)


def print_table(console: Console, table: Table) -> None:
    """Print ``table`` at the console's width: a cell may wrap at its spaces, but each column is at least as wide
    as its longest word (a number, an interval's end, ``n=12``, a header's word), so nothing is cut or folded.

    Rich's own shrinking can squeeze a column below that and then crop the table, so the widths are set here:
    each column its longest word, and the room left shared in proportion to what each column would need for its
    longest line. Where even the longest words do not fit between the box's lines, the lines go."""
    columns = table.columns
    texts = [[Text.from_markup(str(cell)).plain for cell in column.cells] for column in columns]
    headers = [Text.from_markup(str(column.header)).plain for column in columns]
    least = [max((len(word) for cell in [header, *cells] for word in cell.split()), default=1)
             for header, cells in zip(headers, texts)]
    most = [max(len(line) for cell in [header, *cells] for line in (cell.splitlines() or [""])) for header, cells in zip(headers, texts)]
    padding = sum(table.padding[1] + table.padding[3] for _ in columns)

    def room(has_lines: bool) -> int:  # the cells' width: the console's less padding and the box's lines
        return console.width - padding - (len(columns) + 1 if has_lines else len(columns) - 1)

    if sum(most) > room(table.box is not None):
        if sum(least) > room(True):
            table.box, table.show_edge = box.SIMPLE_HEAD, False
        spare = max(0, room(table.box is not None and table.show_edge) - sum(least))
        wanted = [m - w for m, w in zip(most, least)]
        shares = [spare * want // max(1, sum(wanted)) for want in wanted]
        for column, width, share in zip(columns, least, shares):
            column.width = width + share
    console.print(table)


# --- attribute -----------------------------------------------------------------------------------------------
def run_summary(summary: RunSummary) -> dict[str, Any]:
    """The numbers of a finished ``xclip attribute``, as its JSON and its table show them."""
    accuracy = summary.accuracy
    return {
        "directory": str(summary.directory),
        "pairs": summary.n_pairs,
        "done": summary.n_done,
        "skipped": summary.n_skipped,
        "failed": summary.n_failed,
        "rejected_records": summary.n_rejected,
        "truncated_captions": summary.n_truncated,
        "changed_images": len(summary.changed_images),
        "captions_with_unknown_words": summary.unknown_words["captions"],
        "cropped_images": len(summary.cropped_images["images"]),
        "not_converged": len(accuracy["not_converged"]),
        "inexact_pair_maps": len(accuracy["pairs"]["inexact"]),
        "mean_nodes_per_caption": accuracy["captions"]["nodes_mean"],
        "mean_nodes_per_image": accuracy["images"]["nodes_mean"],
        "median_relative_completeness_error": accuracy["pairs"]["relative_error_median"],
        "max_relative_completeness_error": accuracy["pairs"]["relative_error_max"],
        "seconds": round(summary.seconds, 3),
        "pairs_per_second": round(summary.pairs_per_second, 3),
        "interrupted": summary.is_interrupted,
    }


def print_run_summary(result: dict[str, Any]) -> None:
    """:func:`run_summary` as a table on stderr."""
    table = Table(title="xclip attribute", show_header=False)
    for key, value in result.items():
        table.add_row(key.replace("_", " "), _summary_cell(value))
    stderr.print(table)


def print_run_warnings(summary: RunSummary, verbose: bool) -> None:
    """On stderr, also with --quiet (cron and Slurm logs must say it): the failures, the images attributed again
    because their files changed, the inputs the model read in part, and the maps not to be trusted; the first
    five of each unless ``verbose``."""
    limit = None if verbose else 5
    accuracy = summary.accuracy
    for failure in summary.failures[:limit]:
        stderr.print(f"[red]failed[/] {escape(failure)}", soft_wrap=True)
    if len(summary.failures) > 5 and not verbose:
        stderr.print(f"... and {len(summary.failures) - 5} more (--verbose lists all, `xclip inspect` too)")
    if summary.changed_images:  # results of the old files were replaced
        shown = ", ".join(summary.changed_images[:limit])
        more = f" and {len(summary.changed_images) - 5} more" if len(summary.changed_images) > 5 and not verbose else ""
        stderr.print(f"[yellow]attributed again: {len(summary.changed_images)} image(s) whose files changed since they "
                     f"were attributed[/] ({escape(shown)}{more})", soft_wrap=True)
    print_input_warnings(stderr, summary.unknown_words, summary.cropped_images, limit=limit)
    if summary.n_truncated:
        stderr.print(f"[yellow]{summary.n_truncated} caption(s) are longer than the model's context[/]: their maps cover the tokens it reads (captions/is_truncated in the run file)")
    if accuracy["not_converged"]:  # finished results, but not to be trusted
        _print_not_converged(stderr, accuracy, limit=limit)
    _print_inexact_pairs(stderr, accuracy, limit=limit)


def describe_worker_end(worker: WorkerResult) -> str:
    """How a worker of ``attribute --devices`` that did not finish its shard ended, in words."""
    code = worker.exit_code
    if code < 0:  # Popen's code of a process that a signal ended
        import signal

        ending = f"killed by {signal.Signals(-code).name}" if -code in signal.valid_signals() else f"killed by signal {-code}"
    else:
        ending = f"exit {code}"
    said = f": {worker.last_message}" if worker.last_message and worker.outcome != "interrupted" else ""
    return f"{worker.outcome} ({ending}){said}"


# --- calibrate -----------------------------------------------------------------------------------------------
def print_calibration(model_name: str, calibration: Calibration) -> None:
    """Each tower's calibrated breakpoints and the passes they cost against the default layout's."""
    table = Table("tower", "breakpoints", "inputs", "default layout: mean / max passes", "calibrated: mean / max passes",
                  title=f"xclip calibrate {escape(model_name)}")
    for tower in ("text", "image"):
        measured = calibration.measured[tower]
        breakpoints = ", ".join(f"{b:g}" for b in getattr(calibration, tower))
        table.add_row(tower, breakpoints, str(measured["inputs"]),
                      f"{measured['default_passes_mean']:.1f} / {measured['default_passes_max']}",
                      f"{measured['passes_mean']:.1f} / {measured['passes_max']}")
    print_table(Console(), table)


# --- explain -------------------------------------------------------------------------------------------------
def explained_rows(pairs: list[ExplainedPair]) -> list[dict[str, Any]]:
    """The pairs of ``xclip explain`` as its JSON lists them."""
    return [{"caption": p.caption, "score": p.score, "four_term_value": p.four_term_value,
             "completeness_error": p.completeness_error, "map_error_bound": p.map_error_bound,
             "figure": str(p.figure) if p.figure else None, "error": p.error, "input_notes": p.input_notes}
            for p in pairs]


def print_explained(image: Path, pairs: list[ExplainedPair]) -> None:
    """The finished pairs as a table; failures as a list below it, one line per distinct problem with the
    captions it hit (a bad image fails every caption the same way)."""
    finished = [p for p in pairs if p.figure is not None]
    if finished:
        # the figures share a folder: named once below, so that the table keeps to the terminal's width
        folders = {Path(p.figure).parent for p in finished}
        table = Table(title=f"xclip explain {image.name}")
        for column in ("caption", "score", "four-term value", "completeness error", "map error bound", "figure"):
            table.add_column(column)
        for p in finished:
            figure = Path(p.figure).name if len(folders) == 1 else str(p.figure)
            table.add_row(escape(p.caption), f"{p.score:.4f}", f"{p.four_term_value:.4f}",
                          f"{p.completeness_error:.2e}", f"{p.map_error_bound:.2e}", figure)
        console = Console()
        print_table(console, table)
        if len(folders) == 1:
            console.print(f"figures in {escape(str(folders.pop()))}", soft_wrap=True)
    problems: dict[str, list[str]] = {}
    for p in pairs:
        if p.figure is None:
            problems.setdefault(p.error, []).append(p.caption)
    for problem, captions in problems.items():
        quoted = ", ".join(f"“{caption}”" for caption in captions)
        print(f"failed ({len(captions)} caption{'s' * (len(captions) != 1)}: {quoted}): {problem}")


# --- inspect -------------------------------------------------------------------------------------------------
def print_run_description(report: dict[str, Any], top: int) -> None:
    """What :func:`xclip.store.describe.describe_run` found: counts, accuracy, the ``top`` pairs by score,
    failures and the inputs the model read in part."""
    console = Console()
    console.print(f"[bold]{report['file']}[/]  model {report['model']}  created {report['created']}")
    if not report["stores_contributions"]:
        console.print("this run keeps each pair's numbers and summary only (output.contributions: none): no maps or "
                      "figures; attribute chosen pairs again with output.contributions=store to draw them", soft_wrap=True)
    counts = Table("group", "total", "done", "failed", "pending", title="items")
    for group, c in report["counts"].items():
        counts.add_row(group, *(str(c[k]) for k in ("total", "done", "failed", "pending")))
    console.print(counts)
    if report["rejected_records"]:
        console.print(f"[red]{len(report['rejected_records'])} record(s) of the data files rejected[/] (listed below as failed records)")
    _print_accuracy(console, report["accuracy"])
    ranked = Table("pair", "score", "caption", "image", "relative completeness error", title=f"top {top} pairs by score")
    scored = (p for p in report["pairs"] if p["status"] == "done" and p["score"] is not None)
    for row in sorted(scored, key=lambda p: -p["score"])[:top]:
        ranked.add_row(str(row["index"]), f"{row['score']:.4f}", row["caption"], row["image"], _number(row["relative_completeness_error"]))
    console.print(ranked)
    for failure in report["failures"]:
        console.print(f"[red]failed[/] {escape(failure)}", soft_wrap=True)
    print_input_warnings(console, report["unknown_words"], report["cropped_images"], limit=None,
                         truncated_captions=report["truncated_captions"])
    if report["accuracy"]["not_converged"]:
        _print_not_converged(console, report["accuracy"], limit=None)


def print_input_warnings(console: Console, unknown_words: dict[str, Any], cropped_images: dict[str, Any], *,
                         limit: int | None, pad: str = "image.resize: pad", truncated_captions: Sequence[dict[str, Any]] = ()) -> None:
    """Captions cut at the model's context, each word unknown to the tokenizer once, with its captions, and the
    images a crop cut most of (see xclip.store.describe.describe_inputs_read): finished results that mean less than
    they seem."""
    for item in truncated_captions[:limit]:
        console.print(f"[yellow]warning[/]: caption {item['index']} is longer than the model's context: it read the first "
                      f"{item['n_tokens_read']} tokens ({item['n_words_read']} of {item['n_words']} words); the rest, "
                      f"{escape(repr(item['unread']))}, is in no map", soft_wrap=True)
    if limit is not None and len(truncated_captions) > limit:
        console.print(f"... and {len(truncated_captions) - limit} more truncated captions (`xclip inspect` lists all)")
    words = list(unknown_words["words"].items())
    for word, n_captions in words[:limit]:
        console.print(f"[yellow]warning[/]: {escape(repr(word))} is unknown to the tokenizer ({n_captions} caption"
                      f"{'s' * (n_captions != 1)}): its maps show the unknown token, not the word", soft_wrap=True)
    if limit is not None and len(words) > limit:
        console.print(f"... and {len(words) - limit} more unknown words (`xclip inspect` lists all)")
    if unknown_words["searched"] < unknown_words["captions"]:
        console.print(f"(words looked up in {unknown_words['searched']} of the {unknown_words['captions']} captions with unknown tokens)")
    cropped = cropped_images["images"]
    if cropped:
        share = cropped_images["threshold"]
        console.print(f"[yellow]warning[/]: the preprocessing cut more than {share:.0%} of {len(cropped)} image(s) away; "
                      f"boxes and objects there are not in the maps ({pad} keeps the whole image)", soft_wrap=True)
        for item in cropped[:limit]:
            console.print(f"  {escape(item['image'])}: the model saw {item['seen_share']:.0%} of it", soft_wrap=True)
        if limit is not None and len(cropped) > limit:
            console.print(f"  ... and {len(cropped) - limit} more (`xclip inspect` lists all)")


def _print_accuracy(console: Console, accuracy: dict[str, Any]) -> None:
    """Quadrature settings, nodes and completeness errors of inputs and pairs (see describe_accuracy)."""
    if accuracy["n_steps"] is None:
        rule = f"adaptive to a relative completeness error of {accuracy['tolerance']:g} per input (at most {accuracy['max_steps']} nodes)"
    else:
        checked = f", checked against {accuracy['tolerance']:g}" if accuracy["tolerance"] is not None else ""
        rule = f"fixed, {accuracy['n_steps']} nodes{checked}"
    layout = accuracy["panel_layout"]
    if accuracy["n_steps"] is None:
        where = "calibrated, " + escape(layout["source"]) if layout["source"] != "default" else "default"
        rule += f"; first panels end at text {', '.join(f'{b:g}' for b in layout['text'])}, images {', '.join(f'{b:g}' for b in layout['image'])} ({where})"
    console.print(f"quadrature: {rule}", soft_wrap=True)
    table = Table("inputs", "done", "mean nodes", "max nodes", "median error", "max error", "max map error bound", "missed",
                  title="relative completeness error per input, |sum C - (g(x) - g(r))| / |g(x) - g(r)|")
    for group in ("captions", "images"):
        stats = accuracy[group]
        table.add_row(group, str(stats["done"]), _number(stats["nodes_mean"], ".1f"), _number(stats["nodes_max"], ".0f"),
                      _number(stats["relative_error_median"]), _number(stats["relative_error_max"]),
                      _number(stats["map_error_bound_max"]) if accuracy["n_steps"] is None else "-", str(stats["not_converged"]))
    print_table(console, table)  # at the terminal's width; numbers are never cut, also in an 80-column log
    pairs = accuracy["pairs"]
    console.print(
        f"completeness per pair, relative to |g(x_a) - g(r_a)| |g(x_b) - g(r_b)| (the largest the four-term value "
        f"can be): median {_number(pairs['relative_error_median'])}, max {_number(pairs['relative_error_max'])}; "
        f"absolute error max {_number(pairs['error_max'])}, its bound from the inputs' errors max {_number(pairs['bound_max'])}"
    )
    if pairs["map_error_bound_max"] is not None:
        console.print(f"map error bound per pair, relative to the pair map's own size: median "
                      f"{_number(pairs['map_error_bound_median'])}, max {_number(pairs['map_error_bound_max'])}")
    _print_inexact_pairs(console, accuracy, limit=None)


def _print_inexact_pairs(console: Console, accuracy: dict[str, Any], limit: int | None) -> None:
    """Pairs whose map error bound passes the tolerance many times (result.is_inexact_pair), with the reason and the
    remedy."""
    over = accuracy["pairs"]["inexact"]
    if not over:
        return
    factor = accuracy["pairs"]["inexact_factor"]
    console.print(f"[yellow]{len(over)} pair map(s) may be off by more than {factor:g} x the tolerance "
                  f"{accuracy['tolerance']:g}[/] relative to their own size: the map is small next to its two inputs' "
                  "contributions, so their "
                  "errors weigh more in it. " + INEXACT_PAIR_HINT, soft_wrap=True)
    for pair in over[:limit]:
        console.print(f"  pair {pair['index']} ({escape(pair['caption'])} | {escape(pair['image'])}): "
                      f"map error bound {_number(pair['map_error_bound'])}", soft_wrap=True)
    if limit is not None and len(over) > limit:
        console.print(f"  ... and {len(over) - limit} more (--verbose or `xclip inspect` lists all)")


def _print_not_converged(console: Console, accuracy: dict[str, Any], limit: int | None) -> None:
    """The inputs that missed the tolerance: their maps are finished but flagged; and how to settle it."""
    missed = accuracy["not_converged"]
    tolerance = accuracy["tolerance"]
    console.print(f"[yellow]{len(missed)} input(s) missed the tolerance {tolerance:g}[/] (completeness error or map "
                  "error bound); their maps are written but flagged (is_converged = false):")
    for item in missed[:limit]:
        console.print(f"  {item['group'][:-1]} {item['index']} ({item['item']}): {item['n_nodes']} nodes, "
                      f"relative error {item['relative_completeness_error']:.2e}, map error bound {_number(item['map_error_bound'])}")
    if limit is not None and len(missed) > limit:
        console.print(f"  ... and {len(missed) - limit} more (--verbose or `xclip inspect` lists all)")
    console.print(f"  to settle it: {NOT_CONVERGED_HINT}")


# --- evaluate and compare ------------------------------------------------------------------------------------
def print_grounding(report: dict[str, Any]) -> None:
    """The grounding metrics per class, one table a direction: three metric columns fit 100 terminal columns."""
    from xclip.analysis.grounding import DIRECTIONS, METRICS

    for direction in DIRECTIONS:
        table = Table("class", *(m.replace("_", " ") for m in METRICS),
                      title=f"grounding, {direction.replace('_to_', ' → ')}: mean [95% CI] n (chance)")
        for label, stats in [("overall", report["overall"]), *report["per_class"].items()]:
            table.add_row(escape(label), *(_metric_cell(stats[f"{direction}/{m}"]) for m in METRICS))
        print_table(Console(), table)


def print_left_out(evaluation: Evaluation, annotations: Path) -> None:
    """A warning with the count and the first 5 of the phrases and boxes evaluate could not score, and the
    count of boxes partly outside what the model saw."""
    from xclip.analysis.grounding import left_out_lines

    n_unmatched, n_skipped = len(evaluation.unmatched_phrases), len(evaluation.skipped_boxes)
    if n_unmatched:
        stderr.print(f"[yellow]warning[/]: {n_unmatched} annotated phrase(s) of {escape(str(annotations))} were not scored: "
                     "no finished pair matches them, or the model read none of their words (report.json lists all, as "
                     "unmatched_phrases):", soft_wrap=True)
        for line in left_out_lines(evaluation.unmatched_phrases, [], 5):
            stderr.print(f"  {escape(line)}", soft_wrap=True)
    if n_skipped:
        stderr.print(f"[yellow]warning[/]: {n_skipped} box(es) lie wholly outside the part of the image the model saw and "
                     "were skipped (report.json lists all, as skipped_boxes):", soft_wrap=True)
        for line in left_out_lines([], evaluation.skipped_boxes, 5):
            stderr.print(f"  {escape(line)}", soft_wrap=True)
    if evaluation.n_clipped_boxes:
        stderr.print(f"note: {evaluation.n_clipped_boxes} box(es) lie partly outside what the model saw: scored by the part "
                     "it saw (clipped_boxes in report.json)", soft_wrap=True)


def print_misses(found: dict[str, Any], listed: list[dict[str, Any]], per_class: int) -> None:
    """The ``listed`` misses (the worst ``per_class`` of each class of ``found``) with their viewer links, then the
    failure patterns."""
    if not listed:
        print("misses: none (every phrase's map peaks inside its boxes)")
    else:
        table = Table("class", "pair", "phrase", "energy in box", "image",
                      title=f"phrases whose map misses their box: {len(found['misses'])}, the {per_class} worst of each class")
        for miss in listed:
            table.add_row(escape(miss["label"]), str(miss["pair"]), escape(miss["phrase"]), f"{miss['energy_in_box']:.3f}",
                          escape(miss["image"]))
        print_table(Console(), table)
        print("their links, with `xclip view` on its default port:")
        for miss in listed:  # whole lines: a link cut by a table's border cannot be opened
            print(f"  pair {miss['pair']} {miss['phrase']!r}: http://127.0.0.1:8765/{miss['link']}")
    for name, rows in found["patterns"].items():
        patterns = Table(name.replace("_", " "), "pointing game [95% CI] n", title="where maps miss")
        for row in rows:
            patterns.add_row(escape(row["group"]), _metric_cell({"mean": row["pointing_game"], "ci95": row["ci95"], "n": row["n_phrases"]}))
        print_table(Console(), patterns)


def print_baselines(report: dict[str, Any], game: str) -> None:
    """First-order methods beside the second-order maps: grounding overall and per class (with annotations), and
    insertion/deletion faithfulness, each with its paired difference from the second-order maps."""
    from xclip.analysis.baseline_evaluation import CURVES
    from xclip.analysis.grounding import METRICS

    console = Console()
    if "grounding" in report:
        chance = report["grounding_chance"]
        table = Table("method", *(f"{m.replace('_', ' ')}\n(chance {chance[m]:.2f})" for m in METRICS),
                      *(f"Δ {m.replace('_', ' ')}\nvs 2nd order" for m in METRICS),
                      title=f"phrase → image grounding, {report['n_phrases']} phrases: mean [95% CI] n; Δ paired by phrase")
        for method, entry in report["grounding"]["overall"].items():
            if method == "n_phrases":
                continue
            table.add_row(method, *(_mean_cell(entry.get(m)) for m in METRICS), *(_paired_cell(entry.get(m)) for m in METRICS))
        print_table(console, table)
        classes = [label for label in report["grounding"] if label != "overall"]
        grounded = [m for m in report["methods"] if m in report["grounding"]["overall"]]
        per_class = Table("class", *grounded, title="pointing game per class: mean [95% CI] n")
        for label in classes:
            group = report["grounding"][label]
            per_class.add_row(escape(label), *(_mean_cell(group[m].get("pointing_game")) for m in grounded))
        print_table(console, per_class)
    table = Table("method", *(f"area between\ncurves {c}" for c in CURVES), *(f"Δ {c}\nvs 2nd order" for c in CURVES),
                  title=f"insertion/deletion, {game} game, {report['n_pairs']} pairs: mean [95% CI] n of the area between the "
                        "insertion and deletion curves, divided by the mean score change v(full) − v(empty) over the pairs "
                        f"({report['faithfulness_scale']['divided_by']:.3g}); 0 = a ranking no better than chance, and it can pass 1")
    for method, entry in report["faithfulness"].items():
        table.add_row(method, *(_mean_cell(entry.get(c)) for c in CURVES), *(_paired_cell(entry.get(c)) for c in CURVES))
    print_table(console, table)


def print_comparison(report: dict[str, Any]) -> None:
    """The compared runs and how their settings differ (on stderr), then a table a direction: each run's metrics
    and each later run's paired difference from the first."""
    from xclip.analysis.grounding import DIRECTIONS, METRICS

    names = list(report["runs"])
    for name, path in report["runs"].items():
        stderr.print(f"{name}: {escape(path)}", soft_wrap=True)
    for pair, differences in report["settings_differences"].items():
        later, first = pair.split("-")
        stderr.print(f"settings of {later} that differ from {first}: {'none' if not differences else ''}")
        for difference in differences:
            stderr.print(f"  {escape(difference)}", soft_wrap=True)
    for direction in DIRECTIONS:
        table = Table("class", title=f"{direction.replace('_to_', ' → ').replace('_', ' ')}: mean [95% CI] n of each run; "
                                     "differences paired by phrase")
        for metric in METRICS:
            for name in names:
                table.add_column(f"{metric.replace('_', ' ')}\n{name}")
            for name in names[1:]:
                table.add_column(f"{metric.replace('_', ' ')}\n{name} − {names[0]}")
        for label, stats in [("overall", report["overall"]), *report["per_class"].items()]:
            cells = []
            for metric in METRICS:
                entry = stats[f"{direction}/{metric}"]
                cells += [_metric_cell(entry[name]) for name in names]
                cells += [_difference_cell(entry[f"{name}-{names[0]}"]) for name in names[1:]]
            table.add_row(escape(label), *cells)
        print_table(Console(), table)



# --- words ---------------------------------------------------------------------------------------------------
def print_words(audit: WordAudit, top: int) -> None:
    """The ``top`` most frequent words of the audit, by the share of the map they carry; then the flagged words
    with their best and worst pairs, and those pairs' viewer links as whole lines."""
    console = Console()
    shown = sorted(audit.words[:top], key=lambda w: -w.share if not math.isnan(w.share) else math.inf)
    # two tables of the same rows, so that each fits 80 columns with no number cut
    table = Table("word", "count", "pairs", "share", "signed share", "raises score", f"top-{audit.top_patches} share ± SD",
                  "entropy",
                  title=f"{len(shown)} most frequent of {len(audit.words)} words (at least {audit.min_count} times) in "
                        f"{audit.n_pairs} pairs, by the share of the map they carry; a map spread evenly has top-"
                        f"{audit.top_patches} share {audit.uniform_top_share:.3f} and entropy 1")
    where = Table("word", "centroid (row, column)", "spread", "centroid dispersion",
                  title="where their maps sit: positive mass on the patches, in [0, 1] of the grid (means; the "
                        "dispersion of the centroid between images)")
    for w in shown:
        table.add_row(escape(w.word), str(w.count), str(w.pairs), _measure(w.share, ".3f"), _measure(w.signed_share, "+.3f"),
                      _measure(w.raises_score, ".0%"), f"{_measure(w.top_share, '.3f')} ± {_measure(w.top_share_std, '.3f')}",
                      _measure(w.entropy, ".3f"))
        where.add_row(escape(w.word), f"({_measure(w.centroid[0], '.2f')}, {_measure(w.centroid[1], '.2f')})",
                      _measure(w.spread, ".3f"), _measure(w.centroid_dispersion, ".3f"))
    print_table(console, table)
    print_table(console, where)
    flagged = [("most diffuse", "entropy", name, audit.word(name).entropy) for name in audit.most_diffuse]
    flagged += [("least consistent", "cancelled share", name, audit.word(name).cancelled_share) for name in audit.least_consistent]
    if not flagged:
        return
    flags = Table("flag", "word", "by", "share", "best pair (share)", "worst pair (share)",
                  title="candidates for words the model does not ground: most diffuse (highest mean entropy) and least "
                        "consistent (most share cancelled between images: share - |signed share|)")
    for flag, measure, name, value in flagged:
        w = audit.word(name)
        flags.add_row(flag, escape(name), f"{measure} {value:.3f}", _measure(w.share, ".3f"),
                      f"{w.best.pair} ({w.best.share:+.3f})", f"{w.worst.pair} ({w.worst.share:+.3f})")
    print_table(console, flags)
    print("their pairs' links, with `xclip view` on its default port:")
    for name in dict.fromkeys(name for _, _, name, _ in flagged):  # whole lines: a link cut by a border cannot be opened
        w = audit.word(name)
        print(f"  {name!r} best {w.best.pair}: http://127.0.0.1:8765/{w.best.link}   "
              f"worst {w.worst.pair}: http://127.0.0.1:8765/{w.worst.link}")


def _measure(value: float, spec: str) -> str:
    """A word's measure, or - where it has none (NaN: no occurrence with a share, or with mass on the patches)."""
    return "-" if math.isnan(value) else format(value, spec)


# --- cells ---------------------------------------------------------------------------------------------------
def _summary_cell(value: object) -> str:
    """A value of a summary table: ``-`` where there is none (no finished pair to take a median of)."""
    if value is None:
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _number(value: float | None, spec: str = ".2e") -> str:
    return "-" if value is None else format(value, spec)


def _metric_cell(stats: dict[str, Any]) -> str:
    from xclip.analysis.summaries import interval_text

    chance = f" ({stats['chance']:.2f})" if stats.get("chance") is not None else ""
    return interval_text(stats["mean"], stats["ci95"], stats["n"]) + chance


def _difference_cell(stats: dict[str, Any]) -> str:
    from xclip.analysis.summaries import interval_text

    return interval_text(stats["mean"], stats["ci95"], stats["n"], signed=True)


def _mean_cell(stats: dict[str, Any] | None) -> str:
    """A method's mean and interval, or - where it has no such score."""
    return "-" if stats is None else _metric_cell(stats)


def _paired_cell(stats: dict[str, Any] | None) -> str:
    """A baseline's paired difference from the second-order maps, or - (the second-order row, a missing score)."""
    if stats is None or "difference" not in stats:
        return "-"
    return _difference_cell({"mean": stats["difference"], "ci95": stats["difference_ci95"], "n": stats["n"]})
