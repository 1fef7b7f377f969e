"""The labeling options shared by ``label`` and ``relabel``, and the checks made before Ray or
the model (``job.prepare`` runs them).

``LabelingOptions`` holds what both commands mean the same way (labels, templates, model,
ranking, storage options, output location and mode); ``config.JobConfig`` and
``relabel.RelabelConfig`` add their own fields. CLI flags and YAML keys are these field names.

Fail-fast rule (issue 12): everything checkable without Ray and without loading the model is
checked by ``job.prepare`` first, in seconds: the options, labels and templates, the ranking
rule, the output location against the mode, and for ``--resume`` whether the recorded settings
(all fingerprint fields except those only the loaded model knows: checkpoint digest, model
type, score kind, preprocessing, output schema) are this run's.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from .calibration import load_calibration
from .errors import ConfigError, InputError
from .hierarchy import check_options as check_hierarchy_options
from .labels import DEFAULT_TEMPLATE, merge_labels_file, parse_label_list, validate_prompts
from .textfiles import load_yaml
from .userfiles import read_text

log = logging.getLogger(__name__)

if typing.TYPE_CHECKING:
    from .io_policy import IOPolicy

DEFAULT_MODEL = "openai/clip-vit-base-patch32"

SINGLE_LABEL_WARNING = (
    "only one candidate label ({label!r}): a CLIP-family (softmax) model scores every image 1.0 for it, "
    "since softmax over one label is always 1; add labels (e.g. a catch-all such as 'something else'), "
    "or use a SigLIP-family (sigmoid) model, whose score of one label means something")
OUTPUT_MODES = ("error", "resume", "overwrite")
DEFAULT_TOP_K = 5

# Option fields (of every options class) that change no output row (execution, storage, mode),
# or that enter the fingerprint in resolved form (model, labels, templates, calibration by id;
# decode limits via the preprocessing spec). Every other field is fingerprinted as is, so a new
# result-changing option is covered without editing the store.
NON_RESULT_FIELDS = frozenset({
    "output", "address", "batch_size", "concurrency", "num_gpus_per_actor", "num_cpus_per_actor",
    "decode_cpus_per_task", "storage_options", "mode", "retry_errors", "max_error_fraction", "rows_per_file",
    "labels_file", "labels", "templates", "model", "revision", "max_pixels", "min_side", "fast_decode",
    "calibration", "hierarchy", "head",
    # time limits decide nothing about a labeled row
    "io_timeout", "io_retries", "decode_timeout",
})


# Flags whose config key is another (or none): named in the unknown-key error.
FLAG_KEYS = {"resume": "write 'mode: resume'", "overwrite": "write 'mode: overwrite'",
             "template": "write 'templates: [...]' (a list, or one template as a string)",
             **{k: "a command-line flag only, not a job setting" for k in
                ("ground_truth", "eval_json", "quiet", "verbose", "config")}}


@dataclass
class LabelingOptions:
    """Options shared by ``zslabel label`` and ``zslabel relabel`` (YAML keys and CLI flags).

    Attributes:
        output: output folder or fsspec URI.
        labels, labels_file, templates: candidate labels (file lines follow ``labels``) and
            prompt templates, each with one ``{}``.
        model, revision: checkpoint (hub id, local folder or fsspec URI) and hub revision.
        top_k, min_score, multi_label, threshold: the ranking rule (``ranking.RankingRule``).
        storage_options: fsspec options for input, output and a remote model folder.
        mode: "error" (refuse an occupied output), "resume" or "overwrite" (see ``store.session``).
        retry_errors: with ``resume``: recompute the rows that failed in earlier runs.
        max_error_fraction: in [0, 1]: fail (exit 1, output written) when more rows failed.
        calibration: a calibration file (``calibration.py``) whose map is applied to the logits.
        hierarchy: with ``min_score``: add the deepest label path whose rolled-up score reaches it.
    """

    output: str = ""
    labels: list[str] = field(default_factory=list)
    labels_file: str | None = None
    templates: list[str] = field(default_factory=lambda: [DEFAULT_TEMPLATE])
    model: str | None = DEFAULT_MODEL
    revision: str | None = None
    top_k: int = DEFAULT_TOP_K
    min_score: float | None = None
    multi_label: bool = False
    threshold: float | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    mode: str = "error"
    retry_errors: bool = False
    max_error_fraction: float | None = None
    # calibration file (``zslabel calibrate``) and label-path roll-up (``hierarchy.py``)
    calibration: str | None = None
    hierarchy: bool = False
    # a fitted head (``zslabel fit``, ``zslabel.heads``) whose logits replace the zero-shot ones
    head: str | None = None

    # ---- construction -------------------------------------------------------------------
    def __post_init__(self):
        self._python_forms()

    def _python_forms(self) -> None:
        """The Python API's spellings of what YAML and the CLI give: a path-like object
        (``pathlib.Path``) as its string, ``labels`` as one string split as ``--labels`` splits
        it (a string was taken as its characters: labels 'c', 'a', 't'), ``templates`` as one
        string a list of one, a tuple for a list. Types are checked by :meth:`validate`."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
            if isinstance(value, str) and f.name == "labels":
                value = parse_label_list(value)
            elif isinstance(value, str) and f.name == "templates":
                value = [value]
            elif isinstance(value, tuple) and f.name in ("labels", "templates"):
                value = list(value)
            setattr(self, f.name, value)

    def _check_types(self) -> None:
        """Every field's value against its type, as :meth:`from_dict` checks YAML's (a number
        given as a string was a raw ``TypeError`` from the first comparison).

        Raises:
            ConfigError: naming the field, the type it takes and the value.
        """
        # Again: a field may have been set after construction (``options.labels = "a,b"``).
        self._python_forms()
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = self._convert(f.name, getattr(self, f.name))
            if not _matches(value, hints[f.name]):
                raise ConfigError(f"{f.name} must be {_describe(hints[f.name])} (got {value!r})")
            setattr(self, f.name, value)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Build from a dict (YAML), rejecting unknown keys with the list of known ones and
        values whose type does not fit the field."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            spelled = "".join(f"; {k}: {FLAG_KEYS[k]}" for k in unknown if k in FLAG_KEYS)
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}{spelled} (known: {', '.join(sorted(known))})")
        data = dict(data)
        if isinstance(data.get("labels"), str):
            data["labels"] = parse_label_list(data["labels"])
        if isinstance(data.get("templates"), str):
            data["templates"] = [data["templates"]]
        hints = typing.get_type_hints(cls)
        for key, value in data.items():
            value = data[key] = cls._convert(key, value)
            if not _matches(value, hints[key]):
                raise ConfigError(f"config key {key!r} must be {_describe(hints[key])} (got {value!r})")
        return cls(**data)

    @classmethod
    def _convert(cls, key: str, value: Any) -> Any:
        """Hook for fields whose YAML form differs from the field type (see JobConfig)."""
        return value

    @classmethod
    def from_yaml(cls, path: str):
        """Read a YAML config file; raises ConfigError if missing, invalid, or not a mapping."""
        import yaml

        text = read_text(path, what="config")
        try:
            data = load_yaml(text) or {}
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
            raise ConfigError(f"cannot read config {path}: {getattr(exc, 'problem', None) or exc}{at}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config {path} must be a mapping of keys to values")
        return cls.from_dict(data)

    @classmethod
    def from_args(cls, args: Any, base=None):
        """Options from parsed CLI flags: every attribute of ``args`` named like a field and not
        None is set on ``base`` (default: ``cls()``), so a flag is mapped by its ``dest``."""
        options = base if base is not None else cls()
        names = {f.name for f in dataclasses.fields(cls)}
        for name, value in vars(args).items():
            if name in names and value is not None:
                setattr(options, name, value)
        return options

    # ---- validation ---------------------------------------------------------------------
    def validate(self):
        """Check the shared options (no model, no storage); merges ``labels_file`` into ``labels``.

        Returns:
            The validated ``ranking.RankingRule``.

        Raises:
            ConfigError: naming the first bad setting and how to fix it.
        """
        self._check_types()
        self.labels = merge_labels_file(self.labels, self.labels_file)
        self.labels_file = None
        if not self.output:
            raise ConfigError("no output given: pass --output DIR_OR_URI")
        if self.output.strip() == "-":  # the Unix "stdout": it made a folder named "-" here
            raise ConfigError("--output - : the output is a folder of Parquet files, not a stream; pass a "
                              "folder or URI (zslabel show FOLDER prints it)")
        validate_prompts(self.labels, self.templates)
        if len(self.labels) == 1:
            # Said here, before the model loads (the score kind is known only then), so that it
            # is the first thing a user sees; for SigLIP the warning's second half applies.
            log.warning(SINGLE_LABEL_WARNING.format(label=self.labels[0]))
        rule = self.ranking_rule()
        rule.validate()
        check_hierarchy_options(self.hierarchy, self.min_score)
        if self.mode not in OUTPUT_MODES:
            raise ConfigError(f"mode must be one of {OUTPUT_MODES} (got {self.mode!r})")
        if self.retry_errors and self.mode != "resume":
            raise ConfigError("--retry-errors only applies with --resume")
        if self.max_error_fraction is not None and not 0 <= self.max_error_fraction <= 1:
            raise ConfigError(f"--max-error-fraction must be in [0, 1] (got {self.max_error_fraction})")
        if not isinstance(self.storage_options, dict):
            raise ConfigError("storage_options must be a mapping")
        return rule

    def ranking_rule(self):
        """The ``ranking.RankingRule`` of these options (top-k, abstention, multi-label)."""
        from .ranking import RankingRule

        return RankingRule(top_k=self.top_k, min_score=self.min_score, multi_label=bool(self.multi_label),
                           threshold=self.threshold)

    # ---- reporting ----------------------------------------------------------------------
    def result_settings(self, labels: list[str] | None = None, templates: list[str] | None = None
                        ) -> dict[str, Any]:
        """The settings that change output rows and are known before the model loads, as a
        JSON-able dict for the store's fingerprint (``store.fingerprint_fields``): every field
        not in ``NON_RESULT_FIELDS`` as it is, ``model`` (``id``, ``revision``), ``labels`` and
        ``templates`` (as embedded; default: these options'), the calibration by content (its
        id, not its path) and ``hierarchy`` (both only when used, so outputs of earlier
        versions still resume).

        Raises:
            ConfigError: the calibration file cannot be read.
        """
        import json

        fields = {k: v for k, v in self.public_dict().items() if k not in NON_RESULT_FIELDS}
        from . import storage

        # One spelling of local locations: a rerun from another working folder is the same job.
        if "input" in fields:
            fields["input"] = storage.local_spelling(fields["input"])
        fields.update(model={"id": storage.local_spelling(self.model, existing_only=True), "revision": self.revision},
                      labels=list(self.labels if labels is None else labels),
                      templates=list(self.templates if templates is None else templates))
        if self.calibration:
            fields["calibration"] = load_calibration(self.calibration, self.storage_options).id
        if self.hierarchy:
            fields["hierarchy"] = True
        if self.head:  # by content (its id), like the calibration; only when used
            from .heads import load_head

            fields["head"] = load_head(self.head, self.storage_options).id
        return json.loads(json.dumps(fields, default=str))  # tuples -> lists, as after a JSON round trip

    def public_dict(self) -> dict[str, Any]:
        """The options as a JSON-able dict with storage option values redacted (never secrets)."""
        d = dataclasses.asdict(self)
        d["storage_options"] = {k: "<redacted>" for k in self.storage_options}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def check_input_exists(uri: str, storage_options: dict | None = None, io: IOPolicy | None = None) -> None:
    """Fail in seconds, before Ray starts, on an input that does not exist or cannot be read: a
    path or URI that is not there, a glob that matches nothing, a local folder holding no
    (non-hidden) file at all, or a remote input whose store refuses the credentials, has none
    to use, or cannot be reached (:func:`remote_access_message`). Brace patterns
    (``shard-{000..009}.tar``) are left to the planner, which turns a missing named shard into
    an error row (for a remote one, the first shard is asked for, to check access); what a
    non-empty folder holds is the planner's to judge.

    Args:
        io: ``io_policy.IOPolicy`` bounding the check's requests (default: its defaults).

    Raises:
        InputError: naming the input and, for a remote one that cannot be read, the fix.
    """
    from . import io_policy, storage

    try:
        fs, path = storage.url_to_fs(uri, storage_options, io=io)
    except InputError:
        raise
    except Exception:  # noqa: BLE001 - e.g. bad storage options: the planner reports them
        return
    remote = not storage.is_local(fs)
    try:
        if "{" in uri:
            if remote:
                first = storage.url_to_fs(storage.expand_braces(uri)[0], storage_options, io=io)[1]
                fs.exists(first)  # only its failure counts: a missing shard is the planner's row
            return
        pattern = storage.is_pattern(uri, storage_options, io=io)
        found = bool(fs.glob(path)) if pattern else fs.exists(path)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - storage errors differ per backend
        if remote:
            raise InputError(remote_access_message(uri, exc)) from None
        return  # a local oddity (permissions on a parent, ...): the planner reports it per path
    if not found and remote and not pattern:
        # Some backends answer "no" when they were refused (s3fs's exists() on a bucket swallows
        # every error): ask once more in a way that says why.
        try:
            fs.info(path)
        except FileNotFoundError as exc:
            # fsspec's HTTP info calls every failed HEAD and GET "not found" (fsspec#873): a
            # timeout, a refused connection, 403 (an expired signed URL) or 500 say so; only a
            # 404 (or no cause) means the input is not there.
            timeout = io_policy.timeout_cause(exc)
            if timeout is not None:
                raise InputError(remote_access_message(uri, timeout)) from None
            cause = exc.__cause__
            if cause is not None and getattr(cause, "status", None) != 404:
                raise InputError(remote_access_message(uri, cause)) from None
        except Exception as exc:  # noqa: BLE001 - storage errors differ per backend
            raise InputError(remote_access_message(uri, exc)) from None
    if not found:
        raise InputError(f"no images found: no file matches the pattern {uri}" if pattern else
                         f"no images found: {uri} does not exist")
    if not pattern and storage.is_local(fs) and os.path.isdir(path) and not _has_visible_file(path):
        if any(files for _, _, files in os.walk(path)):
            raise InputError(f"no images found: {uri} holds only hidden files (names starting with '.', which are "
                             "never read)")
        raise InputError(f"no images found: {uri} is an empty folder")


