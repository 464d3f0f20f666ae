"""The ``xclip`` command line: each command reads its options, calls the library and shows the result. Results
go to files and stdout; progress, logs and errors go to stderr (see :mod:`xclip.cli.tables`)."""

from __future__ import annotations

import json
import math
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from xclip.cli.cluster import StopFlag, shard_overrides
from xclip.cli.errors import (
    CONFIG_KEYS,
    DEVICE_FLAGS,
    EXIT_FAILED_ITEMS,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    EXPLAIN_FLAGS,
    RENDER_FLAGS,
    STORE_FLAGS,
    print_error,
    user_errors,
)
from xclip.cli.progress import plain_progress, progress_callback
from xclip.cli.tables import (
    describe_worker_end,
    explained_rows,
    print_baselines,
    print_calibration,
    print_comparison,
    print_explained,
    print_grounding,
    print_input_warnings,
    print_left_out,
    print_misses,
    print_words,
    print_run_description,
    print_run_summary,
    print_run_warnings,
    run_summary,
    stderr,
)
from xclip.errors import ConfigError
from xclip.run.workers import WORKER_OPTION

if TYPE_CHECKING:
    from xclip.run.runner import RunSummary
    from xclip.run.workers import ShardTask


app = typer.Typer(
    help="Second-order caption-token x image-patch attributions for CLIP-style models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"xclip {version('xclip')}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True, help="print xclip's version and exit")] = False,
) -> None:
    pass


