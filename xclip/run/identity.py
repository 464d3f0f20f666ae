"""A run's identity: the data and weights it was made from, checked before a run directory is resumed, and the
provenance stored with it."""

from __future__ import annotations

import datetime as dt
import json
import os
from importlib.metadata import version
from dataclasses import dataclass
from pathlib import Path

import torch

from xclip.attribution.engine import InteractionAttribution
from xclip.config import ModelConfig, RunConfig, settings_differences
from xclip.run.data import Dataset
from xclip.disk.digests import sha256_of
from xclip.errors import ConfigError
from xclip.models.loading import checkpoint_file
from xclip.models.names import model_directory
from xclip.store.merge import SHARD_DATA_SHA256
from xclip.store.reader import RunReader


@dataclass(frozen=True)
class RunIdentity:
    """What a run's results depend on beyond its settings."""

    data_digest: str  # see xclip.run.data.Dataset.digest; of webdataset and parquet inputs ShardFiles.all_sha256
    weights_digest: str | None  # see weights_digest
    # webdataset and parquet inputs: the samples of the shard's own files (xclip.run.data.ShardFiles.own_sha256)
    shard_data_digest: str | None = None


def identify_run(config: RunConfig, dataset: Dataset) -> RunIdentity:
    """Digest the data files and the local checkpoint's weights (reads every weight file: call it once per run).

    Of webdataset and parquet inputs, whose shards read whole files, the data digest is that of every file's name
    and size (equal in every shard, as merging checks), and the shard's own files are identified by their samples."""
    files = dataset.shard_files
    if files is not None:
        return RunIdentity(files.all_sha256, weights_digest(config.model), files.own_sha256)
    return RunIdentity(data_digest=dataset.digest(config.data.root), weights_digest=weights_digest(config.model))


def weights_digest(model: ModelConfig) -> str | None:
    """SHA-256 of a local or shipped checkpoint's weight files (it has no revision to pin).

    Returns:
        The digest of a checkpoint file, or of a local directory's weights; None for hub names.
    """
    if model.checkpoint is not None:
        files = [checkpoint_file(model.checkpoint)]
    elif (weights := model_directory(model.name)) is not None:
        files = sorted(weights.glob("*.safetensors")) + sorted(weights.glob("*.bin"))
    else:
        return None
    return sha256_of(files)


def check_resumable(stored_run: Path, config: RunConfig, identity: RunIdentity) -> None:
    """Refuse to resume a stored run that another config, other weights or other data files made.

    Raises:
        ConfigError: what differs, and how to resume or replace the run.
    """
    directory = config.run_directory
    with RunReader(stored_run) as stored:
        if stored.attrs["fingerprint"] != config.result_fingerprint():
            differences = "\n  ".join(settings_differences(stored.attrs["fingerprint"], config.result_fingerprint()))
            msg = f"{directory} holds a run made with other settings (stored -> now):\n  {differences}\nrerun with the stored settings to resume it, or pass overwrite=True to replace it"
            raise ConfigError(msg, setting="overwrite")
        if stored.attrs.get("model_weights_sha256", "") != (identity.weights_digest or ""):
            msg = f"{directory} was made with other weights at {config.model.name}; pass overwrite=True to replace it"
            raise ConfigError(msg, setting="overwrite")
        if stored.attrs["data_sha256"] != identity.data_digest or stored.attrs.get(SHARD_DATA_SHA256) != identity.shard_data_digest:
            msg = (
                f"the data files changed since {directory} was made (their captions, image paths or pairs differ): "
                "restore them to resume the run, or pass overwrite=True to attribute the data as they are now"
            )
            raise ConfigError(msg, setting="overwrite")


def provenance(config: RunConfig, attributor: InteractionAttribution, command: str, identity: RunIdentity) -> dict[str, object]:
    """The run file's attributes that say how it was made: versions, model, settings, command and digests."""
    import transformers

    model = attributor.model
    layout = attributor.panel_layout
    attributes: dict[str, object] = {
        "xclip_version": version("xclip"),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "model_name": config.model.name,
        "model_revision": config.model.revision or "",
        "model_family": model.family,
        "device": str(model.device),
        "dtype": config.model.dtype,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "config": config.model_dump_json(),
        "fingerprint": config.result_fingerprint(),
        "logit_scale": model.logit_scale,
        # the first panels the adaptive rule used (config panel_layout: auto may find a calibrated one)
        "panel_layout": json.dumps({"text": layout.text, "image": layout.image, "source": layout.source}),
    }
    if identity.weights_digest is not None:
        attributes["model_weights_sha256"] = identity.weights_digest
    attributes.update(model.library_versions())  # open_clip's tokenizer and transforms: their version matters
    attributes["data_sha256"] = identity.data_digest
    if identity.shard_data_digest is not None:
        attributes[SHARD_DATA_SHA256] = identity.shard_data_digest
    # lets readers find the images after the project moved as a whole
    attributes["data_root_from_run"] = os.path.relpath(config.data.root, config.run_directory)
    return attributes
