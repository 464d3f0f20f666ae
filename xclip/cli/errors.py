"""How errors reach a user of the command line: one message on stderr, called by the flag or config key the user
typed, and an exit code that tells scripts and schedulers what happened."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import fields
from contextlib import contextmanager

import typer

from xclip.core.rules import AttributionSettings
from xclip.errors import EXIT_ERROR, EXIT_FAILED_ITEMS, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, ConfigError, RunUnavailable, XclipError  # noqa: F401  (the commands take the exit codes from here)

# advice a run file gives any reader: start it again with `xclip attribute --overwrite`
STORE_FLAGS = {"overwrite": "--overwrite"}
# what the library's settings are called where the user typed them: config keys for a run config, flags for
# the commands that take them as options
CONFIG_KEYS = {
    **{name: f"model.{name}" for name in ("checkpoint", "revision", "dtype", "device")},
    "name_or_path": "model.name",
    **{name: f"attribution.{name}" for name in [*(f.name for f in fields(AttributionSettings)), "panel_layout"]},
    "internal_batch_size": "runtime.internal_batch_size",
    "image_resize": "image.resize",
    **STORE_FLAGS,
}
DEVICE_FLAGS = {**CONFIG_KEYS, "devices": "--devices"}
FIGURE_FLAGS = {**STORE_FLAGS, "scale": "--scale", "dpi": "--dpi", "layout": "--layout", "upsample": "--upsample", "file_format": "--format"}
RENDER_FLAGS = {**FIGURE_FLAGS, "span": "--span", "box": "--box", "limit": "--limit", "data_root": "--data-root"}
EXPLAIN_FLAGS = {**CONFIG_KEYS, **FIGURE_FLAGS, "name_or_path": "--model", "image_resize": "--resize", "checkpoint": "--checkpoint", "dtype": "--dtype", "device": "--device"}


@contextmanager
def user_errors(names: dict[str, str] | None = None) -> Iterator[None]:
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
            print_error(message)
            raise typer.Exit(EXIT_USAGE) from None
        if isinstance(e, XclipError):
            # a traceback helps only where the message wraps an error of a library (a model that fails to load)
            print_error(f"{message}\n(set XCLIP_DEBUG=1 for a traceback)" if e.__cause__ is not None else message)
            raise typer.Exit(EXIT_ERROR) from None
        if isinstance(e, OSError) and e.errno is not None:  # the system's: a full disk, a permission
            print_error(f"{e.strerror}: {e.filename or ''} (errno {e.errno}){' ' + repr(e.filename2) if e.filename2 else ''}")
            raise typer.Exit(EXIT_ERROR) from None
        if _is_out_of_memory(e):
            print_error(f"out of memory: lower runtime.internal_batch_size (or runtime.batch_size) and rerun to resume ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            raise typer.Exit(EXIT_ERROR) from None
        raise


def _is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, MemoryError):
        return True
    import torch

    return isinstance(error, torch.OutOfMemoryError)


def print_error(message: str) -> None:
    # plain print: Rich would wrap long paths and file:line locations at the console width
    print(f"Error: {message}", file=sys.stderr, flush=True)