@app.command()
def attribute(
    config: Annotated[Path, typer.Argument(help="YAML run config")],
    overrides: Annotated[list[str] | None, typer.Argument(help="section.key=value overrides")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a run made with other settings")] = False,
    json_summary: Annotated[bool, typer.Option("--json", help="print the summary as JSON on stdout")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress output")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="list every failed item")] = False,
    shard: Annotated[str | None, typer.Option(help="I/N: attribute block I of N of the pairs into shard-I-of-N/; 'env' reads Slurm array or torchrun variables")] = None,
    devices: Annotated[str | None, typer.Option(help="cuda:0,cuda:1,... or cpu,cpu or auto (every visible GPU): a worker process per device on its block of the pairs, merged into one run file")] = None,
    worker: Annotated[str | None, typer.Option(WORKER_OPTION, hidden=True, help="run as a worker of --devices: progress and summary as JSON lines on stdout; the value is the parent's command")] = None,
) -> None:
    """Attribute every image-caption pair of a run config into an HDF5 run directory (resumable)."""
    from xclip.config import load_config

    command = worker or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    device_overrides: list[str] = []
    if devices is not None:
        from xclip.run.workers import parse_devices, visible_gpus

        with user_errors(DEVICE_FLAGS):
            if shard is not None:
                raise ConfigError("--devices and --shard do not go together: --devices splits the run into a shard per device itself")
            chosen = parse_devices(devices, visible_gpus)
        if len(chosen) > 1:
            _attribute_on_devices(config, overrides or [], chosen, overwrite=overwrite, json_summary=json_summary, quiet=quiet,
                                  verbose=verbose, command=command)
            return
        device_overrides = [f"model.device={chosen[0]}"]  # one device: the ordinary run on it
    if worker is None:
        bar, update = progress_callback(quiet)
    else:  # the parent shows the progress and stops this process when it dies
        import os
        import signal

        from xclip.run.workers import progress_line, watch_parent

        bar, update = None, lambda stage, done, total: print(progress_line(stage, done, total), flush=True)
        watch_parent(sys.stdin, lambda: os.kill(os.getpid(), signal.SIGTERM))
    with user_errors(CONFIG_KEYS):
        run_config = load_config(config, [*(overrides or []), *shard_overrides(shard), *device_overrides])
        from xclip.run import runner  # torch and the model's libraries: only once the config holds

        try:
            with StopFlag().installed() as stop, bar or nullcontext():
                summary = runner.run(run_config, overwrite=overwrite, on_progress=update, should_stop=stop, command=command)
        except KeyboardInterrupt:  # a second signal: stop at once; finished batches are on disk
            print_error("stopped by a second signal before the batch finished: rerun the same command to finish the remaining pairs")
            raise typer.Exit(EXIT_INTERRUPTED) from None
    if worker is not None:
        from xclip.run.workers import summary_line

        print(summary_line(summary.n_done, summary.n_skipped), flush=True)
        raise typer.Exit(_exit_code(summary))
    _report_run(summary, json_summary=json_summary, quiet=quiet, verbose=verbose)


def _exit_code(summary: RunSummary) -> int:
    if summary.is_interrupted:
        return EXIT_INTERRUPTED
    return EXIT_FAILED_ITEMS if summary.n_failed or summary.n_rejected else 0


def _report_run(summary: RunSummary, *, json_summary: bool, quiet: bool, verbose: bool) -> None:
    """An attribute run's run file (or --json summary) on stdout, its table and warnings on stderr, its exit."""
    result = run_summary(summary)
    if json_summary:
        print(json.dumps(result))
    else:
        print(summary.directory / "run.h5")
    if not quiet:
        print_run_summary(result)
    print_run_warnings(summary, verbose)
    if summary.is_interrupted:
        stderr.print("[yellow]interrupted: rerun the same command to finish the remaining pairs[/]")
    if _exit_code(summary):
        raise typer.Exit(_exit_code(summary))


def _attribute_on_devices(config: Path, overrides: list[str], devices: list[str], *, overwrite: bool, json_summary: bool,
                          quiet: bool, verbose: bool, command: str) -> None:
    """`attribute --devices`: a worker per device, their progress as one, their shards merged into one run file."""
    from xclip.run.workers import attribute_on_devices

    bar, update = progress_callback(quiet)

    def message(task: ShardTask, line: str) -> None:
        stderr.print(f"[dim]{escape(task.name)}:[/] {escape(line)}", soft_wrap=True, highlight=False)

    with user_errors(DEVICE_FLAGS), StopFlag(counts_only=True).installed() as stop, bar or nullcontext():
        result = attribute_on_devices(
            config, overrides, devices, overwrite=overwrite, command=command, on_progress=update, on_message=message,
            stop_requests=lambda: stop.count, on_merge=(lambda done, total: update("shards", done, total)) if update else None,
        )
    if result.summary is not None:
        _report_run(result.summary, json_summary=json_summary, quiet=quiet, verbose=verbose)
        return
    for unfinished in result.unfinished:
        stderr.print(f"[yellow]{escape(unfinished.task.name)}[/]: {escape(describe_worker_end(unfinished))}", soft_wrap=True)
    stderr.print(f"[yellow]not merged[/]: {len(result.workers) - len(result.unfinished)} of {len(result.workers)} shards finished and are kept; "
                 "rerun the same command to resume every shard and merge them", soft_wrap=True)
    raise typer.Exit(result.exit_code)


@app.command()
def calibrate(
    source: Annotated[str, typer.Argument(help="a YAML run config (its model, data and attribution settings are used), or a model name with --data")],
    overrides: Annotated[list[str] | None, typer.Argument(help="section.key=value overrides (attribution.image_reference=blur, ...)")] = None,
    data: Annotated[Path | None, typer.Option(help="with a model name: an image folder with metadata.jsonl (file_name, text); xclip:demo defaults to scenes of its own world")] = None,
    n_inputs: Annotated[int, typer.Option("--inputs", help="captions and images to calibrate on, spread over the data")] = 32,
    output: Annotated[Path | None, typer.Option(help="layout file to write (default: the layout cache, where attribute and explain find it)")] = None,
    beside: Annotated[bool, typer.Option("--beside", help="write xclip-layouts.json into the local checkpoint folder, to travel with it")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="print the calibration as JSON on stdout")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress output")] = False,
) -> None:
    """Find where along each tower's path the model's integrand is rough and place the adaptive rule's first
    panels there: the same guarantee for fewer evaluations. Runs that use the model under the same layers and
    references then use the layout automatically (attribution.panel_layout: auto)."""
    import tempfile

    from xclip.run.calibration import calibrate_run_config, model_run_config
    from xclip.config import load_config
    from xclip.attribution.panels import beside_checkpoint, cache_file, save_calibration, weights_fingerprint
    from xclip.threads import use_threads

    with user_errors(CONFIG_KEYS), tempfile.TemporaryDirectory() as temporary:
        config_path = Path(source)
        if not (config_path.suffix in (".yaml", ".yml") and config_path.is_file()):
            config_path = model_run_config(source, data, Path(temporary), n_inputs)
        elif data is not None:
            raise ConfigError("--data is for a model name; a run config names its own data (data.root)")
        run_config = load_config(config_path, overrides or [])
        use_threads(run_config.runtime.threads)
        beside_file = beside_checkpoint(run_config.model.name)
        if beside and beside_file is None:  # refused before the model is loaded and calibrated
            raise ConfigError(f"--beside needs a local checkpoint folder; {run_config.model.name!r} is not one (use --output)")
        with plain_progress(quiet, "layouts tried") as progress:
            calibration, model, unreadable = calibrate_run_config(run_config, n_inputs, progress)
        fingerprint = weights_fingerprint(model)
        target = beside_file if beside else output or cache_file(fingerprint)
        save_calibration(target, model, calibration, fingerprint)
    for problem in unreadable:
        stderr.print(f"[yellow]left out[/] {escape(problem)}", soft_wrap=True)
    if json_output:
        print(json.dumps({"layout_file": str(target), "fingerprint": fingerprint, "settings": calibration.settings,
                          "text": calibration.text, "image": calibration.image, "measured": calibration.measured}))
        return
    print_calibration(run_config.model.name, calibration)
    print(target)


@app.command()
def explain(
    image: Annotated[Path, typer.Argument(help="an image file")],
    captions: Annotated[list[str], typer.Argument(help="one or more captions")],
    model: Annotated[str | None, typer.Option(help="hub id, local checkpoint, open_clip:ARCH[/TAG] or xclip:demo (the shipped demo model, the default; xclip:demo-no-star is its second checkpoint)")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="weights file for --model open_clip:ARCH")] = None,
    output: Annotated[Path | None, typer.Option(help="keep the run directory here, for render, inspect and view (default: a temporary one)")] = None,
    figures: Annotated[Path | None, typer.Option(help="figures folder (default: OUTPUT/heatmaps, or ./xclip-explain-IMAGE without --output)")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16 or float64")] = "float32",
    resize: Annotated[str, typer.Option(help="how a non-square image becomes square: native (the model's own: CLIP crops the centre, SigLIP squashes), crop, pad or squash")] = "native",
    scale: Annotated[str, typer.Option(help="map colour scale: run (one for all captions, so they compare), figure, or a number")] = "run",
    file_format: Annotated[str, typer.Option("--format", help="png, svg or pdf")] = "png",
    dpi: Annotated[int, typer.Option(help="resolution in dots per inch (the size in inches is the layout's)")] = 100,
    layout: Annotated[str, typer.Option(help="wide (a page's text width, at most 7 in) or column (3.5 in, a paper column)")] = "wide",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace what OUTPUT holds")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="print the pairs as JSON on stdout")] = False,
) -> None:
    """Attribute one image with each caption and draw them: no config file. Prints each pair's score,
    four-term value, completeness error and figure."""
    import tempfile

    from xclip.run.explain import explain as explain_pairs
    from xclip.show.figures import FigureOptions

    with user_errors(EXPLAIN_FLAGS), tempfile.TemporaryDirectory() as temporary:
        options = FigureOptions(scale=_parse_scale(scale), dpi=dpi, layout=layout)  # type: ignore[arg-type]
        run_directory = output or Path(temporary) / "run"
        figures = figures or (None if output else Path(f"xclip-explain-{image.stem}"))
        with StopFlag().installed() as stop:
            result = explain_pairs(image, captions, output=run_directory, model=model, checkpoint=checkpoint, device=device, dtype=dtype,
                                   image_resize=resize, figures=figures, options=options, file_format=file_format, overwrite=overwrite,
                                   should_stop=stop)
    if json_output:
        print(json.dumps({"run_directory": str(output) if output else None, "pairs": explained_rows(result.pairs)}, allow_nan=True))
    else:
        print_explained(image, result.pairs)
    print_input_warnings(stderr, result.summary.unknown_words, result.summary.cropped_images, limit=None, pad="--resize pad",
                         truncated_captions=result.summary.truncated_captions)
    for note in result.notes:
        stderr.print(f"note: {escape(note)}")
    if result.summary.is_interrupted:
        raise typer.Exit(EXIT_INTERRUPTED)
    if any(p.figure is None for p in result.pairs):
        raise typer.Exit(EXIT_FAILED_ITEMS)


@app.command()
def view(
    run_dir: Annotated[Path, typer.Argument(help="run directory (or its run.h5)")],
    port: Annotated[int, typer.Option(help="port on 127.0.0.1 (0: any free one)")] = 8765,
    data_root: Annotated[Path | None, typer.Option(help="the images' folder, when it moved since the run")] = None,
    export: Annotated[Path | None, typer.Option(help="write a static site of chosen pairs here instead of serving")] = None,
    pair: Annotated[list[int] | None, typer.Option("--pair", "-p", help="with --export: a pair to export; repeat for several")] = None,
    top: Annotated[int, typer.Option(min=0, help="with --export and no --pair: the best pairs by score")] = 50,
    bottom: Annotated[int, typer.Option(min=0, help="with --export and no --pair: the worst pairs by score")] = 50,
) -> None:
    """Browse a run in the browser (also while it is being written): the pair table, maps of spans and boxes."""
    from xclip.show.viewer import RunData, choose_pairs, export_site, make_server

    with user_errors({**STORE_FLAGS, "data_root": "--data-root"}):
        if export is not None:
            chosen = choose_pairs(RunData(run_dir, data_root), pair, top, bottom)
            if not chosen:
                raise ConfigError(f"{run_dir} has no finished pairs to export yet")
            index = export_site(run_dir, export, chosen, data_root)
            print(index)
            stderr.print(f"{len(chosen)} pairs exported: open {index} in a browser (no server needed)")
            return
        server = make_server(run_dir, port, data_root)
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    print(url, flush=True)
    stderr.print(f"serving {run_dir} at {url} (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


@app.command()
def merge(
    run_dir: Annotated[Path, typer.Argument(help="output directory holding shard-*-of-*/run.h5")],
    allow_partial: Annotated[bool, typer.Option("--allow-partial", help="merge shards with unfinished pairs (they stay pending)")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a RUN_DIR/run.h5 that is not an earlier merge of these shards")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress output")] = False,
) -> None:
    """Concatenate the shards of a run into RUN_DIR/run.h5, for inspect, render and evaluate. Shards must share
    their settings and be finished (or --allow-partial); a RUN_DIR/run.h5 other than an earlier merge of the
    same shards is kept unless --overwrite."""
    from xclip.store.merge import merge_shards

    bar, update = progress_callback(quiet)
    with user_errors({**STORE_FLAGS, "allow_partial": "--allow-partial"}), bar or nullcontext():
        merged = merge_shards(run_dir, allow_partial=allow_partial, overwrite=overwrite,
                              progress=(lambda done, total: update("shards", done, total)) if update else None)
    print(merged)


@app.command()
def render(
    run_dir: Annotated[Path, typer.Argument(help="run directory (or its run.h5)")],
    pair: Annotated[list[int] | None, typer.Option("--pair", "-p", help="pair index; repeat for several (default: the first --limit finished pairs)")] = None,
    span: Annotated[str | None, typer.Option(help="caption span: a substring such as 'black dog', or token indices '2:4'")] = None,
    box: Annotated[str | None, typer.Option(help="image box x0,y0,x1,y1 in original-image pixels")] = None,
    out: Annotated[Path | None, typer.Option(help="output folder (default RUN_DIR/heatmaps)")] = None,
    scale: Annotated[str, typer.Option(help="map colour scale: figure (each its own), run (one for all figures drawn), or a number")] = "figure",
    file_format: Annotated[str, typer.Option("--format", help="png, svg or pdf")] = "png",
    dpi: Annotated[int, typer.Option(help="resolution in dots per inch (the size in inches is the layout's)")] = 100,
    all_words: Annotated[bool, typer.Option("--all-words", help="a panel for stop-words and punctuation too")] = False,
    upsample: Annotated[str, typer.Option(help="bilinear or nearest")] = "bilinear",
    layout: Annotated[str, typer.Option(help="wide (a page's text width, at most 7 in) or column (3.5 in, a paper column)")] = "wide",
    limit: Annotated[int, typer.Option(min=1, help="without --pair, draw at most this many pairs (the rest are counted on stderr)")] = 100,
    data_root: Annotated[Path | None, typer.Option(help="the images' folder, when it moved since the run (default: the run's data.root)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress output")] = False,
) -> None:
    """Draw figures of finished pairs: per-word maps, a caption span's map, or a box's match with the words."""
    from xclip.show.content import STOP_WORDS
    from xclip.show.figures import FigureOptions
    from xclip.show.render import render_run

    bar, update = progress_callback(quiet)
    with user_errors(RENDER_FLAGS), bar or nullcontext():
        options = FigureOptions(scale=_parse_scale(scale), upsample=upsample, dpi=dpi, layout=layout,  # type: ignore[arg-type]
                                skip_words=frozenset() if all_words else STOP_WORDS)
        report = render_run(
            run_dir, pairs=pair, span=span, box=None if box is None else _parse_box(box), out=out, options=options,
            file_format=file_format, limit=limit, data_root=data_root,
            progress=(lambda done, total: update("figures", done, total)) if update else None,
        )
    for path in report.written:
        print(path)
    for note in report.notes:
        stderr.print(f"note: {note}")
    if report.skipped_without_span:
        stderr.print(f"skipped {report.skipped_without_span} pairs whose caption does not hold {span!r}")
    if report.n_beyond_limit:
        unchecked = " (not checked for the span)" if span is not None else ""
        stderr.print(f"note: drew the first {len(report.written)} finished pairs (--limit {limit}); {report.n_beyond_limit} later "
                     f"finished pairs{unchecked} were not drawn: raise --limit, or name pairs with --pair", soft_wrap=True)
    if not report.written:
        stderr.print("no finished pairs to render yet")


@app.command()
def inspect(
    run_dir: Annotated[Path, typer.Argument(help="run directory (or its run.h5)")],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable JSON with every pair")] = False,
    top: Annotated[int, typer.Option(min=0, help="pairs to list by score")] = 10,
) -> None:
    """Show what a run holds: config, counts, failures, completeness statistics, top pairs."""
    from xclip.store.describe import describe_run

    with user_errors(STORE_FLAGS):
        report = describe_run(run_dir)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    print_run_description(report, top)


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="run directory (or its run.h5)")],
    annotations: Annotated[Path | None, typer.Option("--annotations", "-a", help="phrase annotations (JSON lines); without them only --baselines' faithfulness is scored")] = None,
    out: Annotated[Path | None, typer.Option(help="folder for report.json and the bar charts (default RUN_DIR/evaluation)")] = None,
    seed: Annotated[int, typer.Option(min=0, help="bootstrap seed")] = 0,
    misses: Annotated[int, typer.Option(min=0, help="list the N worst misses of each class, with viewer links, and the failure patterns")] = 0,
    miss_figures: Annotated[bool, typer.Option("--miss-figures", help="with --misses: draw the listed misses' phrase maps into OUT/misses")] = False,
    baselines: Annotated[str | None, typer.Option(help="first-order methods to score beside the run's maps, comma-separated: integrated_gradients, gradient_input, maskclip, grad_eclip, rollout, chefer, random, centre, or all; loads the run's model")] = None,
    baseline_target: Annotated[str, typer.Option(help="what a first-order method explains a phrase's image against: phrase (the phrase as a caption of its own) or caption (the whole caption)")] = "phrase",
    game: Annotated[str, typer.Option(help="where insertion and deletion remove players and what they score: cut (at the cut layer, the cosine) or input (FIxLIP's: at the input embeddings, the logit)")] = "cut",
    curve_points: Annotated[int, typer.Option(min=2, help="points on each insertion and deletion curve")] = 20,
    limit: Annotated[int | None, typer.Option(min=1, help="with --baselines: score the first N pairs only")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="annotations that match no finished pair and boxes outside what the model saw are an error (exit 2, nothing written)")] = False,
) -> None:
    """Grounding metrics (pointing game, energy in box, mass ratio) per phrase class, with 95% intervals; the
    phrases whose maps miss their boxes, and the groups of phrases that miss most, in OUT/misses.json. With
    --baselines, first-order methods on the same pairs: grounding and insertion/deletion faithfulness, each with
    its paired difference from the second-order maps, in OUT/baselines.json."""
    if annotations is None and baselines is None:
        print_error("nothing to evaluate: give --annotations (grounding), --baselines (faithfulness, and grounding with annotations) or both")
        raise typer.Exit(EXIT_USAGE)
    from xclip.store.layout import run_file_path

    folder = out or run_file_path(run_dir).parent / "evaluation"
    if annotations is not None:
        from xclip.run.evaluation import worst_misses, write_grounding_report
        from xclip.show.render import render_run

        with user_errors({**STORE_FLAGS, "strict": "--strict"}):
            grounding = write_grounding_report(run_dir, annotations, folder, seed=seed, strict=strict)
        print_left_out(grounding.evaluation, annotations)
        print_grounding(grounding.report)
        if misses:
            listed = worst_misses(grounding.misses, misses)
            print_misses(grounding.misses, listed, misses)
            if miss_figures:
                with user_errors(STORE_FLAGS):
                    for miss in listed:
                        drawn = render_run(run_dir, pairs=[miss["pair"]], span=miss["phrase"], out=folder / "misses")
                        for written in drawn.written:
                            print(written)
        for path in grounding.written:
            print(path)
    if baselines is not None:
        _evaluate_baselines(run_dir, annotations, folder, [name.strip() for name in baselines.split(",") if name.strip()],
                            target=baseline_target, game=game, n_points=curve_points, limit=limit, seed=seed, quiet=quiet)


