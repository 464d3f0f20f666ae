"""Load a checkpoint into its family adapter: transformers CLIP and SigLIP (hub id or local directory), and
open_clip's own models (``open_clip:ARCH/TAG``, ``hf-hub:ORG/NAME``, a local checkpoint file)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from xclip.models.families import DualEncoderAdapter, get_adapter_cls
from xclip.errors import ConfigError, ModelFamilyError
from xclip.models.names import (  # noqa: F401  (re-exported)
    OPEN_CLIP_CONFIG, OPEN_CLIP_PREFIX, SHIPPED_MODELS, SHIPPED_PREFIX, Dtype, looks_like_path, resolve_model_name, shipped_model,
)
from xclip.core.geometry import ImageResize, check_image_resize


DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64,
}


# the local rank of a process among those a launcher started on one machine: torchrun's, then srun's
LOCAL_RANK_VARIABLES = ("LOCAL_RANK", "SLURM_LOCALID")


def resolve_device(device: str = "auto", environ: Mapping[str, str] = os.environ) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU: the GPU of this process's local rank where a launcher set one
    (``LOCAL_RANK`` under torchrun, ``SLURM_LOCALID`` under srun), so that every rank of one machine takes its own
    GPU; a process that sees one GPU (a launcher bound it) takes that one. Raises :class:`ConfigError` for an
    unusable device."""
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", _local_gpu(environ, torch.cuda.device_count()))
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        msg = f"invalid device {device!r}: {e}"
        raise ConfigError(msg, setting="device") from e
    if resolved.type not in ("cpu", "cuda", "mps"):  # meta holds no data; other backends are untested
        msg = f"device {device!r} is not supported; use auto, cpu, cuda, cuda:N or mps"
        raise ConfigError(msg, setting="device")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        msg = f"device {device!r} was requested but CUDA is not available; use device 'cpu' or 'auto'"
        raise ConfigError(msg, setting="device")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        msg = f"device {device!r} was requested but there are {torch.cuda.device_count()} CUDA device(s); use cuda:0 to cuda:{torch.cuda.device_count() - 1}"
        raise ConfigError(msg, setting="device")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        msg = f"device {device!r} was requested but MPS is not available; use device 'cpu' or 'auto'"
        raise ConfigError(msg, setting="device")
    return resolved


def _local_gpu(environ: Mapping[str, str], n_gpus: int) -> int:
    for name in LOCAL_RANK_VARIABLES:
        value = environ.get(name, "").strip()
        if not value:
            continue
        if not value.isdigit():
            msg = f"auto reads the local rank from {name}, which is {value!r}, not a number"
            raise ConfigError(msg, setting="device")
        if n_gpus == 1:  # the launcher gave this process one GPU (CUDA_VISIBLE_DEVICES): it is cuda:0 here
            return 0
        if int(value) >= n_gpus:
            msg = (f"auto: {name}={value} names a GPU this process cannot see ({n_gpus} visible); start "
                   f"at most {n_gpus} processes per machine or give each one GPU")
            raise ConfigError(msg, setting="device")
        return int(value)
    return 0


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        msg = f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}"
        raise ConfigError(msg) from None


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
    checkpoint: str | Path | None = None,
    image_resize: ImageResize = "native",
) -> DualEncoderAdapter:
    """Load a dual encoder with its tokenizer and image preprocessing and wrap it in its family adapter:
    transformers' ``from_pretrained`` for CLIP and SigLIP checkpoints, open_clip's own loader for open_clip models.

    Args:
        name_or_path: a hub id (``openai/clip-vit-base-patch32``) or a local directory of a transformers
            checkpoint; ``xclip:demo``, the small CLIP shipped inside the package (``xclip:demo-no-star``, its
            second checkpoint); or an open_clip model: ``open_clip:ARCH/PRETRAINED_TAG`` (``open_clip:ViT-B-32/openai``),
            ``open_clip:ARCH`` with ``checkpoint``, ``hf-hub:ORG/NAME`` (a hub repository in open_clip's
            format), or a local directory holding ``open_clip_config.json``.
        checkpoint: a weights file (``.safetensors``, or ``.pt``/``.bin`` read with ``weights_only=True``) for
            ``open_clip:ARCH``, such as a fine-tuned ``epoch_10.pt``.
        revision: a branch, tag or commit hash to pin (hub ids only).
        dtype: ``float32`` (default), ``bfloat16``, ``float16`` or ``float64``.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        image_resize: how a non-square image becomes the square input: ``native`` (the checkpoint's own
            processor: CLIP and open_clip crop the centre, SigLIP squashes), ``crop``, ``pad`` (the whole image
            on a square of the model's mean colour) or ``squash``.

    Raises:
        ModelFamilyError: the checkpoint cannot be loaded or its family has no adapter.
        ConfigError: bad dtype or device.
    """
    check_image_resize(image_resize)
    adapter = _load_adapter(name_or_path, revision=revision, dtype=dtype, device=device,
                            local_files_only=local_files_only, checkpoint=checkpoint)
    adapter.image_resize = image_resize
    return adapter


