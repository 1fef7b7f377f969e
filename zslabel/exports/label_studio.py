"""``--format label-studio``: Label Studio tasks with the run's labels as pre-annotations, and the
labeling config that matches them.

Output (``--output TASKS.json``): a JSON array of tasks, one per labeled row, as Label Studio
imports them (Projects > Import, or ``POST /api/projects/{id}/import``)::

    {"data": {"image": "/data/local-files/?d=photos/cat1.jpg",   # the image reference
              "zslabel_path": "/srv/photos/cat1.jpg",             # the row's `path`, for the way back
              "zslabel_input_index": 0,
              "zslabel_labels": ["cat", "dog", "bird"],           # the top-k, best first
              "zslabel_scores": [0.91, 0.06, 0.02]},
     "predictions": [{"model_version": "<the run's id>", "score": 0.91,
                      "result": [{"from_name": "label", "to_name": "image", "type": "choices",
                                  "value": {"choices": ["cat"]}, "score": 0.91}]}]}

The prediction selects the top-1 label (the config's ``Choices`` are single-choice, so one
choice is what a reviewer accepts or corrects); its ``score`` is the top-1 score, which Label
Studio's Data Manager sorts and filters by. The whole top-k with scores is in the task's data
(``zslabel_labels``/``zslabel_scores``, Data Manager columns). Labeled rows with no label at all
(``--multi-label`` with nothing above the threshold) get a prediction with an empty result and
score 0.

Image references: an ``s3://``, ``gs://``, ``azure-blob://``/``az://``, ``http(s)://`` URI is
written as it is (Label Studio's cloud storage resolves s3/gs/azure URIs to signed URLs once the
project has a storage connection for the bucket). A local path becomes a local-files storage URL,
``/data/local-files/?d=<path relative to --image-root>`` (Label Studio serves it when started with
``LOCAL_FILES_SERVING_ENABLED=true`` and ``LOCAL_FILES_DOCUMENT_ROOT`` = ``--image-root``; the
default root ``/`` fits ``LOCAL_FILES_DOCUMENT_ROOT=/``), or ``<--url-prefix><relative path>``
when the images are served over HTTP. Images inside tar shards or Parquet files (``TAR#MEMBER``)
have no URL Label Studio can load; they are left out and counted.

File names that are not UTF-8 (``b'caf\\xe9.png'``, stored as ``caf%E9.png``: see
``storage.display_name``): the file a path names is found as the readers find it
(``storage.open_path``: the literal name when it exists, else the one its ``%XX`` escapes of
bytes >= 0x80 name, else its other Unicode normalisation), and the URL names that file. Label
Studio decodes a local-files ``?d=`` value as UTF-8, so no such URL can name a file whose name
is not UTF-8: those rows are left out, counted, with a warning to rename the files (``convmv``)
and label them again. With ``--url-prefix`` the name's bytes are percent-encoded as they are
(``caf%E9.png``), which a web server serving the folder maps back to the file. A path whose
file exists under neither name here (the export runs elsewhere) is written as it reads.

Order: ``input`` (by ``input_index``, the default) or ``uncertainty``: least sure first, by the
margin top-1 score minus top-2 score (a row with one label: its top-1 score; ties by
``input_index``); ``--limit N`` keeps the first N. Rows stream through in record batches; each
task is serialised once into a temporary spool file on local disk, and only a sort key, the
input index, an offset and a length per row (32 bytes) stay in memory, then the tasks are copied
to the output in order: a million-row run exports in ~32 MB plus one batch.

Labeling config (``--label-config-output``, default ``TASKS.label_config.xml`` beside the tasks):
``<View><Image name="image" value="$image"/><Choices name="label" toName="image"
choice="single" showInline="true"><Choice value="..."/>...</Choices></View>`` with every label of
the run. ``--label-config FILE`` uses an existing project's config instead: its ``Choices``
(the one whose ``toName`` is an ``Image``) must offer every label of the run, or the export is
refused (predictions naming a choice the project lacks would show nothing); predictions then use
its control names and image variable. Choices beyond the run's labels (``other``) are allowed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from urllib.parse import quote, quote_from_bytes

import fsspec
import numpy as np

from ..errors import ConfigError, InputError
from ..output import ERROR, INPUT_INDEX, LABELS, PATH, SCORES
from ..storage import open_path
from ..store import open_atomic, output_filesystem
from .common import ExportResult, check_free, open_run

log = logging.getLogger(__name__)

NAME = "label-studio"
LOCAL_FILES_URL = "/data/local-files/?d="
# Written as they are: Label Studio resolves these through a cloud storage connection or loads them.
REMOTE_PREFIXES = ("s3://", "gs://", "azure-blob://", "az://", "abfs://", "http://", "https://")
# A row inside a container file: "<shard>.tar#member", "<file>.parquet#17", "<file>.arrow#17".
CONTAINER_MEMBER = re.compile(r"\.(tar|tgz|tar\.gz|parquet|arrow)#", re.IGNORECASE)
ORDERS = ("input", "uncertainty")
DATA_PATH = "zslabel_path"          # task data key holding the row's path (read back by evaluate)
DATA_INDEX = "zslabel_input_index"
DATA_LABELS = "zslabel_labels"
DATA_SCORES = "zslabel_scores"
NOT_UTF8 = "file name not UTF-8 (no local-files URL)"
RENAME_HINT = ("Label Studio reads a local-files URL as UTF-8, so it cannot name these files: rename them to "
               "UTF-8 (e.g. `convmv -f latin1 -t utf8 -r --notest FOLDER`), label them again and export")


class NotUtf8Name(ValueError):
    """A local file whose name is not UTF-8: no local-files URL can name it."""


@dataclass(frozen=True)
class LabelConfig:
    """The parts of a Label Studio labeling config the tasks must agree with.

    Attributes:
        xml: the config text. choices_name: the ``Choices`` control's ``name`` (predictions'
        ``from_name``). image_name: the ``Image`` object's ``name`` (``to_name``).
        image_key: the task data key the image reads (``value="$image"`` -> ``image``).
        choices: the choice values offered, in config order.
    """

    xml: str
    choices_name: str
    image_name: str
    image_key: str
    choices: tuple[str, ...]


def generated_config(labels: list[str]) -> LabelConfig:
    """The labeling config for ``labels``: one image, one single-choice ``Choices`` over all labels."""
    view = ET.Element("View")
    ET.SubElement(view, "Image", name="image", value="$image")
    choices = ET.SubElement(view, "Choices", name="label", toName="image", choice="single", showInline="true")
    for label in labels:
        ET.SubElement(choices, "Choice", value=label)
    ET.indent(view)
    return LabelConfig(ET.tostring(view, encoding="unicode") + "\n", "label", "image", "image", tuple(labels))


def parse_config(xml: str, source: str = "labeling config") -> LabelConfig:
    """Find the image and the choices of a Label Studio labeling config.

    Raises:
        ConfigError: not XML, no ``Image`` with a ``$variable`` value, or no ``Choices`` whose
            ``toName`` names that image (several: ambiguous).
    """
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise ConfigError(f"{source} is not XML: {exc}") from exc
    images = {el.get("name"): el.get("value", "") for el in root.iter("Image") if el.get("name")}
    controls = [el for el in root.iter("Choices") if el.get("toName") in images]
    if not images:
        raise ConfigError(f"{source} has no <Image name=... value=\"$...\"/> object")
    if len(controls) != 1:
        raise ConfigError(f"{source} needs exactly one <Choices> whose toName is an <Image>; it has {len(controls)}")
    control = controls[0]
    value = images[control.get("toName")]
    if not value.startswith("$") or len(value) < 2:
        raise ConfigError(f"{source}: the <Image> {control.get('toName')!r} reads {value!r}, not a task data "
                          "variable like \"$image\"")
    choices = tuple(c.get("value", c.get("alias", "")) for c in control.iter("Choice"))
    return LabelConfig(xml, control.get("name", ""), control.get("toName", ""), value[1:], choices)


def check_config_matches(config: LabelConfig, labels: list[str], source: str) -> list[str]:
    """Refuse a config that cannot show the run's predictions.

    Returns:
        The config's choices that are not labels of the run (allowed: e.g. ``other``).

    Raises:
        ConfigError: labels of the run that are not choices of the config (named, up to 10).
    """
    offered = set(config.choices)
    missing = [x for x in labels if x not in offered]
    if missing:
        raise ConfigError(f"{source} does not match the run: {len(missing)} of its {len(labels)} labels are not "
                          f"choices of <Choices name={config.choices_name!r}>: {missing[:10]}. Export without "
                          "--label-config to get a matching config, or add these choices to the project")
    return [c for c in config.choices if c not in set(labels)]


class ImageRefs:
    """Maps a row's ``path`` to the reference Label Studio loads (see the module docstring).

    Args:
        image_root: local folder that ``LOCAL_FILES_DOCUMENT_ROOT`` (or ``url_prefix``) serves.
        url_prefix: when set, local paths become ``url_prefix + quoted relative path``.
    """

    def __init__(self, image_root: str = "/", url_prefix: str | None = None):
        self.root = os.path.normpath(os.path.abspath(os.path.expanduser(image_root)))
        self.url_prefix = url_prefix
        self._local = fsspec.filesystem("file")

    def __call__(self, path: str) -> str | None:
        """The reference for ``path``; None for a member of a tar or Parquet file (no URL).

        A local path names the file ``storage.open_path`` finds for it (its ``%XX`` escapes of
        undecodable name bytes, or its other Unicode normalisation, when the literal name does
        not exist).

        Raises:
            InputError: a local path outside ``image_root`` (Label Studio would refuse to serve it).
            NotUtf8Name: the file's name is not UTF-8 and no ``url_prefix`` is set.
        """
        if path.startswith(REMOTE_PREFIXES):
            return path
        if CONTAINER_MEMBER.search(path):
            return None
        local = path[len("file://"):] if path.startswith("file://") else path
        if "://" in local:
            return path  # another fsspec protocol: the URI is the only name it has
        local = open_path(self._local, os.path.normpath(os.path.abspath(local)))
        rel = os.path.relpath(local, self.root)
        if rel == os.pardir or rel.startswith(os.pardir + os.sep):
            raise InputError(f"{path} is not under --image-root {self.root}: set --image-root to the folder "
                             "Label Studio serves (its LOCAL_FILES_DOCUMENT_ROOT) or an ancestor of the images")
        rel = rel.replace(os.sep, "/")
        try:
            rel.encode("utf-8")
        except UnicodeEncodeError:  # undecodable name bytes, as surrogates
            if self.url_prefix is None:
                raise NotUtf8Name(path) from None
            return self.url_prefix + quote_from_bytes(os.fsencode(rel), safe="/")
        # Query values are percent-decoded by the server: quote everything but "/" so names with
        # spaces, '&', '#' or '%' survive.
        quoted = quote(rel, safe="/")
        return (self.url_prefix + quoted) if self.url_prefix is not None else LOCAL_FILES_URL + quoted


def path_from_reference(ref: str) -> str:
    """Best-effort inverse of :class:`ImageRefs` for tasks without ``zslabel_path``: a local-files
    URL gives ``/<d>`` (exact when ``--image-root`` was ``/``; otherwise the file name still
    matches), any other reference is returned as it is."""
    from urllib.parse import parse_qs, urlsplit

    if "/data/local-files/" in ref:
        d = parse_qs(urlsplit(ref).query).get("d")
        if d:
            return "/" + d[0].lstrip("/")
    return ref


def margin(scores: list[float] | None) -> float:
    """Uncertainty sort key: top-1 minus top-2 score (a single score: itself; none: 0), rounded
    to 6 decimals as the tasks show the scores, so equal-looking margins tie (and then keep input
    order) instead of being ordered by float32 rounding noise."""
    if not scores:
        return 0.0
    return round(float(scores[0]) - (float(scores[1]) if len(scores) > 1 else 0.0), 6)


def task(row_path: str, index: int, ref: str, labels: list[str], scores: list[float], config: LabelConfig,
         model_version: str) -> dict:
    """One Label Studio task with its prediction (see the module docstring for the shape)."""
    scores = [round(float(s), 6) for s in scores]
    top = scores[0] if scores else 0.0
    result = ([{"from_name": config.choices_name, "to_name": config.image_name, "type": "choices",
                "value": {"choices": [labels[0]]}, "score": top}] if labels else [])
    return {"data": {config.image_key: ref, DATA_PATH: row_path, DATA_INDEX: index,
                     DATA_LABELS: list(labels), DATA_SCORES: scores},
            "predictions": [{"model_version": model_version, "score": top, "result": result}]}


def export_label_studio(source: str, output: str, *, image_root: str = "/", url_prefix: str | None = None,
                        order: str = "input", limit: int | None = None, label_config: str | None = None,
                        label_config_output: str | None = None, overwrite: bool = False,
                        storage_options: dict | None = None) -> ExportResult:
    """Write Label Studio tasks (and the matching labeling config) for a finished run.

    Args:
        source: output folder of ``zslabel label``/``relabel``.
        output: tasks JSON to write (local path or fsspec URI).
        image_root, url_prefix: how local paths become references (:class:`ImageRefs`).
        order: ``"input"`` or ``"uncertainty"`` (least sure first). limit: keep the first N.
        label_config: an existing Label Studio config (XML file) to match instead of generating one.
        label_config_output: where the config goes (default ``<output stem>.label_config.xml``).
        overwrite: replace existing files.

    Returns:
        The counts; ``left_out`` has ``error`` rows, ``in a container`` rows (tar/Parquet
        members), rows whose file name is not UTF-8 (local-files URLs only; warned about) and
        rows cut by ``limit``.

    Raises:
        InputError: not a finished run, unreadable files, a local path outside ``image_root``.
        ConfigError: bad order/limit, a label config that is not XML or lacks a run label.
        OutputError: an output file exists and ``overwrite`` is False.
    """
    started = time.perf_counter()
    if order not in ORDERS:
        raise ConfigError(f"--order must be one of {', '.join(ORDERS)}, not {order!r}")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be at least 1, not {limit}")
    run = open_run(source, storage_options)
    labels = run.labels
    if not labels:
        raise InputError(f"the run manifest of {source} lists no labels")
    notes = []
    if label_config:
        fs, path = output_filesystem(label_config, storage_options)
        try:
            with fs.open(path, "r", encoding="utf-8") as fh:
                config = parse_config(fh.read(), label_config)
        except FileNotFoundError as exc:
            raise ConfigError(f"label config {label_config} does not exist") from exc
        extra = check_config_matches(config, labels, label_config)
        if extra:
            notes.append(f"choices of {label_config} that are not labels of the run: {extra[:10]}")
    else:
        config = generated_config(labels)
    config_out = label_config_output or _config_path(output)
    check_free(output, overwrite, storage_options, "tasks file")
    check_free(config_out, overwrite, storage_options, "label config")
    refs = ImageRefs(image_root, url_prefix)

    columns = [PATH, LABELS, SCORES, ERROR] + ([INPUT_INDEX] if run.has(INPUT_INDEX) else [])
    # Per kept row: sort key, tie-break (input_index), offset and length of its task in the spool.
    parts: list[np.ndarray] = []
    left_out = {"error rows": 0, "in a tar, Parquet or Arrow file (no URL)": 0, NOT_UTF8: 0, "beyond --limit": 0}
    not_utf8: list[str] = []
    source_rows = 0
    with tempfile.TemporaryFile(prefix="zslabel-ls-") as spool:
        for batch in run.batches(columns):
            d = batch.to_pydict()
            idx = d.get(INPUT_INDEX) or range(source_rows, source_rows + batch.num_rows)
            rec = np.empty((batch.num_rows, 4), np.float64)
            kept = 0
            for p, labs, scs, err, i in zip(d[PATH], d[LABELS], d[SCORES], d[ERROR], idx):
                if err is not None:
                    left_out["error rows"] += 1
                    continue
                try:
                    ref = refs(p)
                except NotUtf8Name:
                    left_out[NOT_UTF8] += 1
                    not_utf8 += [p] if len(not_utf8) < 3 else []
                    continue
                if ref is None:
                    left_out["in a tar, Parquet or Arrow file (no URL)"] += 1
                    continue
                data = json.dumps(task(p, int(i), ref, labs or [], scs or [], config, run.run_id),
                                  ensure_ascii=False).encode("utf-8")
                # float64 holds offsets and indices exactly up to 2**53
                rec[kept] = (margin(scs) if order == "uncertainty" else 0.0, i, spool.tell(), len(data))
                spool.write(data)
                kept += 1
            parts.append(rec[:kept])
            source_rows += batch.num_rows
        spool.flush()
        rec = np.concatenate(parts) if parts else np.empty((0, 4))
        sequence = np.lexsort((rec[:, 1], rec[:, 0]))  # by key, then input_index
        if limit is not None and len(sequence) > limit:
            left_out["beyond --limit"] = len(sequence) - limit
            sequence = sequence[:limit]
        fs, path = output_filesystem(output, storage_options)
        with open_atomic(fs, path) as out:
            out.write(b"[")
            for n, j in enumerate(sequence):
                spool.seek(int(rec[j, 2]))
                out.write((b",\n" if n else b"\n") + spool.read(int(rec[j, 3])))
            out.write(b"\n]\n")
    cfs, cpath = output_filesystem(config_out, storage_options)
    with open_atomic(cfs, cpath) as out:
        out.write(config.xml.encode("utf-8"))
    if not_utf8:
        log.warning("%d rows left out: their files' names are not UTF-8 (e.g. %s). %s", left_out[NOT_UTF8],
                    ", ".join(not_utf8), RENAME_HINT)
    if order == "uncertainty":
        notes.append("least sure first (top-1 minus top-2 score)")
    notes.append(f"model_version {run.run_id}")
    return ExportResult(NAME, [output, config_out], len(sequence), source_rows, left_out, notes,
                        time.perf_counter() - started)


def _config_path(output: str) -> str:
    stem = output[:-len(".json")] if output.lower().endswith(".json") else output
    return stem + ".label_config.xml"


# --- command line -------------------------------------------------------------------------------

def add_arguments(group: argparse._ArgumentGroup) -> None:
    """This format's flags (their dests are checked against ``--format`` by the CLI)."""
    group.add_argument("--image-root", help="local folder Label Studio serves (its LOCAL_FILES_DOCUMENT_ROOT); "
                       "local paths become /data/local-files/?d=<path relative to it> (default /)")
    group.add_argument("--url-prefix", help="instead of local-files URLs: <prefix><path relative to --image-root>, "
                       "for images served over HTTP")
    group.add_argument("--order", choices=ORDERS, help="task order: input (default) or uncertainty "
                       "(smallest top-1 minus top-2 score first)")
    group.add_argument("--limit", type=int, help="export only the first N tasks of --order")
    group.add_argument("--label-config", help="an existing project's labeling config (XML) to match: "
                       "refused when its choices lack a label of the run")
    group.add_argument("--label-config-output", help="where to write the labeling config "
                       "(default: TASKS.label_config.xml beside --output)")


def run(args: argparse.Namespace) -> ExportResult:
    """``zslabel export --format label-studio`` from parsed flags."""
    return export_label_studio(args.source, args.output, image_root=args.image_root or "/",
                               url_prefix=args.url_prefix, order=args.order or "input", limit=args.limit,
                               label_config=args.label_config, label_config_output=args.label_config_output,
                               overwrite=args.overwrite, storage_options=args.storage_options or {})
