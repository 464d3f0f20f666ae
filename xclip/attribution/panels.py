"""Panel layouts: where the adaptive rule's first panels end along each tower's path, per model.

The integrand of a trained model is rough in one narrow stretch of the path, at a place that is a property of the
model and tower rather than of the input. ``xclip calibrate`` measures it once (see :mod:`xclip.run.calibration`) and
stores the layout in a layout file, keyed by the weights' fingerprint and the settings that shape the path (cut
layers and references). ``InteractionAttribution(panel_layout="auto")`` then finds it: first in a
``xclip-layouts.json`` beside a local checkpoint, then in the user's layout cache.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from xclip.models.base import DualEncoderAdapter
from xclip.core.quadrature import DEFAULT_BREAKPOINTS, check_breakpoints
from xclip.errors import ConfigError
from xclip.disk.files import install_file
from xclip.models.names import model_directory
from xclip.disk.locking import update_lock

LAYOUT_FILE = "xclip-layouts.json"
LAYOUT_CACHE_VARIABLE = "XCLIP_LAYOUT_CACHE"
FORMAT_VERSION = 1
_SAMPLES_PER_TENSOR = 1024


@dataclass(frozen=True)
class PanelLayout:
    """Interior breakpoints of the first panels on [0, 1], per tower, and where they come from.

    Attributes:
        text, image: increasing breakpoints strictly inside (0, 1).
        source: ``default`` (uncalibrated), or the layout file the layout was read from.
    """

    text: tuple[float, ...] = DEFAULT_BREAKPOINTS
    image: tuple[float, ...] = DEFAULT_BREAKPOINTS
    source: str = "default"

    def __post_init__(self) -> None:
        object.__setattr__(self, "text", check_breakpoints(self.text, "panel_layout.text"))
        object.__setattr__(self, "image", check_breakpoints(self.image, "panel_layout.image"))

    @property
    def is_calibrated(self) -> bool:
        return self.source != "default"


@dataclass(frozen=True)
class Calibration:
    """One calibrated layout as a layout file stores it.

    Attributes:
        settings: the attribution settings the path depends on (see :func:`path_settings`).
        text, image: the breakpoints chosen.
        measured: what calibration measured (nodes per input with the default and the chosen layout, inputs used).
    """

    settings: dict[str, Any]
    text: tuple[float, ...]
    image: tuple[float, ...]
    measured: dict[str, Any] = field(default_factory=dict)


def path_settings(*, text_layer: int, image_layer: int, image_reference: str, text_filler: int | None,
                  blur_radius: float, reference_seed: int) -> dict[str, Any]:
    """The settings a layout is only valid under: they move the path, and so where it is rough. (The tolerance is
    not among them: a layout calibrated at one tolerance places panels well for others too.)"""
    return {
        "text_layer": text_layer,
        "image_layer": image_layer,
        "image_reference": image_reference,
        "text_filler": text_filler,
        "blur_radius": blur_radius if image_reference == "blur" else None,
        "reference_seed": reference_seed if image_reference == "noise" else None,
    }


def weights_fingerprint(model: DualEncoderAdapter) -> str:
    """A short digest of the model's parameters that does not depend on the dtype it was loaded in.

    Hashes every parameter's name, shape and an evenly strided sample of its values rounded to bfloat16 (a float32
    checkpoint loaded in float32, float64 or bfloat16 gives the same fingerprint); reads no files, so hub models,
    local directories and open_clip weights are all identified the same way.
    """
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, parameter in sorted(model.model.named_parameters()):
            flat = parameter.detach().reshape(-1)
            stride = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
            sample = flat[::stride][:_SAMPLES_PER_TENSOR].to(torch.bfloat16).view(torch.int16).cpu()
            digest.update(f"{name}:{tuple(parameter.shape)}:".encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def layout_cache() -> Path:
    """Where ``xclip calibrate`` stores layouts by default: ``$XCLIP_LAYOUT_CACHE``, else
    ``$XDG_CACHE_HOME/xclip/layouts`` (``~/.cache/xclip/layouts``)."""
    if os.environ.get(LAYOUT_CACHE_VARIABLE):
        return Path(os.environ[LAYOUT_CACHE_VARIABLE]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return cache / "xclip" / "layouts"


def cache_file(fingerprint: str) -> Path:
    return layout_cache() / f"{fingerprint}.json"


def beside_checkpoint(name: str) -> Path | None:
    """The layout file beside the checkpoint a model name names, a local directory or a shipped model (None for
    hub and open_clip names)."""
    directory = model_directory(name) if name else None
    return directory / LAYOUT_FILE if directory is not None else None


def read_layout_file(path: Path) -> dict[str, Any]:
    """A layout file's contents.

    Raises:
        ConfigError: the file is missing, not JSON, or not a layout file.
    """
    try:
        contents = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        msg = f"layout file {path} does not exist (make one with xclip calibrate MODEL --output {path})"
        raise ConfigError(msg, setting="panel_layout") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        msg = f"cannot read layout file {path}: {e}"
        raise ConfigError(msg, setting="panel_layout") from None
    if not isinstance(contents, dict) or not isinstance(contents.get("calibrations"), list) or "fingerprint" not in contents:
        msg = f"{path} is not an xclip layout file (no fingerprint and calibrations)"
        raise ConfigError(msg, setting="panel_layout")
    return contents


def layout_from_file(path: Path, fingerprint: str, settings: dict[str, Any], *, strict: bool) -> PanelLayout | None:
    """The layout a file holds for these weights and settings.

    Args:
        strict: raise when the file holds none (a file the user named) rather than return None (a file found).

    Raises:
        ConfigError: ``strict`` and the file is for other weights or holds no layout for these settings.
    """
    contents = read_layout_file(path)
    if contents["fingerprint"] != fingerprint:
        if not strict:
            return None
        msg = (f"layout file {path} was calibrated for other weights (fingerprint {contents['fingerprint']}, "
               f"this model's is {fingerprint}): calibrate this model with xclip calibrate")
        raise ConfigError(msg, setting="panel_layout")
    for entry in contents["calibrations"]:
        if isinstance(entry, dict) and entry.get("settings") == settings:
            try:
                return PanelLayout(text=tuple(entry["text"]), image=tuple(entry["image"]), source=str(path))
            except KeyError as e:
                problem = f"no {e.args[0]!r}"
            except (TypeError, ValueError, ConfigError) as e:
                problem = str(e)
            msg = f"layout file {path} is damaged: its layout for {_describe(settings)} has {problem}"
            raise ConfigError(msg, setting="panel_layout")
    if not strict:
        return None
    known = "; ".join(_describe(entry["settings"]) for entry in contents["calibrations"]
                      if isinstance(entry, dict) and isinstance(entry.get("settings"), dict))
    msg = f"layout file {path} holds no layout for {_describe(settings)} (it holds: {known or 'none'})"
    raise ConfigError(msg, setting="panel_layout")


def find_layout(model: DualEncoderAdapter, settings: dict[str, Any], fingerprint: str | None = None) -> PanelLayout:
    """The calibrated layout of this model under these settings, beside its checkpoint or in the layout cache;
    the default layout when there is none."""
    beside = beside_checkpoint(model.name)
    has_beside = beside is not None and beside.is_file()
    if not has_beside and not any(layout_cache().glob("*.json")):
        return PanelLayout()  # nothing to look in: skip fingerprinting the weights
    fingerprint = fingerprint or weights_fingerprint(model)
    for path in (beside if has_beside else None, cache_file(fingerprint)):
        if path is not None and path.is_file():
            try:
                found = layout_from_file(path, fingerprint, settings, strict=False)
            except ConfigError as e:  # a file found, not named: its damage must not stop every attribution
                warnings.warn(f"{e}; it is skipped and the default layout used (xclip calibrate writes it anew)", stacklevel=2)
                continue
            if found is not None:
                return found
    return PanelLayout()


def save_calibration(path: Path, model: DualEncoderAdapter, calibration: Calibration, fingerprint: str | None = None) -> None:
    """Add a calibration to a layout file (replacing one for the same settings); written atomically, under a lock
    (:func:`xclip.disk.locking.update_lock`), so that calibrations ending together keep each other's layouts."""
    fingerprint = fingerprint or weights_fingerprint(model)
    entry = asdict(calibration)
    entry["text"], entry["image"] = list(calibration.text), list(calibration.image)
    path.parent.mkdir(parents=True, exist_ok=True)
    with update_lock(path) as is_locked:
        contents: dict[str, Any] = {"format": FORMAT_VERSION, "model": model.name, "fingerprint": fingerprint, "calibrations": []}
        if path.is_file():
            contents = read_layout_file(path)
            if contents["fingerprint"] != fingerprint:
                msg = f"layout file {path} belongs to other weights (fingerprint {contents['fingerprint']}); choose another --output"
                raise ConfigError(msg, setting="output")
        contents["calibrations"] = [e for e in contents["calibrations"]
                                    if isinstance(e, dict) and e.get("settings") != calibration.settings] + [entry]
        if is_locked:  # no other save is under way, so a temporary file still here is a killed save's
            for stale in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
                stale.unlink(missing_ok=True)
        temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            temporary.write_text(json.dumps(contents, indent=2) + "\n", encoding="utf-8")
            install_file(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)  # a failed write leaves nothing (after the rename there is nothing)


def _describe(settings: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in settings.items() if value is not None)
