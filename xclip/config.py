"""Run configs: a typed schema, YAML loading with file/line in errors, and dotted ``key=value`` overrides."""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from xclip.core.rules import (
    DEFAULT_INTERNAL_BATCH_SIZE,
    DEFAULT_SETTINGS,
    MAX_SEED,
    AttributionSettings,
    Convention,
    ImageReference,
    Mode,
    Rule,
)
from xclip.disk.digests import Verify
from xclip.errors import ConfigError, ModelFamilyError
from xclip.core.geometry import ImageResize
from xclip.models.names import Dtype, resolve_model_name

MAX_CONFIG_BYTES = 1 << 20  # a run config is a few dozen lines; anything near this size is not one
# a run config is sections of keys (2 levels) with short lists of text; PyYAML's scanner slows quadratically with
# flow nesting and its composer recurses once per level, so a few KB of ``[[[...]]]`` would take seconds and end
# in a RecursionError: nesting is refused past this depth while the YAML is read as a stream of events
MAX_NESTING_DEPTH = 32
_SHOWN_INPUT_CHARS = 120  # an offending value is quoted in the message up to this length
# the type of a validation error raised by a section's own check (AttributionSettings'), which names the key at fault
_SETTING_ERROR = "setting"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Section):
    name: str = Field(description="hub id, local directory, xclip:demo or xclip:demo-no-star (shipped), open_clip:ARCH[/TAG] or hf-hub:ORG/NAME")
    checkpoint: str | None = Field(None, description="weights file for open_clip:ARCH (relative to the config file)")
    revision: str | None = None
    dtype: Dtype = "float32"
    device: str = "auto"
    local_files_only: bool = Field(False, strict=True)


class AttributionConfig(_Section):
    """The settings of :class:`xclip.InteractionAttribution`, under the same names: :attr:`settings` is the
    object the engine takes, and ``panel_layout`` says where its first panels come from. Defaults are the
    :class:`~xclip.core.rules.AttributionSettings` ones; the fields give the types YAML is read into, and the
    settings object checks the values (one check for the API and the config)."""

    text_layer: int = Field(DEFAULT_SETTINGS.text_layer, strict=True)
    image_layer: int = Field(DEFAULT_SETTINGS.image_layer, strict=True)
    tolerance: float | None = Field(DEFAULT_SETTINGS.tolerance, description="relative completeness error each input must reach")
    max_steps: int = Field(DEFAULT_SETTINGS.max_steps, strict=True, description="most integrand evaluations the adaptive rule spends on an input")
    n_steps: int | None = Field(DEFAULT_SETTINGS.n_steps, strict=True, description="a fixed rule of this many nodes instead of adapting")
    rule: Rule = DEFAULT_SETTINGS.rule
    convention: Convention = DEFAULT_SETTINGS.convention
    text_filler: int | None = Field(DEFAULT_SETTINGS.text_filler, strict=True)
    image_reference: ImageReference = DEFAULT_SETTINGS.image_reference
    reference_seed: int = Field(DEFAULT_SETTINGS.reference_seed, strict=True)
    blur_radius: float = DEFAULT_SETTINGS.blur_radius
    scale_by_logit: bool = Field(DEFAULT_SETTINGS.scale_by_logit, strict=True)
    mode: Mode = DEFAULT_SETTINGS.mode
    panel_layout: str = Field("auto", description="auto (the model's calibrated layout, else the default), default, or a layout file from xclip calibrate (relative to the config file)")

    @property
    def settings(self) -> AttributionSettings:
        """The engine's settings: every field but ``panel_layout``, checked."""
        return AttributionSettings(**self.model_dump(exclude={"panel_layout"}))

    @model_validator(mode="after")
    def _check_settings(self) -> AttributionConfig:
        try:
            self.settings  # noqa: B018  (made to be checked)
        except ConfigError as e:
            raise PydanticCustomError(_SETTING_ERROR, "{message}", {"setting": e.setting, "message": str(e)}) from None
        return self


class ImageConfig(_Section):
    resize: ImageResize = Field("native", description="native (the checkpoint's processor), crop, pad or squash")
    crop_warning: float = Field(0.2, ge=0, le=1, description="name images whose preprocessing cut away more than this share")


# formats whose files a run splits between its shards whole (see xclip.run.shards)
SHARDED_FORMATS = ("webdataset", "parquet")


