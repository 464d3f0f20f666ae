"""The model and the attributor a run config names: the one way from a config's settings to the engine, for the
runner, calibration and the baselines alike."""

from __future__ import annotations

import time

from xclip.attribution.engine import InteractionAttribution
from xclip.config import RunConfig
from xclip.models.loading import load_model


def load_attributor(config: RunConfig) -> tuple[InteractionAttribution, float]:
    """The configured model with the run's attribution settings, and the seconds loading the checkpoint took."""
    start = time.perf_counter()
    model = load_model(
        config.model.name,
        revision=config.model.revision,
        dtype=config.model.dtype,
        device=config.model.device,
        local_files_only=config.model.local_files_only,
        checkpoint=config.model.checkpoint,
        image_resize=config.image.resize,
    )
    seconds = time.perf_counter() - start
    attributor = InteractionAttribution(
        model,
        settings=config.attribution.settings,
        internal_batch_size=config.runtime.internal_batch_size,
        panel_layout=config.attribution.panel_layout,
    )
    return attributor, seconds
