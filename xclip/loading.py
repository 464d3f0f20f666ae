"""Load an HF CLIP or SigLIP checkpoint (hub id or local directory) into its family adapter."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch

from xclip.adapters import DualEncoderAdapter, get_adapter_cls
from xclip.errors import ConfigError, ModelFamilyError

Dtype = Literal["float32", "bfloat16", "float16", "float64"]
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64,
}


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; raises :class:`ConfigError` for an unusable device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        msg = f"invalid device {device!r}: {e}"
        raise ConfigError(msg) from e
    if resolved.type == "cuda" and not torch.cuda.is_available():
        msg = f"device {device!r} was requested but CUDA is not available; use device 'cpu' or 'auto'"
        raise ConfigError(msg)
    return resolved


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        msg = f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}"
        raise ConfigError(msg) from None


def looks_like_path(name: str) -> bool:
    """A model name that can only be a directory, never a hub id (``name`` or ``namespace/name``)."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or name.endswith("/")


def _is_offline(local_files_only: bool) -> bool:
    return local_files_only or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' loading chatter (missing torchvision, unused weights) for batch logs."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    had_bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Loading weights" bars would fill Slurm logs
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if had_bars:
            hf_logging.enable_progress_bar()


def load_model(
    name_or_path: str | Path,
    *,
    revision: str | None = None,
    dtype: str | torch.dtype = "float32",
    device: str = "auto",
    local_files_only: bool = False,
) -> DualEncoderAdapter:
    """Load a dual encoder and its processor through ``from_pretrained`` and wrap it in its family adapter.

    Args:
        name_or_path: a hub id (``openai/clip-vit-base-patch32``) or a local directory.
        revision: a branch, tag or commit hash to pin (hub ids only).
        dtype: ``float32`` (default), ``bfloat16``, ``float16`` or ``float64``.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        ModelFamilyError: the checkpoint cannot be loaded or its family has no adapter.
        ConfigError: bad dtype or device.
    """
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers import AutoConfig, AutoModel, AutoProcessor

    torch_dtype = resolve_dtype(dtype)
    torch_device = resolve_device(device)
    source = str(name_or_path)
    directory = Path(source).expanduser()
    if directory.is_dir():
        if not (directory / "config.json").is_file():
            msg = f"{directory.resolve()} holds no config.json, so it is not a transformers checkpoint (save one with save_pretrained)"
            raise ModelFamilyError(msg)
    elif looks_like_path(source):
        msg = f"no model directory at {directory.resolve()}"
        raise ModelFamilyError(msg)
    options = {"revision": revision, "local_files_only": local_files_only, "trust_remote_code": False}
    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(source, **options)
            adapter_cls = get_adapter_cls(config.model_type)
            model = AutoModel.from_pretrained(source, dtype=torch_dtype, **options)
            processor = AutoProcessor.from_pretrained(source, **options)
    except (OSError, ValueError) as e:
        if not directory.is_dir() and _is_offline(local_files_only):
            msg = (
                f"cannot load model {source!r}: it is not a local directory, and offline "
                "(model.local_files_only or HF_HUB_OFFLINE=1) a hub id must already be in the Hugging Face cache: "
                f"download it once with network access, or name a local checkpoint ({str(e).splitlines()[0]})"
            )
        else:
            msg = f"cannot load model {source!r}: {e}"
        raise ModelFamilyError(msg) from e
    return adapter_cls(model.to(torch_device), processor, name=source, revision=revision)