def _evaluate_baselines(run_dir: Path, annotations: Path | None, folder: Path, names: list[str], *, target: str,
                        game: str, n_points: int, limit: int | None, seed: int, quiet: bool) -> None:
    """Score the run's maps beside first-order methods, write OUT/baselines.json and its charts, print the tables."""
    from xclip.run.evaluation import write_baselines_report

    bar, update = progress_callback(quiet)
    with user_errors(STORE_FLAGS), bar or nullcontext():
        report, written = write_baselines_report(
            run_dir, annotations, folder, names, target=target, game=game, n_points=n_points, limit=limit, seed=seed,
            progress=(lambda done, total: update("baselines", done, total)) if update else None,
        )
    print_baselines(report, game)
    for path in written:
        print(path)


@app.command()
def compare(
    runs: Annotated[list[Path], typer.Argument(help="two or more run directories over the same pairs (the first is the baseline)")],
    annotations: Annotated[Path, typer.Option("--annotations", "-a", help="phrase annotations (JSON lines)")],
    out: Annotated[Path, typer.Option(help="folder for comparison.json and the difference charts")] = Path("xclip-compare"),
    seed: Annotated[int, typer.Option(min=0, help="bootstrap seed")] = 0,
) -> None:
    """Grounding metrics of runs over the same pairs (two checkpoints, references, layers...) per phrase class,
    with each run's paired difference from the first and its 95% interval."""
    from xclip.run.evaluation import write_comparison

    with user_errors(STORE_FLAGS):
        report, written = write_comparison(runs, annotations, out, seed=seed)
    print_comparison(report)
    for path in written:
        print(path)