def _load_adapter(name_or_path: str | Path, *, revision: str | None, dtype: str | torch.dtype, device: str,
                  local_files_only: bool, checkpoint: str | Path | None) -> DualEncoderAdapter:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from xclip.models.hf import from_pretrained

    torch_dtype = resolve_dtype(dtype)
    torch_device = resolve_device(device)
    source = str(name_or_path)
    resolved = resolve_model_name(source)
    directory = resolved.directory
    location = str(directory) if source.startswith(SHIPPED_PREFIX) else source  # what the loaders read
    if resolved.library == "open_clip":
        model, *preprocessing = _load_open_clip(location, checkpoint, revision=revision, local_files_only=local_files_only)
        return get_adapter_cls("open_clip")(model.to(torch_device, torch_dtype), *preprocessing, name=source, revision=revision)
    if checkpoint is not None:
        msg = f"checkpoint names a weights file for an open_clip architecture (open_clip:ARCH); {source!r} is not one"
        raise ConfigError(msg, setting="checkpoint")
    options = {"revision": revision, "local_files_only": local_files_only, "trust_remote_code": False}
    try:
        with quiet_transformers():
            model_type, model, preprocessing = from_pretrained(location, torch_dtype, get_adapter_cls, **options)
            adapter_cls = get_adapter_cls(model_type)
    except (OSError, ValueError) as e:
        if directory is None and _is_offline(local_files_only):
            msg = (
                f"cannot load model {source!r}: it is not a local directory, and offline "
                "(model.local_files_only or HF_HUB_OFFLINE=1) a hub id must already be in the Hugging Face cache: "
                f"download it once with network access, or name a local checkpoint ({str(e).splitlines()[0]})"
            )
        else:
            msg = f"cannot load model {source!r}: {e}{_offline_hint(e)}"
        if source in SHIPPED_MODELS:  # "demo": a hub id to transformers, but surely meant the shipped model
            msg += f"\n(the shipped model is called {SHIPPED_PREFIX}{source})"
        raise ModelFamilyError(msg) from e
    except Exception as e:  # safetensors', pickle's and transformers' own errors about the weights files
        problem = _weights_problem(e, directory)
        if problem is None:
            raise
        msg = f"cannot load model {source!r}: {problem}"
        raise ModelFamilyError(msg) from e
    return adapter_cls(model.to(torch_device), preprocessing, name=source, revision=revision)