def _has_visible_file(folder: str) -> bool:
    """Whether ``folder`` holds a file outside hidden (dot) folders; stops at the first one."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(not f.startswith(".") for f in filenames):
            return True
    return False


# Exception class names (anywhere in the MRO) by what they mean; names, so that no optional
# backend (botocore, google-auth, azure-core) has to be importable here.
_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError",
                   "CredentialUnavailableError", "ClientAuthenticationError", "RefreshError"}
_UNREACHABLE = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ClientConnectorError",
                "ServerTimeoutError", "ServiceRequestError", "ConnectionError", "TimeoutError", "gaierror"}
_CREDENTIAL_FIX = {
    "s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or pass --storage-options "
          "'{\"key\": \"...\", \"secret\": \"...\"}'; for a public bucket pass --storage-options '{\"anon\": true}'",
    "gs": "run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS; for a public "
          "bucket pass --storage-options '{\"token\": \"anon\"}'",
    "az": "set AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY, AZURE_STORAGE_SAS_TOKEN or "
          "AZURE_STORAGE_CONNECTION_STRING, or pass them in --storage-options",
}


def _refused(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) is a refused connection (ECONNREFUSED)."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, ConnectionRefusedError) or getattr(seen, "errno", None) == errno.ECONNREFUSED \
                or "Connect call failed" in str(seen):
            return True
        seen = getattr(seen, "os_error", None) or seen.__cause__ or seen.__context__
    return False


def remote_access_message(uri: str, exc: BaseException) -> str:
    """One line saying why a remote input cannot be read and how to fix it.

    By the exception: no credentials found, credentials refused (403, ``PermissionError``),
    the store not reachable (connection refused, unknown host, timeout), or anything else
    (its type and message).
    """
    names = {c.__name__ for c in type(exc).__mro__}
    proto = uri.split("://", 1)[0].split("::")[-1].lower() if "://" in uri else "file"
    key = {"s3a": "s3", "gcs": "gs", "abfs": "az", "abfss": "az"}.get(proto, proto)
    detail = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    endpoint = "the endpoint (--storage-options client_kwargs.endpoint_url for S3-compatible stores) and "
    if names & _NO_CREDENTIALS:
        fix = _CREDENTIAL_FIX.get(key, "pass them in --storage-options")
        return f"cannot read {uri}: no credentials for {key}:// ({detail}); {fix}"
    status = getattr(exc, "status", None) or getattr(exc, "code", None)
    if isinstance(exc, PermissionError) or status in (401, 403) or "AccessDenied" in str(exc):
        return (f"cannot read {uri}: access denied ({detail}); check that the credentials in use (environment, "
                f"profile or --storage-options) are valid and may list and read it")
    if names & _UNREACHABLE:
        if _refused(exc):  # a server that answered "no one here": waiting longer does not help
            return (f"cannot reach {uri} ({detail}); nothing accepts connections there: check "
                    f"{endpoint if key == 's3' else ''}the host and port, and that the server is running")
        return (f"cannot reach {uri} ({detail}); check {endpoint if key == 's3' else ''}the network, "
                "or raise --io-timeout for a slow store")
    return f"cannot read {uri} ({detail}); check the URI and --storage-options"


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
    if origin is tuple:
        return isinstance(value, tuple)
    if origin is dict:
        return isinstance(value, dict)
    return True


def _describe(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("NoneType", "None")
