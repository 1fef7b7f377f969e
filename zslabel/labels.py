"""Label sets: candidate label names, prompt templates, and their (C, D) label embeddings.

The label embeddings are the zero-shot classifier's weight matrix, built once per job from the
text tower (open_clip ``build_zero_shot_classifier``; CLIP paper, section 3.1.4): for each label,
embed every templated prompt, L2-normalise each, average over templates, L2-normalise again.
With a single template this is exactly the normalised text embedding the reference pipeline uses.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import string
import unicodedata
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError
from .hierarchy import SEPARATOR, prompt_name
from .ranking import ensemble
from .textfiles import read_lines
from .userfiles import read_text

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "This is a photo of {}."
# Named label and template sets shipped as package data (zslabel/label_sets/NAME.txt; each
# file's header gives its source and licence).
LABEL_SETS_DIR = Path(__file__).resolve().parent / "label_sets"
LABEL_SETS = ("imagenet-1k",)
# Bump when the label-embedding computation or the prompt-token checks change, so cached
# embeddings are not reused (a cache hit skips the checks: they passed when it was written).
LABEL_CACHE_VERSION = 1

# Named template sets for --templates NAME. "openai-imagenet-7" is the 7-template subset the
# CLIP authors recommend (CLIP repo, notebooks/Prompt_Engineering_for_ImageNet.ipynb).
TEMPLATE_SETS: dict[str, list[str]] = {
    "default": [DEFAULT_TEMPLATE],
    "openai-imagenet-7": [
        "itap of a {}.",
        "a bad photo of the {}.",
        "a origami {}.",
        "a photo of the large {}.",
        "a {} in a video game.",
        "art of the {}.",
        "a photo of the small {}.",
    ],
    "simple-4": ["a photo of a {}.", "a picture of a {}.", "an image of a {}.", "This is a photo of {}."],
}


def parse_label_list(text: str) -> list[str]:
    """Split a comma-separated label string (``"cat, dog,bird"``) into stripped names."""
    return [part.strip() for part in text.split(",")]


def validate_labels(names: list[str]) -> None:
    """Raise ConfigError for an empty list, an empty name, or duplicate names (all named)."""
    if not names:
        raise ConfigError("no labels given: pass --labels 'cat,dog' or --labels-file FILE")
    if any(not n for n in names):
        raise ConfigError(f"empty label name in {names!r} (check for a stray comma)")
    bad_paths = [n for n in names if SEPARATOR in n and any(not p.strip() for p in n.split(SEPARATOR))]
    if bad_paths:
        raise ConfigError(f"label paths with an empty component: {', '.join(map(repr, bad_paths))} "
                          "(write a hierarchy as 'animal/mammal/dog')")
    seen, dups = set(), []
    for n in names:
        if n in seen and n not in dups:
            dups.append(n)
        seen.add(n)
    if dups:
        raise ConfigError(f"duplicate labels: {', '.join(repr(d) for d in dups)}")


def validate_template(template: str) -> None:
    """Raise ConfigError unless ``template`` has exactly one empty ``{}`` field: no name, no
    conversion (``{!r}`` quotes the label), no format spec (``{:.2}`` cuts it, and two labels
    cut alike become one prompt), as the label is put in by ``str.format``."""
    try:
        fields = [f + ("" if conv is None else "!" + conv) + (":" + spec if spec else "")
                  for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ConfigError(f"template {template!r} is not a valid format string: {exc}") from exc
    if fields != [""]:
        found = ", ".join("{" + f + "}" for f in fields) or "none"
        raise ConfigError(f"template {template!r} must contain exactly one empty '{{}}' field, where the label goes "
                          f"(found: {found}); e.g. 'a photo of a {{}}.'")


def local_file_wins(name: str, named_sets, flag: str) -> bool:
    """Whether ``name`` (a ``--labels-file``/``--templates`` value) is read as a local file: one
    exists by that name (a file or a pipe, not a folder). The rule for both flags: an existing
    local file wins over a named set shipped with zslabel; a warning says so when ``name`` is
    also one of ``named_sets``, since the user may have meant the set."""
    p = Path(name)
    if not p.exists() or p.is_dir():
        return False
    if name in named_sets:
        log.warning("%s %s reads the local file %s, not the named set %r shipped with zslabel (to use the set, "
                    "run from another folder or rename the file; pass ./%s to read the file without this warning)",
                    flag, name, p.resolve(), name, name)
    return True


def named_set_path(name: str | None) -> str | None:
    """The package-data file of a named label set (``LABEL_SETS``, e.g. ``"imagenet-1k"``) when
    ``name`` is one and no local file of that name exists (:func:`local_file_wins`, which warns
    when one does); else ``name`` unchanged."""
    if name in LABEL_SETS and not local_file_wins(name, LABEL_SETS, "--labels-file"):
        return str(LABEL_SETS_DIR / f"{name}.txt")
    return name


def merge_labels_file(labels: list[str], labels_file: str | None) -> list[str]:
    """``labels`` followed by the lines of ``labels_file`` (if given): a file, or a named set
    (``LABEL_SETS``, e.g. ``"imagenet-1k"``).

    Raises:
        ConfigError: the file cannot be read, or is not UTF-8 (see ``textfiles.decode_text``).
    """
    labels_file = named_set_path(labels_file)
    if not labels_file:
        return list(labels)
    return list(labels) + read_lines(read_text(labels_file, what="labels file"))


def validate_prompts(names: list[str], templates: list[str]) -> None:
    """Labels (non-empty, unique) and templates (at least one, one ``{}`` each); ConfigError."""
    validate_labels(names)
    if not templates:
        raise ConfigError("no prompt templates given")
    for t in templates:
        validate_template(t)


@dataclass(frozen=True)
class LabelSet:
    """The zero-shot classifier: label names, templates and label embeddings.

    Attributes:
        names: C label names, as written to the output.
        templates: prompt templates, each with one ``{}``.
        embeddings: (C, D) float32, L2-normalised rows, prompt-ensembled over ``templates``.
    """

    names: tuple[str, ...]
    templates: tuple[str, ...]
    embeddings: np.ndarray

    def prompts(self) -> list[str]:
        return [t.format(prompt_name(n)) for n in self.names for t in self.templates]


def build_label_set(names: list[str], templates: list[str], model, *, digest: str | None = None) -> LabelSet:
    """Embed every (label, template) prompt with ``model``'s text tower and ensemble them.

    The (C, D) result is cached on disk (``label_cache_dir``), keyed by ``label_cache_key``
    (checkpoint digest, labels, templates, dtype, device kind, text length), so a rerun or a
    relabel with the same set reads it back instead of running the text tower again.

    Args:
        names: C label names (validated: non-empty, unique).
        templates: T templates (validated: one ``{}`` each).
        model: a ``zslabel.model_base.ZeroShotModel`` (``zslabel.model.load_model``).
        digest: the checkpoint's ``model.checkpoint_digest``, which keys the on-disk cache
            (every command that labels passes it); None: no cache, the text tower runs.

    Returns:
        LabelSet with (C, D) float32 L2-normalised embeddings.

    Raises:
        ConfigError: invalid labels/templates; labels read alike by the tokenizer; a prompt
            longer than the text tower's maximum length (the message names the label and template).
    """
    validate_prompts(names, templates)
    # A path label ("animal/mammal/dog") is prompted by its leaf name (hierarchy.prompt_name).
    prompts = [t.format(prompt_name(n)) for n in names for t in templates]
    path = None
    if digest is not None:
        key = label_cache_key(digest, model, names, templates)
        path = label_cache_dir() / f"{key}.npy"
        cached = _read_cached(path, len(names))
        if cached is not None:
            # Written only after these prompts passed the token checks with this checkpoint's
            # tokenizer (its files are in the digest): a rerun of a 21,843 x 80 set skips ~1 min.
            # The checks' warnings were kept beside it.
            log.info("label embeddings for %d labels x %d templates read from %s", len(names), len(templates), path)
            for warning in _read_warnings(path):
                log.warning("%s", warning)
            return LabelSet(tuple(names), tuple(templates), cached)
    warnings = _check_prompt_tokens(names, templates, prompts, model)
    for warning in warnings:
        log.warning("%s", warning)
    emb = model.encode_texts(prompts).reshape(len(names), len(templates), -1)
    label_set = LabelSet(tuple(names), tuple(templates), ensemble(emb))
    if path is not None:
        _write_cached(path, label_set.embeddings, warnings)
    return label_set


_NO_TOKENIZER = "is the tokenizer missing from the checkpoint folder (tokenizer.json / vocab.json)?"
# Prompts tokenized at a time by the checks: bounds the token lists held (a 21,843-label x
# 80-template ensemble is 1.7 M prompts, ~1 GB as Python lists).
TOKEN_CHECK_PROMPTS = 16384


def _check_prompt_tokens(names: list[str], templates: list[str], prompts: list[str], model) -> list[str]:
    """The checks on the prompts' token ids, label by label in chunks (``TOKEN_CHECK_PROMPTS``):
    every prompt fits the text tower; not every prompt, nor every label, reads as the same
    tokens (a missing tokenizer); no two labels read alike (:func:`_refuse_labels_read_alike`). ``prompts`` are
    label-major: label i's are ``[i * T, (i + 1) * T)`` for T templates.

    Returns:
        the warnings to show (labels the tokenizer cannot tell apart), one line each.

    Raises:
        ConfigError: naming the prompt, or the labels.
    """
    per_label, limit = len(templates), model.max_text_length
    step = max(1, TOKEN_CHECK_PROMPTS // per_label) * per_label
    keys: list[bytes] = []  # per label: a digest of its prompts' token ids
    first, all_same = None, True
    for start in range(0, len(prompts), step):
        token_ids = model.prompt_token_ids(prompts[start:start + step])
        first = token_ids[0] if first is None else first
        all_same = all_same and all(ids == first for ids in token_ids)
        for prompt, ids in zip(prompts[start:start + step], token_ids):
            if len(ids) > limit:
                raise ConfigError(f"prompt {prompt!r} is {len(ids)} tokens, longer than the text tower's "
                                  f"maximum of {limit}; shorten that label or template")
        for i in range(0, len(token_ids), per_label):
            h = hashlib.blake2b(digest_size=16)
            for ids in token_ids[i:i + per_label]:
                h.update(len(ids).to_bytes(4, "little") + array("q", ids).tobytes())
            keys.append(h.digest())
    # Labels written two ways first: two labels that differ only in case read alike with CLIP's
    # lower-casing tokenizer, which is no missing tokenizer ("Apple,apple").
    warnings = _refuse_labels_read_alike(names, keys)
    if all_same and len(set(prompts)) > 1:
        raise ConfigError(f"the checkpoint's tokenizer maps every prompt to the same tokens {first}; "
                          f"{_NO_TOKENIZER}")
    return warnings


def _refuse_labels_read_alike(names: list[str], tokens: list[bytes]) -> list[str]:
    """Labels whose prompts are the same tokens for every template (``tokens[i]``: a digest of
    label i's token ids per template) get one label embedding, so softmax splits one score between them
    (each shows half) and a sigmoid reports it twice.

    Refused when their texts are one label written two ways: case (``Red Circle`` and
    ``red circle`` for CLIP's lower-casing tokenizer), Unicode form (NFC and NFD ``café``),
    spaces, or two paths ending in one leaf. Only warned about when the texts differ and the
    tokenizer cannot tell them apart (words outside its vocabulary, all ``[UNK]``): that is the
    checkpoint's limit, and its scores for them carry no information (returned: one warning
    per group).

    Raises:
        ConfigError: naming each group of labels written two ways; or when every label reads
            alike (a checkpoint without its tokenizer files).
    """
    def text(name: str) -> str:
        return " ".join(unicodedata.normalize("NFC", prompt_name(name)).casefold().split())

    groups: dict[bytes, list[str]] = {}
    for name, key in zip(names, tokens):
        groups.setdefault(key, []).append(name)
    twice, unreadable = [], []
    for group in (g for g in groups.values() if len(g) > 1):
        by_text: dict[str, list[str]] = {}
        for name in group:
            by_text.setdefault(text(name), []).append(name)
        twice += [g for g in by_text.values() if len(g) > 1]
        if len(by_text) > 1:
            unreadable.append(group)
    if twice:
        raise ConfigError("labels written two ways (case, Unicode form, spaces, or the same leaf of a path): "
                          + "; ".join(" = ".join(map(repr, g)) for g in twice)
                          + ": the checkpoint's tokenizer reads them alike, so they would share one label "
                          "embedding and split its score; keep one of each")
    if len(unreadable) == 1 and len(unreadable[0]) == len(names):
        # Every label alike though their texts differ (templates of other lengths still differ):
        # what a checkpoint folder without its tokenizer files gives; no score would mean anything.
        raise ConfigError(f"the checkpoint's tokenizer maps every label to the same tokens; {_NO_TOKENIZER}")
    return [f"the checkpoint's tokenizer reads the labels {', '.join(map(repr, group))} as the same tokens (words "
            "outside its vocabulary?): they share one label embedding, and their scores say nothing between them"
            for group in unreadable]


def label_cache_dir() -> Path:
    """Where label embeddings are cached: ``<zslabel cache>/label_embeddings`` (``$ZSLABEL_CACHE``
    or ~/.cache/zslabel; see ``model_base.cache_root``)."""
    from .model_base import cache_root

    return cache_root() / "label_embeddings"


def label_cache_key(digest: str, model, names: list[str], templates: list[str]) -> str:
    """sha256 (hex) of what determines the label embeddings: the checkpoint digest, model type,
    the text tower's dtype, device kind and maximum text length, the labels and the templates,
    in order (the embeddings' row order is the labels' order)."""
    facts = {"v": LABEL_CACHE_VERSION, "digest": digest, "model_type": model.model_type,
             "dtype": str(model.dtype), "device": model.device.type, "max_text_length": model.max_text_length,
             "names": list(names), "templates": list(templates)}
    return hashlib.sha256(json.dumps(facts, ensure_ascii=False).encode()).hexdigest()


def _read_cached(path: Path, rows: int) -> np.ndarray | None:
    """The cached (rows, D) float32 matrix at ``path``, or None (absent, unreadable, wrong shape)."""
    try:
        emb = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if emb.ndim != 2 or emb.shape[0] != rows or emb.dtype != np.float32 or not np.isfinite(emb).all():
        return None
    return emb


def _warnings_path(path: Path) -> Path:
    return path.with_suffix(".warnings.json")


def _read_warnings(path: Path) -> list[str]:
    """The token checks' warnings kept beside the cached matrix ``path`` (none if absent)."""
    try:
        warnings = json.loads(_warnings_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [str(w) for w in warnings] if isinstance(warnings, list) else []


def _write_cached(path: Path, emb: np.ndarray, warnings: Sequence[str] = ()) -> None:
    """Write ``emb`` to ``path`` atomically (temp file + rename), and the token checks'
    ``warnings`` beside it first (the matrix is what a reader looks for); a failure only logs."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if warnings:
            _warnings_path(path).write_text(json.dumps(list(warnings), ensure_ascii=False), encoding="utf-8")
        with open(tmp, "wb") as f:
            np.save(f, emb, allow_pickle=False)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot cache label embeddings at %s: %s", path, exc)
        tmp.unlink(missing_ok=True)


# The ImageNet templates (80) of the CLIP authors, shipped as package data (see its header).
TEMPLATE_SETS["openai-imagenet-80"] = read_lines(
    (LABEL_SETS_DIR / "openai-imagenet-80.txt").read_text(encoding="utf-8"))
