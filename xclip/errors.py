"""Errors that xclip raises for bad input, models or files; each message names the problem."""

from __future__ import annotations

import difflib
import functools
import inspect
import re
from collections.abc import Callable
from typing import Any, TypeVar

# the exit codes of every command: done, an error, a refused request (usage, config), done with failed items, interrupted
# (a rerun resumes); Slurm's requeue and the --devices workers read them
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_FAILED_ITEMS, EXIT_INTERRUPTED = 0, 1, 2, 3, 75

F = TypeVar("F", bound=Callable[..., Any])


class XclipError(Exception):
    """Base of every error caused by user input, a model or a file (not by a bug in xclip).

    ``setting`` names the library setting at fault (``"checkpoint"``, ``"n_steps"``, ``"box"``), by its name in
    the API; the command line says it as the flag or config key the user typed (see :meth:`naming`).
    """

    def __init__(self, message: str, *, setting: str | None = None) -> None:
        super().__init__(message)
        self.setting = setting

    def naming(self, name: str) -> str:
        """The message with the setting called ``name`` (``--checkpoint``, ``model.checkpoint``). A message
        either starts with the setting's API name or advises it as ``setting=True`` (``overwrite=True``): that
        is replaced; any other message is prefixed with ``name:``."""
        message = str(self)
        if not self.setting:
            return message
        if f"{self.setting}=True" in message:
            return message.replace(f"{self.setting}=True", name)
        if re.match(rf"{re.escape(self.setting)}\b", message):
            return name + message[len(self.setting) :]
        return f"{name}: {message}"


class ConfigError(XclipError):
    """An invalid setting: unknown layer, rule, dtype, device or config key."""


class InputError(XclipError):
    """A caption or image that cannot be attributed (empty caption, unreadable or wrong-typed image)."""


class ModelFamilyError(XclipError):
    """A checkpoint whose ``model_type`` has no adapter, or that cannot be loaded."""


class StoreError(XclipError):
    """A run directory or HDF5 file that cannot be read or written."""


class RunUnavailable(StoreError):
    """A run directory that cannot be used as given: no run file there, a path that is no directory or cannot
    hold files, or one that another live process is writing. Refused before anything was read or written: a
    wrong path or a second writer, not a fault of a file."""


def hint_unknown_arguments(renamed: dict[str, str]) -> Callable[[F], F]:
    """Make a function's TypeError for an unknown keyword argument say what to write instead: the new name of
    a renamed one (``renamed``: old -> new), else the closest parameter name."""

    def decorate(function: F) -> F:
        parameters = inspect.signature(function).parameters

        @functools.wraps(function)
        def checked(*args: Any, **kwargs: Any) -> Any:
            for name in kwargs:
                if name in parameters:
                    continue
                if name in renamed:
                    hint = f"it is called {renamed[name]} now"
                else:
                    close = difflib.get_close_matches(name, parameters, n=1)
                    hint = f"did you mean {close[0]}?" if close else f"the parameters are {', '.join(p for p in parameters if p != 'self')}"
                msg = f"{function.__qualname__.removesuffix('.__init__')}() got an unexpected keyword argument {name!r}: {hint}"
                raise TypeError(msg)
            return function(*args, **kwargs)

        return checked  # type: ignore[return-value]

    return decorate
