"""What a model name means, without torch: a model shipped with xclip (``xclip:NAME``), an open_clip name, a
path that can only be a local directory, or a hub id; and the dtypes a model loads in. The run config resolves its
model name with these before anything heavy loads; the loader (xclip.models.loading) uses the same ones."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from xclip.errors import ConfigError

Dtype = Literal["float32", "bfloat16", "float16", "float64"]
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