class DataConfig(_Section):
    format: Literal["imagefolder", "csv", "sidecar", "coco", "queries", "webdataset", "parquet"]
    root: Path = Field(description="folder the image paths are relative to (webdataset, parquet: by default the folder "
                       "the patterns of data.shards or data.files name)")
    shards: list[str] = Field(default_factory=list, description="webdataset: tar files, as paths or patterns "
                              "(part-{00000..00999}.tar, *.tar), relative to the config file")
    files: list[str] = Field(default_factory=list, description="parquet: img2dataset parquet files with image bytes, "
                             "as paths or patterns like data.shards")
    metadata: Path | None = Field(None, description="metadata.jsonl, a CSV/TSV, or a COCO captions JSON")
    csv_separator: str = ","
    csv_image_key: str = "filepath"
    csv_caption_key: str = "title"
    queries: list[str] = Field(default_factory=list, description="captions crossed with every image")
    limit: int | None = Field(None, ge=1, strict=True, description="use only the first N pairs (after pairing) and the inputs they need")
    verify: Verify = Field(
        "changed", description="how a resume, render and the viewer tell that an image file changed: changed (hash a file "
        "only when its size or modification time differ from the run's record) or always (hash every file)"
    )

    @model_validator(mode="before")
    @classmethod
    def _shard_defaults(cls, data: Any) -> Any:
        """One pattern may be given as a string; webdataset and parquet inputs need no ``root``: it is the folder
        their patterns name (the deepest one holding every pattern's fixed start)."""
        if not isinstance(data, dict):
            return data
        data = {**data, **{key: [data[key]] for key in ("shards", "files") if isinstance(data.get(key), str)}}
        if data.get("format") in SHARDED_FORMATS and data.get("root") is None:
            patterns = data.get("shards" if data["format"] == "webdataset" else "files")
            is_text = isinstance(patterns, list) and patterns and all(isinstance(p, str) for p in patterns)
            data["root"] = pattern_folder(patterns) if is_text else Path()  # no patterns: refused below, by name
        return data


def pattern_folder(patterns: list[str]) -> Path:
    """The deepest folder every pattern lies in, read from the patterns' text up to their first ``{*?[``."""
    folders = []
    for pattern in patterns:
        fixed = pattern[: min([pattern.index(c) for c in "{*?[" if c in pattern], default=len(pattern))]
        folders.append(Path(fixed).expanduser() if fixed.endswith(("/", os.sep)) else Path(fixed).expanduser().parent)
    try:
        return Path(os.path.commonpath(folders))
    except ValueError:  # absolute and relative patterns mixed
        msg = "the patterns lie in no common folder; set data.root, the folder the shard files are stored relative to"
        raise ValueError(msg) from None


class PairingConfig(_Section):
    mode: Literal["given", "all", "topk"] = "given"
    k: int = Field(5, ge=1, strict=True)


class OutputConfig(_Section):
    directory: Path
    render: bool = Field(False, strict=True, description="draw the default heatmaps of every pair when the run ends")
    precision: Literal["auto", "float64", "float32", "float16"] = Field(
        "auto", description="storage of contributions and pair maps: float16 halves them (embeddings and numbers stay float32); "
        "float64 stores everything in float64; auto: float64 for a float64 model, else float32"
    )

    def storage_precision(self, model_dtype: str) -> str:
        """The precision the run file stores, ``auto`` resolved for the model's dtype."""
        if self.precision != "auto":
            return self.precision
        return "float64" if model_dtype == "float64" else "float32"
    pair_maps: Literal["auto", "store", "none"] = Field(
        "auto", description="store each pair's map, or compute maps from the stored contributions when read (auto: store up to 2 GiB)"
    )
    contributions: Literal["store", "none"] = Field(
        "store", description="store each input's contributions (maps and figures can be read), or none: keep each pair's "
        "numbers and summary only (a few KB per pair; see docs/run-file.md)"
    )
    top_cells: int = Field(16, ge=1, strict=True, description="a summary's largest token x image-position cells per pair")
    top_patches: int = Field(5, ge=1, strict=True, description="a summary's top_share counts each token's mass in this many largest patches")

    @model_validator(mode="after")
    def _check_contributions(self) -> OutputConfig:
        if self.contributions == "none" and self.pair_maps == "store":
            msg = ("output.pair_maps store needs output.contributions store: a run without contributions keeps each pair's "
                   "summary instead of its map (set output.pair_maps to auto or none, or output.contributions to store)")
            raise ValueError(msg)
        if self.contributions == "none" and self.render:
            msg = ("output.render needs output.contributions store: a run without contributions has no maps to draw "
                   "(set output.render to false, or output.contributions to store)")
            raise ValueError(msg)
        return self


