"""Label sets: candidate label names, prompt templates, and their (C, D) label embeddings.

The label embeddings are the zero-shot classifier's weight matrix, built once per job from the
text tower (open_clip ``build_zero_shot_classifier``; CLIP paper, section 3.1.4): for each label,
embed every templated prompt, L2-normalise each, average over templates, L2-normalise again.
With a single template this is exactly the normalised text embedding the reference pipeline uses.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError
from .textfiles import read_lines, read_text
from .hierarchy import SEPARATOR, prompt_name

DEFAULT_TEMPLATE = "This is a photo of {}."

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
    """Raise ConfigError unless ``template`` has exactly one empty ``{}`` field."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ConfigError(f"template {template!r} is not a valid format string: {exc}") from exc
    if fields != [""]:
        raise ConfigError(f"template {template!r} must contain exactly one '{{}}' field (found {len(fields)})")


def merge_labels_file(labels: list[str], labels_file: str | None) -> list[str]:
    """``labels`` followed by the lines of ``labels_file`` (if given).

    Raises:
        ConfigError: the file cannot be read, or is not UTF-8 (see ``textfiles.decode_text``).
    """
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


def build_label_set(names: list[str], templates: list[str], model) -> LabelSet:
    """Embed every (label, template) prompt with ``model``'s text tower and ensemble them.

    Args:
        names: C label names (validated: non-empty, unique).
        templates: T templates (validated: one ``{}`` each).
        model: a ``zslabel.model.ZeroShotModel``.

    Returns:
        LabelSet with (C, D) float32 L2-normalised embeddings.

    Raises:
        ConfigError: invalid labels/templates, or a prompt longer than the text tower's maximum
            length (the message names the label and template).
    """
    validate_prompts(names, templates)
    # A path label ("animal/mammal/dog") is prompted by its leaf name (hierarchy.prompt_name).
    prompts = [t.format(prompt_name(n)) for n in names for t in templates]
    token_ids = model.prompt_token_ids(prompts)
    if len(set(prompts)) > 1 and len(set(map(tuple, token_ids))) == 1:
        raise ConfigError(f"the checkpoint's tokenizer maps every prompt to the same tokens {token_ids[0]}; "
                          "is the tokenizer missing from the checkpoint folder (tokenizer.json / vocab.json)?")
    limit = model.max_text_length
    for prompt, length in zip(prompts, map(len, token_ids)):
        if length > limit:
            raise ConfigError(f"prompt {prompt!r} is {length} tokens, longer than the text tower's "
                              f"maximum of {limit}; shorten that label or template")
    emb = model.encode_texts(prompts).reshape(len(names), len(templates), -1)
    return LabelSet(tuple(names), tuple(templates), ensemble(emb))


def ensemble(template_embeddings: np.ndarray) -> np.ndarray:
    """(C, T, D) L2-normalised prompt embeddings -> (C, D) float32: mean over T, renormalised."""
    mean = template_embeddings.astype(np.float32).mean(axis=1)
    return (mean / np.linalg.norm(mean, axis=-1, keepdims=True)).astype(np.float32)
