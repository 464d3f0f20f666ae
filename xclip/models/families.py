"""Model-family adapters, keyed by the HF ``config.model_type`` (``open_clip`` for open_clip's own models)."""

from __future__ import annotations

from xclip.models.base import DualEncoderAdapter, ImageBatch, TextBatch
from xclip.models.clip import ClipAdapter
from xclip.models.openclip import OpenClipAdapter
from xclip.models.siglip import SiglipAdapter
from xclip.errors import ModelFamilyError

ADAPTERS: dict[str, type[DualEncoderAdapter]] = {"clip": ClipAdapter, "siglip": SiglipAdapter, "open_clip": OpenClipAdapter}


def list_families() -> list[str]:
    """Model types that xclip can attribute."""
    return sorted(ADAPTERS)


def get_adapter_cls(model_type: str) -> type[DualEncoderAdapter]:
    """The adapter class for an HF ``model_type``; raises :class:`ModelFamilyError` for unknown ones."""
    try:
        return ADAPTERS[model_type]
    except KeyError:
        msg = f"no adapter for model_type {model_type!r}; supported families: {', '.join(list_families())}"
        raise ModelFamilyError(msg) from None


__all__ = ["ADAPTERS", "DualEncoderAdapter", "ImageBatch", "TextBatch", "get_adapter_cls", "list_families"]