class RuntimeConfig(_Section):
    batch_size: int = Field(16, ge=1, strict=True)
    internal_batch_size: int = Field(DEFAULT_INTERNAL_BATCH_SIZE, ge=1, strict=True)
    num_workers: int = Field(0, ge=0, strict=True)
    seed: int = Field(0, ge=0, le=MAX_SEED, strict=True, description="seed of torch's generators (an unsigned 64-bit number)")
    shard_index: int = Field(0, ge=0, strict=True, description="this process's block of the pairs")
    num_shards: int = Field(1, ge=1, strict=True, description="blocks the pairs are split into (Slurm array tasks, ranks)")
    threads: int | None = Field(None, ge=1, strict=True, description="torch's CPU threads (null: the CPUs the process may use)")

    @model_validator(mode="after")
    def _check_shard(self) -> RuntimeConfig:
        if self.shard_index >= self.num_shards:
            msg = f"runtime.shard_index {self.shard_index} must be below runtime.num_shards {self.num_shards}"
            raise ValueError(msg)
        return self


class RunConfig(_Section):
    model: ModelConfig
    attribution: AttributionConfig = AttributionConfig()
    image: ImageConfig = ImageConfig()
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
        keys = dict(zip(SHARDED_FORMATS, ("shards", "files")))
        if self.data.format in keys and not getattr(self.data, keys[self.data.format]):
            msg = f"data.format {self.data.format!r} needs data.{keys[self.data.format]} (the {self.data.format} files: paths or patterns)"
            raise ValueError(msg)
        for sharded, key in keys.items():
            if self.data.format != sharded and getattr(self.data, key):
                msg = f"data.{key} is read with data.format {sharded!r} only (data.format is {self.data.format!r})"
                raise ValueError(msg)
        return self

    @property
    def run_directory(self) -> Path:
        """Where this process writes: ``output.directory``, or its ``shard-IIIII-of-NNNNN`` subfolder."""
        if self.runtime.num_shards == 1:
            return self.output.directory
        return self.output.directory / f"shard-{self.runtime.shard_index:05d}-of-{self.runtime.num_shards:05d}"

    def result_fingerprint(self) -> str:
        """The settings that change results; a run directory refuses a config whose fingerprint differs.

        Paths are left out, so that a project moved as a whole (config, data, run directory) still resumes: the
        data are identified by their contents (the run file's ``data_sha256``) and a local checkpoint by its
        weights (``model_weights_sha256``)."""
        exclude = {"image": {"crop_warning"}, "output": {"render", "directory"}, "runtime": {"batch_size", "num_workers", "threads"},
                   "data": {"root", "metadata", "verify", "shards", "files"}}  # verify: how changed images are found, not what results are
        keep = self.model_dump(mode="json", exclude=exclude)
        if Path(self.model.name).is_absolute():  # a local checkpoint, resolved by load_config
            keep["model"].pop("name")
        keep["model"].pop("checkpoint")  # a weights file: identified by its digest, not its path
        keep["model"].pop("device")
        keep["attribution"].pop("mode")
        keep["attribution"].pop("panel_layout")  # changes the cost, not the guarantee (the run file records the layout)
        keep["runtime"].pop("internal_batch_size")
        return json.dumps(keep, sort_keys=True)


def settings_differences(old: str, new: str) -> list[str]:
    """The settings two :meth:`RunConfig.result_fingerprint` strings disagree on, as ``key: old -> new`` lines."""

    def flat(value: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(value, dict):
            return {prefix: value}
        return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}{key}.").items()}

    before, after = flat(json.loads(old)), flat(json.loads(new))
    return [
        f"{key.rstrip('.')}: {json.dumps(before.get(key))} -> {json.dumps(after.get(key))}"
        for key in sorted(before.keys() | after.keys())
        if before.get(key) != after.get(key)
    ]


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


