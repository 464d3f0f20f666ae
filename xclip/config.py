"""Run configs: a typed schema, YAML loading with file/line in errors, and dotted ``key=value`` overrides."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from xclip.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Section):
    name: str = Field(description="hub id or local directory")
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16", "float64"] = "float32"
    device: str = "auto"
    local_files_only: bool = False


class AttributionConfig(_Section):
    text_layer: int = -1
    image_layer: int = -1
    tolerance: float | None = Field(1e-3, gt=0, lt=1, description="relative completeness error each input must reach")
    max_steps: int = Field(256, ge=16, description="most integrand evaluations the adaptive rule spends on an input")
    steps: int | None = Field(None, ge=1, description="a fixed rule of this many nodes instead of adapting")
    rule: Literal["gauss-legendre", "riemann-right", "midpoint"] = "gauss-legendre"
    convention: Literal["exact", "reference"] = "exact"
    text_filler: int | None = None
    image_reference: Literal["zeros", "black", "blur", "noise"] = "zeros"
    reference_seed: int = 0
    blur_radius: float = Field(16.0, gt=0)
    scale_by_logit: bool = False
    mode: Literal["auto", "forward", "reverse"] = "auto"

    @model_validator(mode="after")
    def _check_quadrature(self) -> AttributionConfig:
        if self.steps is None:
            if self.tolerance is None:
                msg = "attribution.tolerance is null and attribution.steps is not set: give a tolerance to adapt to, or steps for a fixed rule"
                raise ValueError(msg)
            if self.convention == "reference":
                msg = "attribution.convention 'reference' reproduces the reference code's fixed rule: set attribution.steps"
                raise ValueError(msg)
            if self.rule != "gauss-legendre":
                msg = f"attribution.rule {self.rule!r} is for fixed-step comparisons: set attribution.steps (the adaptive rule is composite Gauss-Legendre)"
                raise ValueError(msg)
        return self


class DataConfig(_Section):
    format: Literal["imagefolder", "csv", "sidecar", "coco", "queries"]
    root: Path = Field(description="folder the image paths are relative to")
    metadata: Path | None = Field(None, description="metadata.jsonl, a CSV/TSV, or a COCO captions JSON")
    csv_separator: str = ","
    csv_image_key: str = "filepath"
    csv_caption_key: str = "title"
    queries: list[str] = Field(default_factory=list, description="captions crossed with every image")
    limit: int | None = Field(None, ge=1, description="use only the first N pairs")


class PairingConfig(_Section):
    mode: Literal["given", "all", "topk"] = "given"
    k: int = Field(5, ge=1)


class OutputConfig(_Section):
    directory: Path
    render: bool = Field(False, description="draw the default heatmaps of every pair when the run ends")


class RuntimeConfig(_Section):
    batch_size: int = Field(16, ge=1)
    internal_batch_size: int = Field(64, ge=1)
    num_workers: int = Field(0, ge=0)
    seed: int = 0
    shard_index: int = Field(0, ge=0, description="this process's block of the pairs")
    num_shards: int = Field(1, ge=1, description="blocks the pairs are split into (Slurm array tasks, ranks)")

    @model_validator(mode="after")
    def _check_shard(self) -> RuntimeConfig:
        if self.shard_index >= self.num_shards:
            msg = f"runtime.shard_index {self.shard_index} must be below runtime.num_shards {self.num_shards}"
            raise ValueError(msg)
        return self


class RunConfig(_Section):
    model: ModelConfig
    attribution: AttributionConfig = AttributionConfig()
    data: DataConfig
    pairing: PairingConfig = PairingConfig()
    output: OutputConfig
    runtime: RuntimeConfig = RuntimeConfig()

    @model_validator(mode="after")
    def _check_combinations(self) -> RunConfig:
        if self.data.format == "queries" and not self.data.queries:
            msg = "data.format 'queries' needs a non-empty data.queries list"
            raise ValueError(msg)
        if self.data.format in ("imagefolder", "csv", "coco") and self.data.metadata is None:
            msg = f"data.format {self.data.format!r} needs data.metadata (the file listing images and captions)"
            raise ValueError(msg)
        return self

    @property
    def run_directory(self) -> Path:
        """Where this process writes: ``output.directory``, or its ``shard-IIIII-of-NNNNN`` subfolder."""
        if self.runtime.num_shards == 1:
            return self.output.directory
        return self.output.directory / f"shard-{self.runtime.shard_index:05d}-of-{self.runtime.num_shards:05d}"

    def result_fingerprint(self) -> str:
        """The settings that change results; a run directory refuses a config whose fingerprint differs."""
        keep = self.model_dump(mode="json", exclude={"output": {"render"}, "runtime": {"batch_size", "num_workers"}})
        keep["model"].pop("device")
        keep["attribution"].pop("mode")
        keep["runtime"].pop("internal_batch_size")
        return json.dumps(keep, sort_keys=True)


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the key at ``loc`` in a composed YAML document (the deepest key that exists)."""
    line = None
    for key in loc:
        if not isinstance(node, yaml.MappingNode):
            break
        for key_node, value_node in node.value:
            if key_node.value == str(key):
                line, node = key_node.start_mark.line + 1, value_node
                break
        else:
            break
    return line


def _set_dotted(data: dict[str, Any], dotted: str, raw_value: str) -> None:
    keys = dotted.split(".")
    target = data
    for key in keys[:-1]:
        target = target.setdefault(key, {})
        if not isinstance(target, dict):
            msg = f"override {dotted}: {key} is not a section"
            raise ConfigError(msg)
    target[keys[-1]] = yaml.safe_load(raw_value) if raw_value != "" else None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML run config, apply ``section.key=value`` overrides, validate.

    Relative ``data.root``, ``data.metadata`` and ``output.directory`` resolve against the config file's folder.

    Raises:
        ConfigError: unreadable YAML, an unknown key, a wrong type or a missing field; the message names the
            key, and the file and line where the key appears in it.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        msg = f"cannot read config {path}: {e.strerror or e}"
        raise ConfigError(msg) from e
    try:
        data = yaml.safe_load(text) or {}
        document = yaml.compose(text)
    except yaml.YAMLError as e:
        msg = f"{path}: invalid YAML: {e}"
        raise ConfigError(msg) from e
    if not isinstance(data, dict):
        msg = f"{path}: a run config is a mapping of sections (model, data, output, ...)"
        raise ConfigError(msg)
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key:
            msg = f"override {override!r} must look like section.key=value"
            raise ConfigError(msg)
        _set_dotted(data, key.strip(), value.strip())
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as e:
        problems = []
        for error in e.errors(include_url=False):
            loc = tuple(error["loc"])
            where = ".".join(str(part) for part in loc) or "config"
            line = _line_of(document, loc)
            position = f"{path}:{line}" if line else str(path)
            given = f" (got {error['input']!r})" if "input" in error and not isinstance(error["input"], dict) else ""
            problems.append(f"{position}: {where}: {error['msg']}{given}")
        raise ConfigError("invalid run config:\n  " + "\n  ".join(problems)) from None
    base = path.resolve().parent
    data_config = config.data.model_copy(
        update={
            "root": (base / config.data.root).resolve(),
            "metadata": None if config.data.metadata is None else (base / config.data.metadata).resolve(),
        }
    )
    output = config.output.model_copy(update={"directory": (base / config.output.directory).resolve()})
    model = config.model
    if (base / model.name).is_dir():  # a local checkpoint named relative to the config file
        model = model.model_copy(update={"name": str((base / model.name).resolve())})
    return config.model_copy(update={"data": data_config, "output": output, "model": model})
