"""The one job configuration: a dataclass built from YAML and/or CLI flags, validated up front.

Everything here is checked before any image is read. ``fingerprint_fields`` lists what changes
results, for the run manifest and resume checks.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .sources import INPUT_FORMATS
from .textfiles import read_lines, read_text
from .hierarchy import check_options as check_hierarchy_options
from .labels import (DEFAULT_TEMPLATE, TEMPLATE_SETS, merge_labels_file, parse_label_list,
                     validate_prompts)

DEFAULT_MODEL = "openai/clip-vit-base-patch32"
OUTPUT_MODES = ("error", "resume", "overwrite")


@dataclass
class JobConfig:
    """Configuration of one labeling job (YAML keys and CLI flags share these names).

    Units: pixels for ``max_pixels``/``min_side``; fractions in [0, 1] for
    ``max_error_fraction``; CPU/GPU counts are Ray logical resources per actor or task.
    """

    input: str = ""
    output: str = ""
    labels: list[str] = field(default_factory=list)
    labels_file: str | None = None
    templates: list[str] = field(default_factory=lambda: [DEFAULT_TEMPLATE])
    model: str = DEFAULT_MODEL
    revision: str | None = None
    top_k: int = 5
    # Ray Data
    address: str | None = None
    batch_size: int = 64
    concurrency: tuple[int, int] | None = None     # actor pool (min, max); None = from cluster size
    num_gpus_per_actor: float = 0.0
    # Half a logical CPU per labeler actor (it runs ceil(CPUs held) = 1 torch thread): CPU-only
    # nodes get one single-threaded actor per core with half the CPUs left for decode tasks;
    # GPU actors need little CPU (benchmarks/README.md).
    num_cpus_per_actor: float = 0.5
    decode_cpus_per_task: float = 1.0
    # input / storage
    input_format: str = "auto"
    storage_options: dict[str, Any] = field(default_factory=dict)
    path_column: str | None = None
    id_column: str | None = None
    image_column: str | None = None
    dedupe: bool = False
    # decoding
    # Pillow's own decompression-bomb error threshold (2 x Image.MAX_IMAGE_PIXELS): a real
    # 10000x10000 photo is labeled, a header claiming 30000x30000 is refused before allocation.
    max_pixels: int = 178_956_970
    min_side: int = 1
    fast_decode: bool = False
    # model execution
    dtype: str = "auto"                             # auto = float16 on CUDA, float32 on CPU
    # output
    mode: str = "error"
    retry_errors: bool = False                      # with mode "resume": recompute earlier error rows
    rows_per_file: int = 1024                       # rows per committed Parquet file (at most)
    store_embeddings: bool = False
    embedding_dtype: str = "float16"
    max_error_fraction: float | None = None
    # ranking (see ranking.RankingRule): abstain below min_score; multi-label for sigmoid models
    min_score: float | None = None
    multi_label: bool = False
    threshold: float | None = None
    # calibration file (``zslabel calibrate``) and label-path roll-up (``hierarchy.py``)
    calibration: str | None = None
    hierarchy: bool = False

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "JobConfig":
        """Build from a dict (YAML), rejecting unknown keys with the list of known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        data = dict(data)
        if isinstance(data.get("labels"), str):
            data["labels"] = parse_label_list(data["labels"])
        if isinstance(data.get("templates"), str):
            data["templates"] = [data["templates"]]
        if data.get("concurrency") is not None:
            data["concurrency"] = parse_concurrency(data["concurrency"])
        hints = typing.get_type_hints(cls)
        for key, value in data.items():
            if key != "concurrency" and not _matches(value, hints[key]):
                raise ConfigError(f"config key {key!r} must be {_describe(hints[key])} (got {value!r})")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str) -> "JobConfig":
        """Read a YAML config file; raises ConfigError if missing, invalid, or not a mapping."""
        import yaml

        text = read_text(path, what="config")
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config {path} must be a mapping of keys to values")
        return cls.from_dict(data)

    # ---- validation ---------------------------------------------------------------------
    def resolve_labels(self) -> None:
        """Merge ``labels_file`` into ``labels`` (file lines after any --labels entries)."""
        self.labels = merge_labels_file(self.labels, self.labels_file)
        self.labels_file = None

    def validate(self) -> None:
        """Check every setting that can be checked without the model or storage.

        Raises:
            ConfigError: naming the first bad setting and how to fix it.
        """
        self.resolve_labels()
        if not self.input:
            raise ConfigError("no input given")
        if not self.output:
            raise ConfigError("no output given: pass --output DIR_OR_URI")
        validate_prompts(self.labels, self.templates)
        self.ranking_rule().validate()
        check_hierarchy_options(self.hierarchy, self.min_score)
        if self.rows_per_file < 1:
            raise ConfigError(f"--rows-per-file must be >= 1 (got {self.rows_per_file})")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1 (got {self.batch_size})")
        if self.num_gpus_per_actor < 0 or self.num_cpus_per_actor < 0 or self.decode_cpus_per_task <= 0:
            raise ConfigError("resources per actor/task must be positive")
        if self.num_gpus_per_actor == 0 and self.num_cpus_per_actor == 0:
            raise ConfigError("a CPU actor needs --num-cpus-per-actor > 0")
        if self.concurrency is not None:
            self.concurrency = parse_concurrency(self.concurrency)
        if self.mode not in OUTPUT_MODES:
            raise ConfigError(f"mode must be one of {OUTPUT_MODES} (got {self.mode!r})")
        if self.retry_errors and self.mode != "resume":
            raise ConfigError("--retry-errors only applies with --resume")
        if self.input_format not in INPUT_FORMATS:
            raise ConfigError(f"--input-format must be one of {INPUT_FORMATS} (got {self.input_format!r})")
        if self.max_pixels < 1 or self.min_side < 1:
            raise ConfigError("--max-pixels and --min-side must be >= 1")
        if self.max_error_fraction is not None and not 0 <= self.max_error_fraction <= 1:
            raise ConfigError(f"--max-error-fraction must be in [0, 1] (got {self.max_error_fraction})")
        if self.embedding_dtype not in ("float16", "float32"):
            raise ConfigError("--embedding-dtype must be float16 or float32")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ConfigError("--dtype must be auto, float32, float16 or bfloat16")
        if not isinstance(self.storage_options, dict):
            raise ConfigError("storage_options must be a mapping")

    def ranking_rule(self):
        """The ``ranking.RankingRule`` of this job (top-k, abstention, multi-label)."""
        from .ranking import RankingRule

        return RankingRule(top_k=self.top_k, min_score=self.min_score, multi_label=bool(self.multi_label),
                           threshold=self.threshold)

    # ---- reporting ----------------------------------------------------------------------
    def public_dict(self) -> dict[str, Any]:
        """The config as JSON-able dict with storage option values redacted (never secrets)."""
        d = dataclasses.asdict(self)
        d["storage_options"] = {k: "<redacted>" for k in self.storage_options}
        if d["concurrency"] is not None:
            d["concurrency"] = list(d["concurrency"])
        return d


def _matches(value: Any, hint: Any) -> bool:
    """Whether a YAML value fits a field's type hint (bool is not an int; ints are floats)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    return True


def _describe(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("NoneType", "None")


def parse_concurrency(value: Any) -> tuple[int, int]:
    """``"2,8"``, ``"4"``, ``[2, 8]`` or ``4`` -> ``(min, max)`` actors; ConfigError when invalid."""
    try:
        if isinstance(value, str):
            parts = [int(p) for p in value.split(",")]
        elif isinstance(value, (list, tuple)):
            parts = [int(p) for p in value]
        else:
            parts = [int(value)]
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--concurrency must be N or MIN,MAX (got {value!r})") from exc
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not 1 <= parts[0] <= parts[1]:
        raise ConfigError(f"--concurrency must be N or MIN,MAX with 1 <= MIN <= MAX (got {value!r})")
    return parts[0], parts[1]


def parse_storage_options(text: str) -> dict[str, Any]:
    """JSON or YAML text (or a path to a file holding it) -> dict; ConfigError otherwise."""
    import yaml

    if Path(text).is_file():
        text = read_text(text, what="--storage-options file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--storage-options is neither JSON nor YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError("--storage-options must be a JSON/YAML mapping")
    return data


def resolve_templates(value: str) -> list[str]:
    """``--templates`` argument: a named set (see ``labels.TEMPLATE_SETS``) or a file of lines."""
    if value in TEMPLATE_SETS:
        return list(TEMPLATE_SETS[value])
    if not Path(value).is_file() and "://" not in value:
        raise ConfigError(f"--templates {value!r} is neither a named set ({', '.join(TEMPLATE_SETS)}) "
                          "nor a file")
    return read_lines(read_text(value, what="templates file"))
