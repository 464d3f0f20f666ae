"""What a model name means, without torch: a model shipped with xclip (``xclip:NAME``), an open_clip name, a
path that can only be a local directory, or a hub id; and the dtypes a model loads in. :func:`resolve_model_name`
is the one reading of a name: the run config checks its model name with it before anything heavy loads, and the
loader (xclip.models.loading) loads what it says."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from xclip.errors import ConfigError, ModelFamilyError

Dtype = Literal["float32", "bfloat16", "float16", "float64"]
Library = Literal["transformers", "open_clip"]  # what loads a checkpoint
OPEN_CLIP_PREFIX = "open_clip:"
OPEN_CLIP_CONFIG = "open_clip_config.json"


def looks_like_path(name: str) -> bool:
    """A model name that can only be a directory, never a hub id (``name`` or ``namespace/name``)."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or name.endswith("/")


SHIPPED_PREFIX = "xclip:"
# Models that ship inside the package, named ``xclip:NAME`` in configs, ``explain --model`` and load_model:
# ``demo`` (models/shapes-clip), the small CLIP of xclip.analysis.synthetic's world of coloured shapes, and
# ``demo-no-star`` (models/shapes-clip-no-star), the demo fine-tuned on that world without stars (no star drawn or
# named; its first-block attention and position embeddings are the demo's, bitwise): a second checkpoint with a
# known difference for ``xclip compare`` (its star phrases ground worse). Each folder's training.json records how.
SHIPPED_MODELS: dict[str, Path] = {
    "demo": Path(__file__).resolve().parent / "shapes-clip",
    "demo-no-star": Path(__file__).resolve().parent / "shapes-clip-no-star",
}


def shipped_model(name: str) -> Path | None:
    """The directory of a shipped model named ``xclip:NAME``; None for any other name; :class:`ConfigError`
    for an ``xclip:`` name that ships with no model."""
    if not name.startswith(SHIPPED_PREFIX):
        return None
    directory = SHIPPED_MODELS.get(name.removeprefix(SHIPPED_PREFIX))
    if directory is None:
        known = ", ".join(SHIPPED_PREFIX + shipped for shipped in SHIPPED_MODELS)
        msg = f"no shipped model is called {name!r}; xclip ships {known}"
        raise ConfigError(msg, setting="name_or_path")
    return directory


def is_open_clip_name(name: str) -> bool:
    """``open_clip:ARCH[/TAG]`` or ``hf-hub:ORG/NAME``: names that open_clip resolves."""
    return name.startswith((OPEN_CLIP_PREFIX, "hf-hub:"))


def model_directory(name: str, base: Path | None = None) -> Path | None:
    """The checkpoint folder a name points at: a shipped model's, or an existing local folder (a relative name
    taken against ``base``, default the working directory), as an absolute path; None for any other name."""
    shipped = shipped_model(name)
    if shipped is not None:
        return shipped
    local = ((base or Path.cwd()) / Path(name).expanduser()).resolve()
    return local if local.is_dir() else None


@dataclass(frozen=True)
class ModelSource:
    """What a model name names.

    Attributes:
        name: the name a run records: a local folder's absolute path, any other name as given.
        directory: the checkpoint folder the loader reads (a shipped or a local one); None for hub ids and
            open_clip names.
        library: what loads it: open_clip (an open_clip name, or a folder holding open_clip_config.json), else
            transformers.
    """

    name: str
    directory: Path | None
    library: Library


def resolve_model_name(name: str, base: Path | None = None) -> ModelSource:
    """What ``name`` names, a relative local folder taken against ``base`` (default: the working directory).

    Raises:
        ConfigError: an ``xclip:`` name that ships no model.
        ModelFamilyError: a folder that holds neither checkpoint kind, or a name that can only be a folder where
            there is none.
    """
    if is_open_clip_name(name):
        return ModelSource(name, None, "open_clip")
    directory = model_directory(name, base)
    if directory is None:
        if looks_like_path(name):
            msg = f"no model directory at {((base or Path.cwd()) / Path(name).expanduser()).resolve()}"
            raise ModelFamilyError(msg)
        return ModelSource(name, None, "transformers")  # a hub id
    recorded = name if name.startswith(SHIPPED_PREFIX) else str(directory)
    if (directory / OPEN_CLIP_CONFIG).is_file():
        return ModelSource(recorded, directory, "open_clip")
    if not (directory / "config.json").is_file():
        msg = f"{directory} holds no config.json, so it is not a transformers checkpoint: save one with save_pretrained"
        raise ModelFamilyError(msg)
    return ModelSource(recorded, directory, "transformers")