def _offline_hint(error: BaseException) -> str:
    """A line on how to fail fast offline, where loading failed because the Hugging Face hub could not be
    reached (huggingface_hub's ``LocalEntryNotFoundError``, or a connection error anywhere in the chain of
    causes): without network each try waits through the hub client's retries, about 50 s; else ''."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if type(cause).__name__ in ("LocalEntryNotFoundError", "ConnectError", "ConnectionError", "ConnectTimeout"):
            return ("\n(the Hugging Face hub could not be reached, after retries: without network set HF_HUB_OFFLINE=1 "
                    "or model.local_files_only: true to load from the cache at once, or name a local checkpoint)")
        cause = cause.__cause__ or cause.__context__
    return ""


def _weights_problem(error: Exception, directory: Path | None) -> str | None:
    """What is wrong with a transformers checkpoint's weights, from the error loading them raised, naming the
    file where ``directory`` (a local checkpoint) has it; None for an error that is not about the weights."""
    import pickle

    from safetensors import SafetensorError

    if isinstance(error, SafetensorError):
        file = _first_failing(directory, "*.safetensors", _read_safetensors_header)
        where = str(file) if file else "its .safetensors weights file"
        empty = " (empty, 0 bytes)" if file and file.stat().st_size == 0 else ""
        return f"{where}{empty} is not a readable safetensors file ({error}): it is truncated or damaged; download or save it again"
    if isinstance(error, pickle.UnpicklingError):
        file = _first_failing(directory, "*.bin", _read_pickled_tensors)
        where = str(file) if file else "its .bin weights file"
        return (f"{where} holds pickled objects that are not tensors, and xclip never loads those (unpickling them "
                "can run code); save the weights with save_pretrained, which writes model.safetensors")
    if isinstance(error, RuntimeError) and ("ignore_mismatched_sizes" in str(error) or "size mismatch" in str(error)):
        from xclip.models.hf import shape_mismatches

        with quiet_transformers():
            mismatches = shape_mismatches(directory) if directory is not None else []
        listed = f": {'; '.join(mismatches[:5])}" + (f"; and {len(mismatches) - 5} more" if len(mismatches) > 5 else "") if mismatches else ""
        return (f"tensors in its weights do not have the shapes its config.json asks for{listed}; the weights "
                "belong to another configuration, or config.json was edited")
    return None


def _first_failing(directory: Path | None, pattern: str, read: Callable[[Path], None]) -> Path | None:
    """The first file of ``directory`` matching ``pattern`` that ``read`` fails on (the only one, unread)."""
    if directory is None:
        return None
    files = sorted(path for path in directory.glob(pattern) if path.name != "training_args.bin")
    if len(files) == 1:
        return files[0]
    for file in files:
        try:
            read(file)
        except Exception:  # whatever the reader raises marks the file that the loader failed on
            return file
    return None


def _read_safetensors_header(file: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(file), "pt") as opened:
        opened.keys()


def _read_pickled_tensors(file: Path) -> None:
    torch.load(file, map_location="cpu", weights_only=True)


OPEN_CLIP_INSTALL = "pip install 'xclip[open_clip]' (open_clip_torch, and a torchvision built for your torch)"


def _load_open_clip(source: str, checkpoint: str | Path | None, *, revision: str | None,
                    local_files_only: bool) -> tuple[torch.nn.Module, Any, Any, dict[str, Any]]:
    """An open_clip model with its own tokenizer, transform and preprocessing config, weights read with
    ``weights_only=True``."""
    try:
        import open_clip

        from xclip.models.openclip import create_open_clip
    except ImportError as e:  # torchvision's compiled ops failing to load also surfaces here
        msg = f"cannot load {source!r}: open_clip models need {OPEN_CLIP_INSTALL} ({e})"
        raise ModelFamilyError(msg) from e
    pretrained: str | None = None
    if source.startswith(OPEN_CLIP_PREFIX) and revision is not None:
        msg = ("revision pins hub repositories: name the tag's repository as hf-hub:ORG/NAME "
               "(open_clip.get_pretrained_cfg(ARCH, TAG)['hf_hub']), or give a weights file as the checkpoint")
        raise ConfigError(msg, setting="revision")
    if source.startswith(OPEN_CLIP_PREFIX):
        architecture, _, tag = source.removeprefix(OPEN_CLIP_PREFIX).partition("/")
        if architecture not in open_clip.list_models():
            msg = (f"unknown open_clip architecture {architecture!r}; open_clip knows {len(open_clip.list_models())}, such as "
                   "ViT-B-32, ViT-B-16, ViT-L-14 (open_clip.list_models()). An architecture of your own (registered with "
                   "open_clip.add_model_config in your code, which a command in a new process never runs): put its "
                   f"{OPEN_CLIP_CONFIG} ({{\"model_cfg\": ..., \"preprocess_cfg\": ...}}) beside its weights "
                   "(open_clip_model.safetensors) in a folder and name that folder as the model")
            raise ModelFamilyError(msg)
        if tag and checkpoint is not None:
            msg = f"{source!r} names a pretrained tag and the checkpoint a file: give one of them"
            raise ConfigError(msg, setting="checkpoint")
        if not tag and checkpoint is None:
            msg = f"{source!r} has no weights: add a pretrained tag (open_clip:{architecture}/openai) or give a weights file as the checkpoint"
            raise ConfigError(msg, setting="checkpoint")
        model_name, pretrained = architecture, tag or str(checkpoint_file(checkpoint))
    elif source.startswith("hf-hub:"):  # fetched (or found in the cache) at the pinned revision, then read locally
        with _offline(local_files_only):
            snapshot = _hub_snapshot(source.removeprefix("hf-hub:"), revision, local_files_only)
        model_name = f"local-dir:{snapshot}"
    else:
        model_name = f"local-dir:{Path(source).expanduser()}"
    if checkpoint is not None and pretrained is None:
        msg = f"checkpoint is for open_clip:ARCH names; {source!r} brings its own weights"
        raise ConfigError(msg, setting="checkpoint")
    try:
        with _offline(local_files_only):
            loaded = create_open_clip(model_name, pretrained)
    except Exception as e:  # open_clip raises RuntimeError, ValueError, OSError and pickle errors alike
        import pickle

        from safetensors import SafetensorError

        weights = _open_clip_weights(model_name, pretrained) or f"the weights of {source!r}"
        if isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e):
            msg = (f"cannot load {weights}: it holds pickled objects that are not tensors. xclip reads .pt and .bin "
                   "checkpoints with torch.load(weights_only=True) and never runs code from them; save the state "
                   "dict alone, or as .safetensors")
        elif isinstance(e, SafetensorError):
            msg = f"cannot load model {source!r}: {weights} is not a readable safetensors file ({e}): it is truncated or damaged; download or save it again"
        elif _is_offline(local_files_only) and not Path(str(pretrained or "")).is_file() and not model_name.startswith("local-dir:"):
            msg = f"cannot load model {source!r} offline: its weights must already be in the Hugging Face cache ({str(e).splitlines()[0]})"
        else:
            msg = f"cannot load model {source!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}{_offline_hint(e)}"
        raise ModelFamilyError(msg) from e
    return loaded


def _open_clip_weights(model_name: str, pretrained: str | None) -> str | None:
    """The weights file open_clip reads for ``model_name``: the checkpoint file, or the one it picks in a
    ``local-dir:`` folder (hub snapshots included); None for a pretrained tag's weights in the cache."""
    if pretrained is not None and Path(pretrained).is_file():
        return pretrained
    if model_name.startswith("local-dir:"):
        from open_clip import factory

        find = getattr(factory, "_find_checkpoint_in_dir", None)  # open_clip's own choice among the folder's files
        found = find(Path(model_name.removeprefix("local-dir:"))) if find is not None else None
        return str(found) if found else None
    return None


