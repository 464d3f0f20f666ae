"""Errors that xclip raises for bad input, models or files; each message names the problem."""

from __future__ import annotations


class XclipError(Exception):
    """Base of every error caused by user input, a model or a file (not by a bug in xclip)."""


class ConfigError(XclipError):
    """An invalid setting: unknown layer, rule, dtype, device or config key."""


class InputError(XclipError):
    """A caption or image that cannot be attributed (empty caption, unreadable or wrong-typed image)."""


class ModelFamilyError(XclipError):
    """A checkpoint whose ``model_type`` has no adapter, or that cannot be loaded."""


class StoreError(XclipError):
    """A run directory or HDF5 file that cannot be read or written."""
