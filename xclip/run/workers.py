"""One run spread over worker processes: a shard of the pairs per device (``xclip attribute --devices``) or per
Ray task (``scripts/ray_attribute.py``), merged into one run file when every shard finished.

The shard plan is pure (:func:`plan_shards`, :func:`attribute_arguments`, :func:`needs_rerun`): which block of
the pairs each worker takes, the ``xclip attribute`` command line it runs, and which outcomes a rerun of the
same command line can finish (the run store resumes a shard where it stopped). :func:`attribute_on_devices`
runs the plan as child processes of this Python on one machine. No terminal code here: progress and the
workers' messages go to callbacks.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Literal

from xclip.errors import EXIT_FAILED_ITEMS, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, ConfigError
from xclip.threads import available_cpus

if TYPE_CHECKING:  # the CLI imports this module at start: the config's, the store's and torch's modules only when used
    from xclip.config import RunConfig
    from xclip.run.runner import RunSummary

Progress = Callable[[str, int, int], None]  # (stage, done, total), summed over the workers
Message = Callable[["ShardTask", str], None]  # a line a worker wrote on stderr

# the hidden option of `xclip attribute` that makes it a worker: progress and its summary as JSON lines on stdout;
# its value is the parent's command line, which the shard's run file and writer lock record
WORKER_OPTION = "--worker"
EXIT_FINISHED = (EXIT_OK, EXIT_FAILED_ITEMS)  # every pair done, or done and failed: the shard is finished
Outcome = Literal["finished", "interrupted", "refused", "failed"]


@dataclass(frozen=True)
class ShardTask:
    """One worker's part of a run: block ``index`` of ``count`` of the pairs, on ``device`` (``model.device``),
    with ``threads`` CPU threads (``runtime.threads``; None: the worker's own default)."""

    index: int
    count: int
    device: str
    threads: int | None = None

    def overrides(self) -> list[str]:
        """The config overrides that make ``xclip attribute`` run this task."""
        threads = [] if self.threads is None else [f"runtime.threads={self.threads}"]
        return [f"runtime.shard_index={self.index}", f"runtime.num_shards={self.count}", f"model.device={self.device}", *threads]

    @property
    def name(self) -> str:
        return f"shard {self.index}/{self.count} ({self.device})"


def plan_shards(devices: Sequence[str], threads: int | None = None) -> list[ShardTask]:
    """A task per device: task ``i`` takes the ``i``-th of ``len(devices)`` contiguous blocks of the pairs (the
    same blocks ``--shard i/N`` takes) on ``devices[i]``, with ``threads`` CPU threads each."""
    if len(devices) < 2:
        msg = f"a run spread over workers needs at least two of them, got {len(devices)}"
        raise ConfigError(msg)
    return [ShardTask(index, len(devices), device, threads) for index, device in enumerate(devices)]


def attribute_arguments(config: Path, overrides: Sequence[str], task: ShardTask) -> list[str]:
    """The ``xclip`` arguments that run ``task``: the user's overrides, then the task's (which win)."""
    return ["attribute", str(config), *overrides, *task.overrides()]


def needs_rerun(exit_code: int) -> bool:
    """Whether rerunning a worker that exited with ``exit_code`` can finish its shard: yes after an interruption
    (75), a runtime error (1: out of memory, a lost file system) or a death by a signal (negative: the OOM
    killer, a preempted node), since the rerun resumes the shard; no once it finished (0, or 3 with failed items,
    which a rerun of the whole run retries) or was refused before it wrote anything (2: the same refusal again)."""
    return exit_code not in (*EXIT_FINISHED, EXIT_USAGE)


def outcome_of(exit_code: int, *, was_stopped: bool = False) -> Outcome:
    """What a worker's exit code says about its shard; a worker that died by a signal this process sent it (a
    SIGTERM that came before its handler was installed, or the SIGKILL of a second stop request) counts as
    interrupted."""
    if exit_code in EXIT_FINISHED:
        return "finished"
    if exit_code == EXIT_INTERRUPTED or (was_stopped and exit_code in (-signal.SIGTERM, -signal.SIGKILL)):
        return "interrupted"
    return "refused" if exit_code == EXIT_USAGE else "failed"


def combined_exit_code(outcomes: Sequence[Outcome]) -> int:
    """The exit code of a run whose shards did not all finish: 1 where a worker failed, else 2 where one was
    refused, else 75 (interrupted: rerun the same command)."""
    if "failed" in outcomes:
        return 1
    return EXIT_USAGE if "refused" in outcomes else EXIT_INTERRUPTED


def worker_threads(n_workers: int, setting: int | None, cpus: int) -> int:
    """Each worker's CPU threads: ``runtime.threads`` where it is set (then per worker), else the ``cpus`` this
    process may use split evenly between the workers (at least one each), so that they do not oversubscribe the
    CPUs that one process alone would use."""
    return setting if setting is not None else max(1, cpus // n_workers)


def parse_devices(text: str, gpu_count: Callable[[], int]) -> list[str]:
    """``--devices``: ``cuda:0,cuda:1,...`` or ``cpu,cpu,...`` (a device may repeat: two workers share it), or
    ``auto``: every GPU ``gpu_count()`` says this process sees."""
    if text.strip() == "auto":
        n_gpus = gpu_count()
        if n_gpus == 0:
            msg = "auto starts a worker per visible GPU, and this process sees none; name CPU workers as cpu,cpu"
            raise ConfigError(msg, setting="devices")
        return [f"cuda:{index}" for index in range(n_gpus)]
    devices = [name.strip() for name in text.split(",")]
    for name in devices:
        kind, _, index = name.partition(":")
        if not (name == "cpu" or (kind == "cuda" and index.isdigit())):
            msg = f"{name!r} is not a device for a worker; give cuda:N (a GPU) or cpu, comma-separated, or auto (every visible GPU)"
            raise ConfigError(msg, setting="devices")
    n_gpus = gpu_count() if any(name != "cpu" for name in devices) else 0
    beyond = [name for name in devices if name != "cpu" and int(name.partition(":")[2]) >= n_gpus]
    if beyond:
        msg = f"{', '.join(beyond)}: this process sees {n_gpus} GPU(s) (cuda:0 to cuda:{n_gpus - 1})" if n_gpus else f"{', '.join(beyond)}: this process sees no GPU"
        raise ConfigError(msg, setting="devices")
    return devices


def visible_gpus() -> int:
    """The CUDA devices this process sees (``CUDA_VISIBLE_DEVICES`` applies)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# --- the protocol between `xclip attribute --devices` and its workers ---------------------------------------------
def progress_line(stage: str, done: int, total: int) -> str:
    """A worker's progress report: one JSON line on its stdout."""
    return json.dumps({"stage": stage, "done": done, "total": total})


def summary_line(n_done: int, n_skipped: int) -> str:
    """A worker's last line on stdout: the pairs it finished and the pairs it found finished."""
    return json.dumps({"done": n_done, "skipped": n_skipped})


# --- running the plan on one machine ------------------------------------------------------------------------------
@dataclass
class WorkerResult:
    """How one worker ended."""

    task: ShardTask
    exit_code: int
    outcome: Outcome
    n_done: int = 0  # pairs it finished (from its summary line; 0 without one)
    n_skipped: int = 0  # pairs it found finished
    last_message: str = ""  # its last line on stderr: the error, where it failed


@dataclass
class DevicesResult:
    """A run spread over devices: each worker's end and, when every shard finished, the merged run file's
    summary (``summary.directory / run.h5``)."""

    workers: list[WorkerResult]
    summary: RunSummary | None = None  # of the merged run; None where the shards did not all finish
    seconds: float = 0.0

    @property
    def unfinished(self) -> list[WorkerResult]:
        return [worker for worker in self.workers if worker.outcome != "finished"]

    @property
    def exit_code(self) -> int:
        """As one process's: 0, 3 (failed items or rejected records), 75 (interrupted), 1 or 2; see
        :func:`combined_exit_code` for shards that did not all finish."""
        if self.unfinished:
            return combined_exit_code([worker.outcome for worker in self.unfinished])
        assert self.summary is not None
        return 3 if self.summary.n_failed or self.summary.n_rejected else 0


def attribute_on_devices(
    config_path: Path,
    overrides: Sequence[str],
    devices: Sequence[str],
    *,
    overwrite: bool = False,
    command: str = "",
    on_progress: Progress | None = None,
    on_message: Message | None = None,
    stop_requests: Callable[[], int] = lambda: 0,
    on_merge: Callable[[int, int], None] | None = None,
) -> DevicesResult:
    """Attribute a run config's pairs with one ``xclip attribute`` worker process per device, each on its block of
    the pairs (``OUTPUT/shard-IIIII-of-NNNNN``), then merge the shards into ``OUTPUT/run.h5``.

    Each worker gets :func:`worker_threads` CPU threads (``runtime.threads`` where set, else this process's CPUs
    split between them). Workers run in their own session, so a terminal's Ctrl-C reaches this process only;
    ``stop_requests()`` is the number of stop signals this process received: at the first, the live workers get
    SIGTERM and finish their batch; at a second, SIGKILL (the store keeps every batch written before it). A
    worker also stops when this process dies (its stdin closes). The shards are merged only when every worker
    finished; otherwise they stay as they are, and a rerun of the same command resumes each of them.

    Raises:
        ConfigError: an invalid config, one that sets its own shards (``runtime.num_shards``), an output
            directory holding shards of another split or (without ``overwrite``) a run that is not a merge.
    """
    config = load_spread_config(config_path, overrides, len(devices), overwrite=overwrite)
    tasks = plan_shards(devices, worker_threads(len(devices), config.runtime.threads, available_cpus()))
    started = time.perf_counter()
    arguments = [[*attribute_arguments(config_path, overrides, task), *(["--overwrite"] if overwrite else []), WORKER_OPTION, command]
                 for task in tasks]
    workers = _run_workers(tasks, arguments, on_progress or (lambda stage, done, total: None),
                           on_message or (lambda task, line: None), stop_requests)
    result = DevicesResult(workers)
    if not result.unfinished:
        from xclip.run.runner import summarise_run
        from xclip.store.merge import merge_shards

        merge_shards(config.output.directory, overwrite=overwrite, progress=on_merge)
        result.summary = summarise_run(config.output.directory, sum(w.n_skipped for w in workers),
                                       crop_warning=config.image.crop_warning)
    result.seconds = time.perf_counter() - started
    if result.summary is not None:
        result.summary.seconds = result.seconds
    return result


def load_spread_config(config_path: Path, overrides: Sequence[str], n_shards: int, *, overwrite: bool = False) -> RunConfig:
    """The run config of a run spread over ``n_shards`` workers, refused (:class:`ConfigError`) before any worker
    starts where it sets shards of its own (``runtime.num_shards``), or where something would stop the merge
    after all the work: shards of another split in the output directory, or a run file there that is not a
    merge of shards (kept unless ``overwrite``)."""
    from xclip.config import load_config

    config = load_config(config_path, list(overrides))
    if config.runtime.num_shards != 1:
        msg = (f"the config already splits the run into {config.runtime.num_shards} shards (runtime.num_shards), and each "
               f"worker takes a shard of its own: leave runtime.shard_index and runtime.num_shards out")
        raise ConfigError(msg, setting="devices")
    _check_output(config, n_shards, overwrite)
    return config


def _check_output(config: RunConfig, n_shards: int, overwrite: bool) -> None:
    output = config.output.directory
    others = sorted(path.name for path in output.glob("shard-*-of-*") if not path.name.endswith(f"-of-{n_shards:05d}"))
    if others:
        msg = (f"{output} holds shards of another split ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}): "
               f"rerun with as many workers as it has shards, or give another output.directory")
        raise ConfigError(msg, setting="devices")
    from xclip.store.layout import open_for_reading
    from xclip.store.schema import RUN_FILE

    target = output / RUN_FILE
    if overwrite or not target.is_file():
        return
    try:
        with open_for_reading(target) as held:
            is_merge = "merged_from" in held.attrs
    except OSError:
        is_merge = False
    if not is_merge:
        msg = (f"{target} exists and is no merge of shards (a run of its own?): the merge of the workers' shards would "
               f"replace it; give another output.directory, or pass overwrite=True to replace it")
        raise ConfigError(msg, setting="overwrite")


def worker_environment(threads: int | None, environ: Mapping[str, str]) -> dict[str, str]:
    """The parent's environment, with OpenMP's pools sized to the worker's ``threads`` (torch, MKL and OpenMP read
    ``OMP_NUM_THREADS`` when torch loads, before ``runtime.threads`` applies) and Python's output unbuffered."""
    environment = {**environ, "PYTHONUNBUFFERED": "1"}
    if threads is not None:
        environment["OMP_NUM_THREADS"] = str(threads)
    return environment


def _run_workers(tasks: list[ShardTask], arguments: list[list[str]], on_progress: Progress, on_message: Message,
                 stop_requests: Callable[[], int]) -> list[WorkerResult]:
    """Start a worker per task, relay its progress and messages, forward stop requests; how each ended."""
    events: queue.Queue[tuple[int, str, str | None]] = queue.Queue()
    processes: list[subprocess.Popen[str]] = []
    try:
        for task, argv in zip(tasks, arguments):
            process = subprocess.Popen(
                [sys.executable, "-m", "xclip", *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace", start_new_session=True,
                env=worker_environment(task.threads, os.environ),
            )
            processes.append(process)
            for stream, kind in ((process.stdout, "out"), (process.stderr, "err")):
                threading.Thread(target=_read_lines, args=(stream, len(processes) - 1, kind, events), daemon=True).start()
        return _relay(tasks, processes, events, on_progress, on_message, stop_requests)
    finally:
        for process in processes:  # only reached with live workers when this process fails itself
            if process.poll() is None:
                process.kill()
            process.wait()
            if process.stdin is not None:
                process.stdin.close()


def _read_lines(stream: IO[str] | None, worker: int, kind: str, events: queue.Queue[tuple[int, str, str | None]]) -> None:
    assert stream is not None
    for line in stream:
        events.put((worker, kind, line.rstrip("\n")))
    events.put((worker, kind, None))  # end of the stream


def _relay(tasks: list[ShardTask], processes: list[subprocess.Popen[str]], events: queue.Queue[tuple[int, str, str | None]],
           on_progress: Progress, on_message: Message, stop_requests: Callable[[], int]) -> list[WorkerResult]:
    """Until every worker closed its output: progress summed over the workers, messages passed on, stop requests
    forwarded; then each worker's exit."""
    latest: dict[str, dict[int, tuple[int, int]]] = {}  # stage -> worker -> (done, total)
    summaries: dict[int, dict[str, int]] = {}
    last_message = [""] * len(tasks)
    open_streams, forwarded = 2 * len(tasks), 0
    while open_streams:
        requested = stop_requests()
        if requested > forwarded:
            forwarded = requested
            for process in processes:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM if forwarded == 1 else signal.SIGKILL)
        try:
            worker, kind, line = events.get(timeout=0.1)
        except queue.Empty:
            continue
        if line is None:
            open_streams -= 1
        elif kind == "err":
            last_message[worker] = line
            on_message(tasks[worker], line)
        else:
            report = parse_report(line)
            if report is None:  # something a library printed on stdout
                on_message(tasks[worker], line)
            elif "stage" in report:
                stage = latest.setdefault(report["stage"], {})
                stage[worker] = (report["done"], report["total"])
                on_progress(report["stage"], sum(done for done, _ in stage.values()), sum(total for _, total in stage.values()))
            else:
                summaries[worker] = report
    results = []
    for index, (task, process) in enumerate(zip(tasks, processes)):
        code = process.wait()
        summary = summaries.get(index, {})
        results.append(WorkerResult(task, code, outcome_of(code, was_stopped=forwarded > 0), summary.get("done", 0),
                                    summary.get("skipped", 0), last_message[index]))
    return results


def parse_report(line: str) -> dict | None:
    """A worker's JSON report, or None for any other line."""
    try:
        report = json.loads(line)
    except ValueError:
        return None
    return report if isinstance(report, dict) and ({"stage", "done", "total"} <= report.keys() or {"done", "skipped"} == report.keys()) else None


def watch_parent(stdin: IO[str], stop: Callable[[], None]) -> threading.Thread:
    """In a worker: call ``stop()`` when its parent dies, which closes the worker's stdin (the parent never writes
    to it), so that workers never outlive the command that started them."""

    def wait_for_end() -> None:
        for _ in stdin:
            pass
        stop()

    thread = threading.Thread(target=wait_for_end, daemon=True)
    thread.start()
    return thread