def _hub_snapshot(repository: str, revision: str | None, local_files_only: bool) -> Path:
    """The folder of an open_clip-format hub repository at ``revision``: its config and its weights
    (safetensors where the repository has them)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    def fetch(name: str) -> Path:
        return Path(hf_hub_download(repository, name, revision=revision, local_files_only=local_files_only))

    try:
        config = fetch(OPEN_CLIP_CONFIG)
        try:
            fetch("open_clip_model.safetensors")
        except EntryNotFoundError:
            fetch("open_clip_pytorch_model.bin")
    except (OSError, ValueError) as e:  # huggingface_hub's errors derive from these
        where = "in the Hugging Face cache (offline)" if _is_offline(local_files_only) else "on the hub"
        at = f" at revision {revision!r}" if revision else ""
        msg = f"cannot load model 'hf-hub:{repository}'{at}: not found {where} ({str(e).splitlines()[0]}){_offline_hint(e)}"
        raise ModelFamilyError(msg) from e
    return config.parent


def checkpoint_file(checkpoint: str | Path | None) -> Path:
    """The weights file a checkpoint setting names; :class:`ConfigError` when it is missing or of no known kind."""
    path = Path(str(checkpoint)).expanduser()
    if not path.is_file():
        msg = f"checkpoint: no file at {path.resolve()}"
        raise ConfigError(msg, setting="checkpoint")
    if path.suffix not in (".safetensors", ".pt", ".pth", ".bin"):
        msg = f"checkpoint: {path.name} is not a .safetensors, .pt, .pth or .bin weights file"
        raise ConfigError(msg, setting="checkpoint")
    return path


@contextmanager
def _offline(local_files_only: bool) -> Iterator[None]:
    """open_clip downloads through huggingface_hub, which checks its HF_HUB_OFFLINE constant at each download
    (read from the environment when it was imported): set it for the load."""
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = previous or local_files_only
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous
