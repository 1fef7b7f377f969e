"""The labeling job's configuration: the shared ``options.LabelingOptions`` plus what only
``zslabel label`` has (input, Ray, decoding, output layout), built from YAML and/or CLI flags and
validated up front.

Everything here is checked before any image is read. ``options.NON_RESULT_FIELDS`` lists what
does not change results; every other field enters the run fingerprint.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .decode import DEFAULT_DECODE_TIMEOUT
from .errors import ConfigError
from .io_policy import DEFAULT_IO_RETRIES, DEFAULT_IO_TIMEOUT, IOPolicy
from .labels import TEMPLATE_SETS, local_file_wins
from .options import DEFAULT_MODEL, OUTPUT_MODES, LabelingOptions, check_input_exists  # noqa: F401 - re-exported
from .sources import INPUT_FORMATS  # noqa: F401 - re-exported; the registry is the only list
from .textfiles import load_yaml, read_lines
from .userfiles import read_text

# The longest time limit taken (a day): larger ones overflow the clocks of thread joins and
# future waits (OverflowError: every row failed), and mean "no limit" anyway (--decode-timeout 0).
MAX_TIMEOUT_S = 86400.0


@dataclass
class JobConfig(LabelingOptions):
    """Configuration of one labeling job (YAML keys and CLI flags share these names).

    Units: pixels for ``max_pixels``/``min_side``; fractions in [0, 1] for
    ``max_error_fraction``; seconds for ``io_timeout``/``decode_timeout``; CPU/GPU counts are
    Ray logical resources per actor or task.
    """

    input: str = ""
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
    path_column: str | None = None
    id_column: str | None = None
    image_column: str | None = None
    dedupe: bool = False
    # Seconds to connect and to wait for the next bytes of a remote input, and retries of a
    # transient failure (HTTP 429/5xx, resets) with backoff; see io_policy.IOPolicy.
    io_timeout: float = DEFAULT_IO_TIMEOUT
    io_retries: int = DEFAULT_IO_RETRIES
    # decoding
    # Pillow's own decompression-bomb error threshold (2 x Image.MAX_IMAGE_PIXELS): a real
    # 10000x10000 photo is labeled, a header claiming 30000x30000 is refused before allocation.
    max_pixels: int = 178_956_970
    min_side: int = 1
    fast_decode: bool = False
    decode_timeout: float = DEFAULT_DECODE_TIMEOUT    # seconds per image; 0 = no limit
    # transformers.image_utils.load_image's pixels (alpha dropped, deep samples clipped)
    reference_pixels: bool = False
    # model execution
    dtype: str = "auto"                             # auto = float16 on CUDA, float32 on CPU
    # output
    rows_per_file: int = 1024                       # rows per committed Parquet file (at most)
    store_embeddings: bool = False
    embedding_dtype: str = "float16"

    @classmethod
    def _convert(cls, key: str, value: Any) -> Any:
        return parse_concurrency(value) if key == "concurrency" and value is not None else value

    # ---- validation ---------------------------------------------------------------------
    def validate(self):
        """Check every setting that can be checked without the model or storage.

        Returns:
            The validated ``ranking.RankingRule``.

        Raises:
            ConfigError: naming the first bad setting and how to fix it.
        """
        if not self.input:
            raise ConfigError("no input given")
        rule = super().validate()
        if not self.model:
            raise ConfigError("no model given: pass --model")
        if self.rows_per_file < 1:
            raise ConfigError(f"--rows-per-file must be >= 1 (got {self.rows_per_file})")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1 (got {self.batch_size})")
        for flag, value, low in (("--num-gpus-per-actor", self.num_gpus_per_actor, 0.0),
                                 ("--num-cpus-per-actor", self.num_cpus_per_actor, 0.0),
                                 ("--decode-cpus-per-task", self.decode_cpus_per_task, None)):
            # NaN fails every comparison, and inf asks more than any node has: both refused here.
            if not math.isfinite(value) or value < 0 or (low is None and value == 0):
                raise ConfigError(f"{flag} must be a finite number {'> 0' if low is None else '>= 0'} (got {value})")
        if self.num_gpus_per_actor == 0 and self.num_cpus_per_actor == 0:
            raise ConfigError("a CPU actor needs --num-cpus-per-actor > 0")
        if self.concurrency is not None:
            self.concurrency = parse_concurrency(self.concurrency)
        if self.input_format not in INPUT_FORMATS:
            raise ConfigError(f"--input-format must be one of {INPUT_FORMATS} (got {self.input_format!r})")
        if self.max_pixels < 1 or self.min_side < 1:
            raise ConfigError("--max-pixels and --min-side must be >= 1")
        self.io_policy()  # its limits checked
        if not 0 <= self.decode_timeout <= MAX_TIMEOUT_S:
            raise ConfigError(f"--decode-timeout must be 0 (no limit) to {MAX_TIMEOUT_S:.0f} seconds "
                              f"(got {self.decode_timeout})")
        if self.reference_pixels and self.fast_decode:
            raise ConfigError("--reference-pixels reproduces transformers' load_image exactly; --fast-decode "
                              "changes pixels: use one of them")
        if self.embedding_dtype not in ("float16", "float32"):
            raise ConfigError("--embedding-dtype must be float16 or float32")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ConfigError("--dtype must be auto, float32, float16 or bfloat16")
        return rule


    def public_dict(self) -> dict[str, Any]:
        """``LabelingOptions.public_dict``; ``reference_pixels`` only when set, so that it enters
        the run fingerprint (it changes pixels) while runs made before it existed still resume."""
        d = super().public_dict()
        if not d.get("reference_pixels"):
            d.pop("reference_pixels", None)
        return d

    def io_policy(self) -> IOPolicy:
        """The time limits and retries (``io_policy.IOPolicy``) of this job's every read: the
        input check, planning and fetching.

        Raises:
            ConfigError: ``io_timeout`` not in (0, ``MAX_TIMEOUT_S``] seconds, or ``io_retries`` < 0.
        """
        # Types checked here too: run_label_job builds the policy before validate() runs.
        timeout, retries = self.io_timeout, self.io_retries
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= MAX_TIMEOUT_S:
            raise ConfigError(f"--io-timeout must be > 0 and at most {MAX_TIMEOUT_S:.0f} seconds (it bounds every "
                              f"read; got {timeout!r})")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ConfigError(f"--io-retries must be >= 0 (got {retries!r})")
        return IOPolicy(timeout=float(self.io_timeout), retries=int(self.io_retries))

    def check_input(self) -> None:
        """The input exists and is readable, within this job's I/O policy
        (``options.check_input_exists``); called by ``job.prepare`` once the options are valid
        and the output checked, before the model loads.

        Raises:
            InputError: as ``options.check_input_exists``.
        """
        check_input_exists(self.input, self.storage_options, io=self.io_policy())

    def decode_time_limit(self) -> float | None:
        """Seconds per image for ``decode.decode_image``, None for no limit (``decode_timeout`` 0)."""
        return float(self.decode_timeout) or None


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
    elif text.lower().endswith((".json", ".yaml", ".yml")) and "{" not in text:
        raise ConfigError(f"--storage-options file {text} does not exist")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = load_yaml(text)
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
            raise ConfigError(f"--storage-options is neither JSON nor YAML: {getattr(exc, 'problem', None) or exc}{at}"
                              ) from exc
    if not isinstance(data, dict):
        raise ConfigError("--storage-options must be a JSON/YAML mapping")
    return data


def resolve_templates(value: str) -> list[str]:
    """``--templates`` argument: a file of lines, or a named set (see ``labels.TEMPLATE_SETS``)
    when no local file of that name exists (``labels.local_file_wins``, the ``--labels-file``
    rule: a local file wins, with a warning when it shadows a named set)."""
    if value in TEMPLATE_SETS and not local_file_wins(value, TEMPLATE_SETS, "--templates"):
        return list(TEMPLATE_SETS[value])
    if not Path(value).exists() and "://" not in value:  # a file, or a pipe (<(...))
        raise ConfigError(f"--templates {value!r} is neither a named set ({', '.join(TEMPLATE_SETS)}) "
                          "nor a file")
    return read_lines(read_text(value, what="templates file"))
