"""Errors that xclip raises for bad input, models or files; each message names the problem."""

from __future__ import annotations

import re


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