def _check_structure(text: str, where: str) -> None:
    """Refuse, before anything is built from the YAML, aliases (``*name``: a few lines of nested aliases expand
    into gigabytes, "billion laughs") and nesting deeper than :data:`MAX_NESTING_DEPTH`; run configs need neither.
    The events are read as a stream, so a refusal comes at the first offending one."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            msg = f"{where}:{event.start_mark.line + 1}: YAML aliases (*{event.anchor}) are not allowed in run configs; write the value out"
            raise ConfigError(msg)
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            depth += 1
            if depth > MAX_NESTING_DEPTH:
                msg = (f"{where}:{event.start_mark.line + 1}: lists or mappings nested more than {MAX_NESTING_DEPTH} levels deep; "
                       "a run config is sections of keys with short lists")
                raise ConfigError(msg)
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            depth -= 1


def _field(keys: list[str]) -> Any:
    """The schema's annotation of a dotted key (None when the key is not in the schema)."""
    model: Any = RunConfig
    for key in keys[:-1]:
        field = model.model_fields.get(key)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    field = model.model_fields.get(keys[-1])
    return None if field is None else field.annotation


def _takes_text(annotation: Any) -> bool:
    """Whether a field holds text (str, Path or string choices), so that an override value stays a string."""
    if annotation in (str, Path):
        return True
    if get_origin(annotation) is Literal:
        return all(isinstance(choice, str) for choice in get_args(annotation))
    return any(_takes_text(arg) for arg in get_args(annotation) if arg is not type(None))


def _override_value(keys: list[str], raw: str) -> Any:
    """An override's value, typed by the schema: text fields keep the text as given (``model.revision=1234567``
    stays a string, ``data.queries=[yes, no]`` two strings); other fields read it as YAML (numbers, booleans)."""
    if raw in ("", "null", "~"):
        return None
    annotation = _field(keys)
    if annotation is not None and _takes_text(annotation):
        if get_origin(annotation) is list or any(get_origin(arg) is list for arg in get_args(annotation)):
            return yaml.load(raw, Loader=yaml.BaseLoader)  # every scalar a string
        return raw
    return yaml.safe_load(raw)


def _apply_override(data: dict[str, Any], override: str) -> tuple[str, ...]:
    """Set one ``section.key=value`` override in ``data``; returns the key path it set."""
    dotted, sep, raw = override.partition("=")
    dotted, raw = dotted.strip(), raw.strip()
    if not sep or not dotted or any(not key for key in dotted.split(".")):
        msg = f"command line override {override!r} must look like section.key=value"
        raise ConfigError(msg)
    keys = dotted.split(".")
    shown = override if len(override) <= _SHOWN_INPUT_CHARS else f"{override[:_SHOWN_INPUT_CHARS]}... ({len(override)} characters)"
    if len(keys) > MAX_NESTING_DEPTH:
        msg = f"command line override {shown!r}: {len(keys)} keys deep; a run config is sections of keys (section.key=value)"
        raise ConfigError(msg)
    try:
        _check_structure(raw, f"command line override {shown!r}")
        value = _override_value(keys, raw)
    except yaml.YAMLError as e:
        msg = f"command line override {override!r}: the value is not valid YAML ({e})"
        raise ConfigError(msg) from None
    target = data
    for depth, key in enumerate(keys[:-1]):
        target = target.setdefault(key, {})
        if not isinstance(target, dict):
            msg = f"command line override {override!r}: {'.'.join(keys[: depth + 1])} is not a section"
            raise ConfigError(msg)
    target[keys[-1]] = value
    return tuple(keys)


def _describe(error: dict[str, Any]) -> str:
    """A validation error's message, with a suggestion for a misspelt key and the offending value, shortened."""
    loc = tuple(error["loc"])
    if error["type"] == "extra_forbidden":
        model: Any = RunConfig
        for key in loc[:-1]:
            field = model.model_fields.get(key)
            model = field.annotation if field is not None else None
            if not (isinstance(model, type) and issubclass(model, BaseModel)):
                return "unknown key"
        close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
        return "unknown key" + (f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(model.model_fields)}")
    given = ""
    if "input" in error and not isinstance(error["input"], dict):
        shown = repr(error["input"])
        if len(shown) > _SHOWN_INPUT_CHARS:
            shown = shown[:_SHOWN_INPUT_CHARS] + f"... ({len(shown)} characters)"
        given = f" (got {shown})"
    return f"{error['msg']}{given}"


