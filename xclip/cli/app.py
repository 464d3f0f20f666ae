"""The ``xclip`` command line: ``attribute``, ``render`` and ``inspect``. Results go to files and stdout;
progress, logs and errors go to stderr."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from importlib.metadata import version
from pathlib import Path
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich import box
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from xclip.errors import ConfigError, RunUnavailable, XclipError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_FAILED_ITEMS, EXIT_INTERRUPTED = 0, 1, 2, 3, 75
LOG_INTERVAL_S = 30.0  # in logs, the longest silence of work whose length is not known in advance (calibrate)
CALIBRATION_SEED = 60_000
INEXACT_PAIR_HINT = (
    "For exact maps of these pairs, attribute their captions and images again with a tighter "
    "attribution.tolerance (the bound shrinks in proportion)"
)
NOT_CONVERGED_HINT = (
    "raise attribution.max_steps or loosen attribution.tolerance; in float32 the relative error stops between "
    "about 3e-7 and 5e-6 (demo model), so tolerances below 1e-5 may need model.dtype float64"
)

app = typer.Typer(
    help="Second-order caption-token x image-patch attributions for CLIP-style models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)
stderr = Console(stderr=True)


def _print_version(value: bool) -> None:
    if value:
        print(f"xclip {version('xclip')}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True, help="print xclip's version and exit")] = False,
) -> None:
    pass


class _StopFlag:
    """SIGTERM, SIGUSR1 (Slurm's warning signals) and SIGINT ask the run to stop at the next batch boundary."""

    def __init__(self) -> None:
        self.signal: int | None = None

    @contextmanager
    def installed(self) -> Iterator[_StopFlag]:
        """The handlers for the duration of a run; the previous ones are restored after it."""
        signals = [s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR1", None)) if s is not None]
        previous = {sig: signal.signal(sig, self._handle) for sig in signals}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _handle(self, signum: int, _frame: object) -> None:
        if self.signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum
        stderr.print(f"[yellow]signal {signal.Signals(signum).name}: finishing the current batch, then stopping[/]")

    def __call__(self) -> bool:
        return self.signal is not None


def _progress_callback(quiet: bool):  # type: ignore[no-untyped-def]
    """A Rich bar on a terminal; plain lines every 10% in logs (Slurm, cron); nothing when quiet."""
    if quiet:
        return None, None
    if stderr.is_terminal:
        bar = Progress(
            TextColumn("{task.description:<9}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
            TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=stderr,
        )
        tasks: dict[str, Any] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total, rate="")
            task = bar.tasks[tasks[stage]]
            speed = task.speed
            bar.update(tasks[stage], completed=done, total=total, rate=f"{speed:.1f} items/s" if speed else "")

        return bar, update
    last: dict[str, int] = {}

    def log(stage: str, done: int, total: int) -> None:
        step = max(1, total // 10)
        if done == total or done - last.get(stage, 0) >= step:
            last[stage] = done
            print(f"{stage}: {done}/{total}", file=sys.stderr, flush=True)

    return None, log


@app.command()
def attribute(
    config: Annotated[Path, typer.Argument(help="YAML run config")],
    overrides: Annotated[list[str] | None, typer.Argument(help="section.key=value overrides")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a run made with other settings")] = False,
    json_summary: Annotated[bool, typer.Option("--json", help="print the summary as JSON on stdout")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress output")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="list every failed item")] = False,
    shard: Annotated[str | None, typer.Option(help="I/N: attribute block I of N of the pairs into shard-I-of-N/; 'env' reads Slurm array or torchrun variables")] = None,
) -> None:
    """Attribute every image-caption pair of a run config into an HDF5 run directory (resumable)."""
    from xclip.config import load_config

    bar, update = _progress_callback(quiet)
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    with _errors(CONFIG_KEYS):
        run_config = load_config(config, [*(overrides or []), *_shard_overrides(shard)])
        from xclip.run import runner  # torch and the model's libraries: only once the config holds

        try:
            with _StopFlag().installed() as stop, bar or nullcontext():
                summary = runner.run(run_config, overwrite=overwrite, on_progress=update, should_stop=stop, command=command)
        except KeyboardInterrupt:  # a second signal: stop at once; finished batches are on disk
            _print_error("stopped by a second signal before the batch finished: rerun the same command to finish the remaining pairs")
            raise typer.Exit(EXIT_INTERRUPTED) from None
    accuracy = summary.accuracy
    result = {
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
    if json_summary:
        print(json.dumps(result))
    else:
        print(summary.directory / "run.h5")
    if not quiet:
        table = Table(title="xclip attribute", show_header=False)
        for key, value in result.items():
            table.add_row(key.replace("_", " "), _summary_cell(value))
        stderr.print(table)
    # failures are printed even with --quiet: cron and Slurm logs must say what went wrong
    for failure in summary.failures[: None if verbose else 5]:
        stderr.print(f"[red]failed[/] {escape(failure)}", soft_wrap=True)
    if len(summary.failures) > 5 and not verbose:
        stderr.print(f"... and {len(summary.failures) - 5} more (--verbose lists all, `xclip inspect` too)")
    if summary.changed_images:  # printed even with --quiet: results of the old files were replaced
        shown = ", ".join(summary.changed_images[: None if verbose else 5])
        more = f" and {len(summary.changed_images) - 5} more" if len(summary.changed_images) > 5 and not verbose else ""
        stderr.print(f"[yellow]attributed again: {len(summary.changed_images)} image(s) whose files changed since they "
                     f"were attributed[/] ({escape(shown)}{more})", soft_wrap=True)
    _print_input_warnings(stderr, summary.unknown_words, summary.cropped_images, limit=None if verbose else 5)
    if summary.n_truncated:
        stderr.print(f"[yellow]{summary.n_truncated} caption(s) are longer than the model's context[/]: their maps cover the tokens it reads (captions/is_truncated in the run file)")
    if accuracy["not_converged"]:  # printed even with --quiet: these results are finished but not to be trusted
        _print_not_converged(stderr, accuracy, limit=None if verbose else 5)
    _print_inexact_pairs(stderr, accuracy, limit=None if verbose else 5)  # also with --quiet, as the inputs above
    if summary.is_interrupted:
        stderr.print("[yellow]interrupted: rerun the same command to finish the remaining pairs[/]")
        raise typer.Exit(EXIT_INTERRUPTED)
    if summary.n_failed or summary.n_rejected:
        raise typer.Exit(EXIT_FAILED_ITEMS)


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

    from xclip.run.calibration import calibrate_run_config
    from xclip.config import load_config
    from xclip.attribution.panels import beside_checkpoint, cache_file, save_calibration, weights_fingerprint
    from xclip.threads import use_threads

    with _errors(CONFIG_KEYS), tempfile.TemporaryDirectory() as temporary:
        config_path = Path(source)
        if not (config_path.suffix in (".yaml", ".yml") and config_path.is_file()):
            config_path = _model_config(source, data, Path(temporary), n_inputs)
        elif data is not None:
            raise ConfigError("--data is for a model name; a run config names its own data (data.root)")
        run_config = load_config(config_path, overrides or [])
        use_threads(run_config.runtime.threads)
        beside_file = beside_checkpoint(run_config.model.name)
        if beside and beside_file is None:  # refused before the model is loaded and calibrated
            raise ConfigError(f"--beside needs a local checkpoint folder; {run_config.model.name!r} is not one (use --output)")
        with _plain_progress(quiet, "layouts tried") as progress:
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
    table = Table("tower", "breakpoints", "inputs", "default layout: mean / max passes", "calibrated: mean / max passes",
                  title=f"xclip calibrate {escape(run_config.model.name)}")
    for tower in ("text", "image"):
        measured = calibration.measured[tower]
        breakpoints = ", ".join(f"{b:g}" for b in getattr(calibration, tower))
        table.add_row(tower, breakpoints, str(measured["inputs"]),
                      f"{measured['default_passes_mean']:.1f} / {measured['default_passes_max']}",
                      f"{measured['passes_mean']:.1f} / {measured['passes_max']}")
    _print_table(Console(), table)
    print(target)


def _model_config(model: str, data: Path | None, folder: Path, n_inputs: int) -> Path:
    """A run config for calibrating ``model`` on ``data`` (for xclip:demo without data: scenes of its world)."""
    import yaml

    from xclip.models.loading import shipped_model
    from xclip.analysis.synthetic import generate, write_scenes

    if data is None:
        if shipped_model(model) is None:
            raise ConfigError(f"give --data FOLDER (an image folder with metadata.jsonl) to calibrate {model!r} on, or a run config")
        # the demo's world, from a seed neither its training, its demo scenes nor make grounding use
        data = write_scenes(generate(n_inputs, seed=CALIBRATION_SEED), folder / "scenes")
    config = {
        "model": {"name": model},
        "data": {"format": "imagefolder", "root": str(data.resolve()), "metadata": str((data / "metadata.jsonl").resolve())},
        "output": {"directory": str(folder / "unused")},
    }
    path = folder / "calibrate.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@contextmanager
def _plain_progress(quiet: bool, unit: str) -> Iterator[Any]:
    """A spinner-like count on a terminal; in logs (Slurm, cron) a line when a stage starts and then at most every
    LOG_INTERVAL_S seconds, so that long work never looks hung; nothing when quiet. For work of unknown length."""
    if quiet:
        yield None
        return
    if not stderr.is_terminal:
        last: dict[str, float] = {}

        def log(stage: str, done: int) -> None:
            now = time.monotonic()
            if stage not in last or now - last[stage] >= LOG_INTERVAL_S:
                last[stage] = now
                print(f"calibrating {stage}: {done} {unit}", file=sys.stderr, flush=True)

        yield log
        return
    with Progress(TextColumn("{task.description}"), TextColumn("{task.completed} " + unit), console=stderr, transient=True) as bar:
        tasks: dict[str, Any] = {}

        def update(stage: str, done: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(f"calibrating {stage}", total=None)
            bar.update(tasks[stage], completed=done)

        yield update


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

    with _errors(EXPLAIN_FLAGS), tempfile.TemporaryDirectory() as temporary:
        options = FigureOptions(scale=_parse_scale(scale), dpi=dpi, layout=layout)  # type: ignore[arg-type]
        run_directory = output or Path(temporary) / "run"
        figures = figures or (None if output else Path(f"xclip-explain-{image.stem}"))
        with _StopFlag().installed() as stop:
            result = explain_pairs(image, captions, output=run_directory, model=model, checkpoint=checkpoint, device=device, dtype=dtype,
                                   image_resize=resize, figures=figures, options=options, file_format=file_format, overwrite=overwrite,
                                   should_stop=stop)
    rows = [{"caption": p.caption, "score": p.score, "four_term_value": p.four_term_value,
             "completeness_error": p.completeness_error, "map_error_bound": p.map_error_bound,
             "figure": str(p.figure) if p.figure else None, "error": p.error, "input_notes": p.input_notes}
            for p in result.pairs]
    if json_output:
        print(json.dumps({"run_directory": str(output) if output else None, "pairs": rows}, allow_nan=True))
    else:
        _print_explained(image, result.pairs)
    _print_input_warnings(stderr, result.summary.unknown_words, result.summary.cropped_images, limit=None, pad="--resize pad",
                          truncated_captions=result.summary.truncated_captions)
    for note in result.notes:
        stderr.print(f"note: {escape(note)}")
    if result.summary.is_interrupted:
        raise typer.Exit(EXIT_INTERRUPTED)
    if any(p.figure is None for p in result.pairs):
        raise typer.Exit(EXIT_FAILED_ITEMS)


def _print_explained(image: Path, pairs: list[Any]) -> None:
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
        _print_table(console, table)
        if len(folders) == 1:
            console.print(f"figures in {escape(str(folders.pop()))}", soft_wrap=True)
    problems: dict[str, list[str]] = {}
    for p in pairs:
        if p.figure is None:
            problems.setdefault(p.error, []).append(p.caption)
    for problem, captions in problems.items():
        quoted = ", ".join(f"“{caption}”" for caption in captions)
        print(f"failed ({len(captions)} caption{'s' * (len(captions) != 1)}: {quoted}): {problem}")


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

    with _errors({**STORE_FLAGS, "data_root": "--data-root"}):
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


def _shard_overrides(shard: str | None) -> list[str]:
    """``runtime.shard_index``/``num_shards`` overrides from ``I/N`` or from the environment (``env``)."""
    if shard is None:
        return []
    if shard == "env":
        env = os.environ

        def number(name: str, default: int | None = None, minimum: int | None = None) -> int:
            text = env.get(name)
            if text is None and default is not None:
                return default
            try:
                value = int(str(text))
            except ValueError:
                msg = f"--shard env: {name}={text!r} is not a whole number"
                raise ConfigError(msg) from None
            if minimum is not None and value < minimum:
                msg = f"--shard env: {name}={text!r} must be at least {minimum}"
                raise ConfigError(msg)
            return value

        if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
            # array ids need not start at 0 or be contiguous: --array=1-7:2 gives ids 1, 3, 5, 7
            low, step = number("SLURM_ARRAY_TASK_MIN", 0), number("SLURM_ARRAY_TASK_STEP", 1, minimum=1)
            index, count = (number("SLURM_ARRAY_TASK_ID") - low) // step, number("SLURM_ARRAY_TASK_COUNT")
        elif "RANK" in env and "WORLD_SIZE" in env:  # torchrun, or srun with these exported
            index, count = number("RANK"), number("WORLD_SIZE")
        elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
            index, count = number("SLURM_PROCID"), number("SLURM_NTASKS")
        else:
            raise ConfigError("--shard env: none of SLURM_ARRAY_TASK_ID/COUNT, RANK/WORLD_SIZE, SLURM_PROCID/NTASKS is set")
    else:
        index_text, _, count_text = shard.partition("/")
        if not (index_text.isdigit() and count_text.isdigit()):
            raise ConfigError(f"--shard must be I/N (such as 3/32) or env, got {shard!r}")
        index, count = int(index_text), int(count_text)
    return [f"runtime.shard_index={index}", f"runtime.num_shards={count}"]


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
    from xclip.store.runfile import merge_shards

    bar, update = _progress_callback(quiet)
    with _errors({**STORE_FLAGS, "allow_partial": "--allow-partial"}), bar or nullcontext():
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
    from xclip.show.figures import STOP_WORDS, FigureOptions, render_run

    bar, update = _progress_callback(quiet)
    with _errors(RENDER_FLAGS), bar or nullcontext():
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

    with _errors(STORE_FLAGS):
        report = describe_run(run_dir)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    console = Console()
    console.print(f"[bold]{report['file']}[/]  model {report['model']}  created {report['created']}")
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
    _print_input_warnings(console, report["unknown_words"], report["cropped_images"], limit=None,
                          truncated_captions=report["truncated_captions"])
    if report["accuracy"]["not_converged"]:
        _print_not_converged(console, report["accuracy"], limit=None)


def _print_input_warnings(console: Console, unknown_words: dict[str, Any], cropped_images: dict[str, Any], *,
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
    _print_table(console, table)  # at the terminal's width; numbers are never cut, also in an 80-column log
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


def _number(value: float | None, spec: str = ".2e") -> str:
    return "-" if value is None else format(value, spec)


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
    from xclip.analysis.grounding import DIRECTIONS, METRICS, bar_charts, evaluate_annotations, phrase_rows, summarize, write_misses
    from xclip.disk.files import write_text_atomically
    from xclip.store.describe import inputs_read_report

    if annotations is None and baselines is None:
        _print_error("nothing to evaluate: give --annotations (grounding), --baselines (faithfulness, and grounding with annotations) or both")
        raise typer.Exit(EXIT_USAGE)
    folder = out or (run_dir.parent if run_dir.suffix == ".h5" else run_dir) / "evaluation"
    if annotations is not None:
        with _errors(STORE_FLAGS):
            evaluation = evaluate_annotations(run_dir, annotations)
            if strict:
                _refuse_left_out(evaluation, annotations)
            scores = evaluation.scores
            report = summarize(scores, seed=seed)
            report["unmatched_phrases"] = [vars(u) for u in evaluation.unmatched_phrases]
            report["skipped_boxes"] = [{**vars(b), "box": list(b.box)} for b in evaluation.skipped_boxes]
            report["clipped_boxes"] = evaluation.n_clipped_boxes
            report["inputs_read"] = inputs_read_report(run_dir)  # truncated captions, unknown words, crops (xclip.attribution.inputs_read)
            write_text_atomically(folder / "report.json", json.dumps(report, indent=2) + "\n")
            write_text_atomically(folder / "phrases.jsonl", "".join(json.dumps(row) + "\n" for row in phrase_rows(scores)))
            charts = bar_charts(report, folder)
            found = write_misses(scores, folder / "misses.json", seed=seed)
        _print_left_out(evaluation, annotations)
        for direction in DIRECTIONS:  # one table a direction: three metric columns fit 100 terminal columns
            table = Table("class", *(m.replace("_", " ") for m in METRICS),
                          title=f"grounding, {direction.replace('_to_', ' → ')}: mean [95% CI] n (chance)")
            for label, stats in [("overall", report["overall"]), *report["per_class"].items()]:
                table.add_row(escape(label), *(_metric_cell(stats[f"{direction}/{m}"]) for m in METRICS))
            _print_table(Console(), table)
        if misses:
            with _errors(STORE_FLAGS):
                _print_misses(run_dir, found, misses, folder / "misses" if miss_figures else None)
        print(folder / "report.json")
        print(folder / "phrases.jsonl")
        print(folder / "misses.json")
        for chart in charts:
            print(chart)
    if baselines is not None:
        _evaluate_baselines(run_dir, annotations, folder, [name.strip() for name in baselines.split(",") if name.strip()],
                            target=baseline_target, game=game, n_points=curve_points, limit=limit, seed=seed, quiet=quiet)


def _refuse_left_out(evaluation: Any, annotations: Path) -> None:
    """--strict: an error naming the first unmatched phrases and skipped boxes, before anything is written."""
    from xclip.analysis.grounding import left_out_lines

    n_unmatched, n_skipped = len(evaluation.unmatched_phrases), len(evaluation.skipped_boxes)
    if n_unmatched or n_skipped:
        first = "; ".join(left_out_lines(evaluation.unmatched_phrases, evaluation.skipped_boxes, 3))
        msg = (f"--strict: {n_unmatched} annotated phrase(s) of {annotations} match no finished pair or no word the model "
               f"read, and {n_skipped} box(es) "
               f"lie wholly outside what the model saw (first: {first}); nothing was written")
        raise ConfigError(msg)


def _print_left_out(evaluation: Any, annotations: Path) -> None:
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


def _evaluate_baselines(run_dir: Path, annotations: Path | None, folder: Path, names: list[str], *, target: str,
                        game: str, n_points: int, limit: int | None, seed: int, quiet: bool) -> None:
    """Score the run's maps beside first-order methods, write OUT/baselines.json and its charts, print the tables."""
    from xclip.analysis.baseline_evaluation import CURVES, method_charts, score_methods, summarize_methods
    from xclip.analysis.grounding import METRICS
    from xclip.disk.files import write_text_atomically

    bar, update = _progress_callback(quiet)
    with _errors(STORE_FLAGS), bar or nullcontext():
        scores = score_methods(run_dir, names, annotations=annotations, target=target, game=game,  # type: ignore[arg-type]
                               n_points=n_points, limit=limit, seed=seed,
                               progress=(lambda done, total: update("baselines", done, total)) if update else None)
        report = summarize_methods(scores, seed=seed)
        report["target"], report["game"], report["curve_points"] = target, game, n_points
        write_text_atomically(folder / "baselines.json", json.dumps(report, indent=2) + "\n")
        charts = method_charts(report, folder)
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
        _print_table(console, table)
        classes = [label for label in report["grounding"] if label != "overall"]
        grounded = [m for m in report["methods"] if m in report["grounding"]["overall"]]
        per_class = Table("class", *grounded, title="pointing game per class: mean [95% CI] n")
        for label in classes:
            group = report["grounding"][label]
            per_class.add_row(escape(label), *(_mean_cell(group[m].get("pointing_game")) for m in grounded))
        _print_table(console, per_class)
    table = Table("method", *(f"area between\ncurves {c}" for c in CURVES), *(f"Δ {c}\nvs 2nd order" for c in CURVES),
                  title=f"insertion/deletion, {game} game, {report['n_pairs']} pairs: mean [95% CI] n of the area between the "
                        "insertion and deletion curves, divided by the mean score change v(full) − v(empty) over the pairs "
                        f"({report['faithfulness_scale']['divided_by']:.3g}); 0 = a ranking no better than chance, and it can pass 1")
    for method, entry in report["faithfulness"].items():
        table.add_row(method, *(_mean_cell(entry.get(c)) for c in CURVES), *(_paired_cell(entry.get(c)) for c in CURVES))
    _print_table(console, table)
    print(folder / "baselines.json")
    for chart in charts:
        print(chart)


def _summary_cell(value: object) -> str:
    """A value of a summary table: ``-`` where there is none (no finished pair to take a median of)."""
    if value is None:
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _print_table(console: Console, table: Table) -> None:
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

    if sum(most) <= room(table.box is not None):
        return console.print(table)
    if sum(least) > room(True):
        table.box, table.show_edge = box.SIMPLE_HEAD, False
    spare = max(0, room(table.box is not None and table.show_edge) - sum(least))
    wanted = [m - w for m, w in zip(most, least)]
    shares = [spare * want // max(1, sum(wanted)) for want in wanted]
    for column, width, share in zip(columns, least, shares):
        column.width = width + share
    return console.print(table)


def _mean_cell(stats: dict[str, Any] | None) -> str:
    """A method's mean and interval, or - where it has no such score."""
    return "-" if stats is None else _metric_cell(stats)


def _paired_cell(stats: dict[str, Any] | None) -> str:
    """A baseline's paired difference from the second-order maps, or - (the second-order row, a missing score)."""
    if stats is None or "difference" not in stats:
        return "-"
    return _difference_cell({"mean": stats["difference"], "ci95": stats["difference_ci95"], "n": stats["n"]})


@app.command()
def compare(
    runs: Annotated[list[Path], typer.Argument(help="two or more run directories over the same pairs (the first is the baseline)")],
    annotations: Annotated[Path, typer.Option("--annotations", "-a", help="phrase annotations (JSON lines)")],
    out: Annotated[Path, typer.Option(help="folder for comparison.json and the difference charts")] = Path("xclip-compare"),
    seed: Annotated[int, typer.Option(min=0, help="bootstrap seed")] = 0,
) -> None:
    """Grounding metrics of runs over the same pairs (two checkpoints, references, layers...) per phrase class,
    with each run's paired difference from the first and its 95% interval."""
    from xclip.analysis.comparison import compare_runs, difference_charts
    from xclip.analysis.grounding import DIRECTIONS, METRICS
    from xclip.disk.files import write_text_atomically

    with _errors(STORE_FLAGS):
        report = compare_runs(runs, annotations, seed=seed)
        write_text_atomically(out / "comparison.json", json.dumps(report, indent=2) + "\n")
        charts = difference_charts(report, out)
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
        _print_table(Console(), table)
    print(out / "comparison.json")
    for chart in charts:
        print(chart)


def _difference_cell(stats: dict[str, Any]) -> str:
    from xclip.analysis.box_metrics import interval_text

    return interval_text(stats["mean"], stats["ci95"], stats["n"], signed=True)


def _print_misses(run_dir: Path, found: dict[str, Any], per_class: int, figures: Path | None) -> None:
    """The worst misses of each class with their viewer links (and figures), then the failure patterns."""
    listed: list[dict[str, Any]] = []
    for label in sorted({miss["label"] for miss in found["misses"]}):
        listed += [miss for miss in found["misses"] if miss["label"] == label][:per_class]
    if not listed:
        print("misses: none (every phrase's map peaks inside its boxes)")
    else:
        table = Table("class", "pair", "phrase", "energy in box", "image",
                      title=f"phrases whose map misses their box: {len(found['misses'])}, the {per_class} worst of each class")
        for miss in listed:
            table.add_row(escape(miss["label"]), str(miss["pair"]), escape(miss["phrase"]), f"{miss['energy_in_box']:.3f}",
                          escape(miss["image"]))
        _print_table(Console(), table)
        print("their links, with `xclip view` on its default port:")
        for miss in listed:  # whole lines: a link cut by a table's border cannot be opened
            print(f"  pair {miss['pair']} {miss['phrase']!r}: http://127.0.0.1:8765/{miss['link']}")
    for name, rows in found["patterns"].items():
        patterns = Table(name.replace("_", " "), "pointing game [95% CI] n", title="where maps miss")
        for row in rows:
            patterns.add_row(escape(row["group"]), _metric_cell({"mean": row["pointing_game"], "ci95": row["ci95"], "n": row["n_phrases"]}))
        _print_table(Console(), patterns)
    if figures is not None:
        from xclip.show.figures import render_run

        for miss in listed:
            for written in render_run(run_dir, pairs=[miss["pair"]], span=miss["phrase"], out=figures).written:
                print(written)


def _metric_cell(stats: dict[str, Any]) -> str:
    from xclip.analysis.box_metrics import interval_text

    chance = f" ({stats['chance']:.2f})" if stats.get("chance") is not None else ""
    return interval_text(stats["mean"], stats["ci95"], stats["n"]) + chance


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="folder for the scenes, metadata.jsonl and annotations.jsonl")],
    n: Annotated[int, typer.Option("--n", min=1, help="number of scenes")] = 100,
    seed: Annotated[int, typer.Option(min=0, help="scene seed (the demo model trained on seeds below 10000)")] = 20000,
    size: Annotated[int, typer.Option(min=32, max=4096, help="image side in pixels")] = 64,
) -> None:
    """Generate captioned shape scenes with exact phrase boxes: ground truth for `xclip evaluate`."""
    from xclip.analysis.synthetic import generate, write_scenes

    with _errors():
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

    with _errors():
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


# advice a run file gives any reader: start it again with `xclip attribute --overwrite`
STORE_FLAGS = {"overwrite": "--overwrite"}
# what the library's settings are called where the user typed them: config keys for a run config, flags for
# the commands that take them as options
CONFIG_KEYS = {
    **{name: f"model.{name}" for name in ("checkpoint", "revision", "dtype", "device")},
    "name_or_path": "model.name",
    **{name: f"attribution.{name}" for name in (
        "text_layer", "image_layer", "tolerance", "max_steps", "n_steps", "rule", "convention", "text_filler",
        "image_reference", "reference_seed", "blur_radius", "scale_by_logit", "mode", "panel_layout")},
    "internal_batch_size": "runtime.internal_batch_size",
    "image_resize": "image.resize",
    **STORE_FLAGS,
}
FIGURE_FLAGS = {**STORE_FLAGS, "scale": "--scale", "dpi": "--dpi", "layout": "--layout", "upsample": "--upsample", "file_format": "--format"}
RENDER_FLAGS = {**FIGURE_FLAGS, "span": "--span", "box": "--box", "limit": "--limit", "data_root": "--data-root"}
EXPLAIN_FLAGS = {**CONFIG_KEYS, **FIGURE_FLAGS, "name_or_path": "--model", "image_resize": "--resize", "checkpoint": "--checkpoint", "dtype": "--dtype", "device": "--device"}


@contextmanager
def _errors(names: dict[str, str] | None = None) -> Iterator[None]:
    """Errors a user can cause as one message on stderr and an exit code: 2 for config and usage, 1 at runtime;
    a library setting at fault is called by its flag or config key in ``names``. Anything else is a bug in
    xclip and keeps its traceback; ``XCLIP_DEBUG=1`` shows tracebacks of all."""
    try:
        yield
    except Exception as e:
        if os.environ.get("XCLIP_DEBUG"):
            raise
        if isinstance(e, XclipError) and e.setting in (names or {}):
            message = e.naming((names or {})[e.setting])
        else:
            message = str(e)
        if isinstance(e, (ConfigError, RunUnavailable)):  # refused before anything was read or written
            _print_error(message)
            raise typer.Exit(EXIT_USAGE) from None
        if isinstance(e, XclipError):
            # a traceback helps only where the message wraps an error of a library (a model that fails to load)
            _print_error(f"{message}\n(set XCLIP_DEBUG=1 for a traceback)" if e.__cause__ is not None else message)
            raise typer.Exit(EXIT_ERROR) from None
        if isinstance(e, OSError) and e.errno is not None:  # the system's: a full disk, a permission
            _print_error(f"{e.strerror}: {e.filename or ''} (errno {e.errno}){' ' + repr(e.filename2) if e.filename2 else ''}")
            raise typer.Exit(EXIT_ERROR) from None
        if _is_out_of_memory(e):
            _print_error(f"out of memory: lower runtime.internal_batch_size (or runtime.batch_size) and rerun to resume ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            raise typer.Exit(EXIT_ERROR) from None
        raise


def _is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, MemoryError):
        return True
    import torch

    return isinstance(error, torch.OutOfMemoryError)


def _print_error(message: str) -> None:
    # plain print: Rich would wrap long paths and file:line locations at the console width
    print(f"Error: {message}", file=sys.stderr, flush=True)


def main() -> None:
    """Console entry point. OpenMP's passive wait and the number of CPU threads go into the environment before any
    command imports torch (:func:`xclip.threads.prepare_process`); a variable the user set is kept."""
    from xclip.threads import prepare_process

    prepare_process()
    app()
