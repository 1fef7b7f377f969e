"""The run fingerprint: a digest of everything that changes output rows, and readable diffs.

Plain values in (a settings dict, the model's facts), never the options object: what a setting
means for results is the options' business (``options.LabelingOptions.result_settings``).
Ray-free.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa

# Fingerprint fields only the loaded model (or a relabel's source manifest) gives; without them
# a record is compared early (``settings_view``).
MODEL_FIELDS = ("preprocess", "output_schema", "source_fingerprint")
MODEL_KEYS = ("digest", "model_type", "score_kind")


def fingerprint_fields(settings: dict[str, Any], *, checkpoint_digest: str, model_type: str, score_kind: str,
                       preprocess: dict | None, schema: pa.Schema) -> dict[str, Any]:
    """Everything that changes output rows, as a JSON-able dict (see :func:`fingerprint_digest`).

    Args:
        settings: the result-changing settings known before the model loads
            (``LabelingOptions.result_settings``: options, ``model`` id/revision, labels,
            templates, calibration/head ids).
        checkpoint_digest: ``model.checkpoint_digest`` of the resolved checkpoint (weights hash).
        model_type, score_kind: from the loaded model ("softmax" or "sigmoid").
        preprocess: ``PreprocessSpec.fingerprint_dict()``; for a relabel, the source run's.
        schema: the output schema (columns and types), so files of one output can be read together.
    """
    fields = json.loads(json.dumps(settings, default=str))
    fields.setdefault("model", {}).update(digest=checkpoint_digest, model_type=model_type, score_kind=score_kind)
    fields.update(preprocess=json.loads(json.dumps(preprocess, default=str)),
                  output_schema=[f"{f.name}: {f.type}" for f in schema])
    return fields


def settings_view(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` without what only the loaded model (or a relabel source) knows
    (``MODEL_FIELDS``, ``MODEL_KEYS``): comparable with the settings known before the model."""
    view = {k: v for k, v in fields.items() if k not in MODEL_FIELDS}
    if isinstance(view.get("model"), dict):
        view["model"] = {k: v for k, v in view["model"].items() if k not in MODEL_KEYS}
    return view


def fingerprint_digest(fields: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``fields`` (sorted keys), first 16 hex digits."""
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_MISSING = object()


def _some(items: list, shown: int = 5) -> str:
    """``'a', 'b', 'c', ... (1,000 in all)``: a 21,843-label change stays one readable line."""
    text = ", ".join(map(repr, items[:shown]))
    return text + (f", ... ({len(items):,} in all)" if len(items) > shown else "")


def describe_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Human lines naming what differs between two fingerprint dicts, e.g.
    ``"labels differ: added 'fox', removed 'bird'"`` or ``"top_k: 5 -> 3"``; nested dicts give
    dotted names (``"model.digest: 'ab..' -> 'cd..'"``). Empty when equal."""
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        if a == b:
            continue
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            lines += describe_changes(a, b, f"{name}.")
        elif isinstance(a, list) and isinstance(b, list):
            added = [x for x in b if x not in a]
            removed = [x for x in a if x not in b]
            parts = ([f"added {_some(added)}"] if added else []) + ([f"removed {_some(removed)}"] if removed else [])
            lines.append(f"{name} differ: " + (", ".join(parts) or
                                               f"same entries, other order: {_some(a)} -> {_some(b)}"))
        else:
            show = lambda v: "(not set)" if v is _MISSING else repr(v)  # noqa: E731
            lines.append(f"{name}: {show(a)} -> {show(b)}")
    return lines