def _resolve_model_name(model: ModelConfig, base: Path, config_path: Path) -> ModelConfig:
    """The model name as :func:`~xclip.models.names.resolve_model_name` reads it, a local checkpoint named
    relative to the config file made absolute; an error before any loading where the loader would refuse it."""
    if model.checkpoint is not None:  # checked by the loader; here made absolute, like every path of a config
        model = model.model_copy(update={"checkpoint": str((base / Path(model.checkpoint).expanduser()).resolve())})
    try:
        source = resolve_model_name(model.name, base)
    except ModelFamilyError as e:  # the loader's refusal, said before loading (a config error) with where the name was looked up
        relative = "" if Path(model.name).expanduser().is_absolute() else f" (model.name is relative to the config file {config_path})"
        raise ConfigError(f"{e}{relative}") from None
    return model.model_copy(update={"name": source.name})


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML run config, apply ``section.key=value`` overrides, validate.

    Relative ``data.root``, ``data.metadata``, ``data.shards``, ``data.files``, ``output.directory`` and a local
    ``model.name`` resolve against the config file's folder. Override values are typed by the schema (a text field stays text).

    Raises:
        ConfigError: unreadable or oversized YAML, an alias, an unknown key, a wrong type or a missing field;
            the message names the key, and where the value came from: the file and line, or the command line.
    """
    path = Path(path)
    try:
        with path.open("rb") as file:  # at most one byte past the limit: /dev/zero or a huge file is never read whole
            raw = file.read(MAX_CONFIG_BYTES + 1)
            size = os.fstat(file.fileno()).st_size  # 0 for a device or a pipe
        if len(raw) > MAX_CONFIG_BYTES:
            msg = f"{path} is {f'{size} bytes' if size > MAX_CONFIG_BYTES else f'more than {MAX_CONFIG_BYTES} bytes'}; a run config is at most {MAX_CONFIG_BYTES} bytes"
            raise ConfigError(msg)
        text = raw.decode("utf-8-sig")
    except OSError as e:
        msg = f"cannot read config {path}: {e.strerror or e}"
        raise ConfigError(msg) from e
    except UnicodeDecodeError as e:
        msg = f"{path}: not UTF-8 text (byte {e.start}: {e.reason})"
        raise ConfigError(msg) from None
    try:
        _check_structure(text, str(path))
        data = yaml.safe_load(text) or {}
        document = yaml.compose(text)
    except yaml.YAMLError as e:
        msg = f"{path}: invalid YAML: {e}"
        raise ConfigError(msg) from e
    if not isinstance(data, dict):
        msg = f"{path}: a run config is a mapping of sections (model, data, output, ...)"
        raise ConfigError(msg)
    from_command_line = {_apply_override(data, override): override for override in overrides}
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as e:
        problems = []
        for error in e.errors(include_url=False):
            loc = tuple(error["loc"])
            if error["type"] == _SETTING_ERROR:  # a section's check names the key at fault: point at it
                loc = (*loc, error["ctx"]["setting"])
            where = ".".join(str(part) for part in loc) or "config"
            override = next((text for keys, text in from_command_line.items() if loc[: len(keys)] == keys), None)
            if override is not None:
                position = f"command line override {override!r}"
            else:
                line = _line_of(document, loc)
                position = f"{path}:{line}" if line else str(path)
            problems.append(f"{position}: {where}: {_describe(error)}")
        raise ConfigError("invalid run config:\n  " + "\n  ".join(problems)) from None
    base = path.resolve().parent
    data_config = config.data.model_copy(
        update={
            "root": (base / config.data.root).resolve(),
            "metadata": None if config.data.metadata is None else (base / config.data.metadata).resolve(),
            "shards": [str(base / Path(pattern).expanduser()) for pattern in config.data.shards],
            "files": [str(base / Path(pattern).expanduser()) for pattern in config.data.files],
        }
    )
    output = config.output.model_copy(update={"directory": (base / config.output.directory).resolve()})
    model = _resolve_model_name(config.model, base, path)
    attribution = config.attribution
    if attribution.panel_layout not in ("auto", "default"):
        attribution = attribution.model_copy(update={"panel_layout": str((base / Path(attribution.panel_layout).expanduser()).resolve())})
    return config.model_copy(update={"data": data_config, "output": output, "model": model, "attribution": attribution})