@app.command()
def words(
    run_dir: Annotated[Path, typer.Argument(help="run directory (or its run.h5): full or summary-only")],
    min_count: Annotated[int, typer.Option("--min-count", min=1, help="leave out words that occur fewer times")] = 5,
    top: Annotated[int, typer.Option(min=1, help="words in the table: the most frequent")] = 20,
    flagged: Annotated[int, typer.Option(min=1, help="words in each list of flagged words (most diffuse, least consistent)")] = 8,
    json_output: Annotated[bool, typer.Option("--json", help="print words.json on stdout instead of the tables")] = False,
    output: Annotated[Path | None, typer.Option(help="folder for words.json and words.png (default: the run directory)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Audit every word of a run without annotations: how much of the map it carries, how concentrated its maps
    are and where they sit, and the most diffuse and least consistent words, with links to their best and worst
    pairs. Writes words.json and the chart words.png."""
    from xclip.analysis.words import audit_words, write_words_report
    from xclip.store.layout import run_file_path

    bar, update = progress_callback(quiet)
    with user_errors({**STORE_FLAGS, "min_count": "--min-count"}):
        with bar or nullcontext():
            audit = audit_words(run_dir, min_count=min_count, flagged=flagged,
                                progress=(lambda done, total: update("pairs", done, total)) if update else None)
        written = write_words_report(audit, output or run_file_path(run_dir).parent)
    if json_output:
        print(json.dumps(audit.record(), indent=2))
        return
    print_words(audit, top)
    for path in written:
        print(path)

@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="folder for the scenes, metadata.jsonl and annotations.jsonl")],
    n: Annotated[int, typer.Option("--n", min=1, help="number of scenes")] = 100,
    seed: Annotated[int, typer.Option(min=0, help="scene seed (the demo model trained on seeds below 10000)")] = 20000,
    size: Annotated[int, typer.Option(min=32, max=4096, help="image side in pixels")] = 64,
) -> None:
    """Generate captioned shape scenes with exact phrase boxes: ground truth for `xclip evaluate`."""
    from xclip.analysis.synthetic import generate, write_scenes

    with user_errors():
        folder = write_scenes(generate(n, seed=seed, size=size), out)
    print(folder / "metadata.jsonl")
    print(folder / "annotations.jsonl")


@app.command()
def convert(
    kind: Annotated[str, typer.Argument(help="flickr30k-entities or coco-instances")],
    source: Annotated[Path, typer.Argument(help="Flickr30k Entities folder, or COCO instances JSON")],
    out: Annotated[Path, typer.Argument(help="folder for annotations.jsonl and metadata.jsonl")],
    captions: Annotated[Path | None, typer.Option(help="COCO captions JSON (coco-instances)")] = None,
    split: Annotated[str | None, typer.Option(help="Flickr30k split file: train, val or test")] = None,
) -> None:
    """Convert grounding annotations to the JSON lines `xclip evaluate` reads."""
    from xclip.run.converters import convert_coco_instances, convert_flickr30k_entities

    with user_errors():
        if kind == "flickr30k-entities":
            written = convert_flickr30k_entities(source, out, split=split)
        elif kind == "coco-instances":
            if captions is None:
                raise ConfigError("coco-instances needs --captions (the COCO captions JSON of the same images)")
            written = convert_coco_instances(source, captions, out)
        else:
            raise ConfigError(f"unknown kind {kind!r}; choose flickr30k-entities or coco-instances")
    print(written)


def _parse_box(text: str) -> tuple[float, float, float, float]:
    """``--box x0,y0,x1,y1``."""
    from xclip.core.geometry import check_box

    return check_box(text.split(","), given=text)  # named --box by _errors


def _parse_scale(text: str) -> float | str:
    """``--scale figure|run|NUMBER``."""
    if text in ("figure", "run"):
        return text
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        msg = f"--scale must be figure, run or a positive number (the map colour bar's end), got {text!r}"
        raise ConfigError(msg)
    return value


def main() -> None:
    """Console entry point. OpenMP's passive wait and the number of CPU threads go into the environment before any
    command imports torch (:func:`xclip.threads.prepare_process`); a variable the user set is kept."""
    from xclip.threads import prepare_process

    prepare_process()
    app()
