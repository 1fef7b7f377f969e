"""The Ray Data stages: a decode task function and the labeler actor class.

Both take and return whole batches and never raise for one bad image: a per-image problem
becomes that row's ``error``. Only uint8 pixels at model resolution leave the decode stage.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from .decode import DEFAULT_DECODE_TIMEOUT, PreprocessSpec, decode_image
from .errors import INTERNAL_ERROR, error_string
from .io_policy import IOPolicy
from .output import result_table
from .ranking import RankingRule
from .scoring import ZeroShotClassifier, score_rows
from .sources.fetch import PendingFetch, start_fetch

if TYPE_CHECKING:
    from .calibration import Calibration
    from .heads import Head
    from .hierarchy import Hierarchy

log = logging.getLogger(__name__)

# Columns produced by the decode stage besides the carried ones.
DECODED_COLUMNS = ("path", "input_index", "pixels", "error", "width", "height")

# Test-only: rows whose path contains this value raise inside the per-row guard, so the tests
# can prove that a bug costs one row (``internal_error``), not the job. Unset in production.
FAIL_DECODE_ENV = "ZSLABEL_TEST_FAIL_DECODE"


def _to_fetch(batch: dict[str, np.ndarray]) -> list[int]:
    """Rows of ``batch`` whose bytes must be fetched: no ``data`` and no source ``read_error``."""
    data_col, read_errors = batch.get("data"), batch.get("read_error")
    return [i for i in range(len(batch["path"]))
            if (data_col is None or data_col[i] is None)
            and not (read_errors is not None and isinstance(read_errors[i], str) and read_errors[i])]


def _start_batch_fetch(batch: dict[str, np.ndarray], storage_options: dict | None,
                       io: IOPolicy | None) -> tuple[list[int], PendingFetch]:
    rows = _to_fetch(batch)
    return rows, start_fetch([str(batch["path"][i]) for i in rows], storage_options, io)


def decode_batch(batch: dict[str, np.ndarray], spec: PreprocessSpec,
                 storage_options: dict | None = None, io: IOPolicy | None = None,
                 decode_timeout: float | None = DEFAULT_DECODE_TIMEOUT,
                 fetching: tuple[list[int], PendingFetch] | None = None) -> dict[str, np.ndarray]:
    """Fetch (when ``data`` is null) and decode each row of a batch.

    The rows to fetch are read concurrently, each within ``io``'s time limits and retries
    (``fetch.start_fetch``); then each row is decoded in turn, each within
    ``decode_timeout`` seconds (``decode.decode_image``).

    Args:
        batch: ``path`` (N,) str, ``input_index`` (N,) int64, optional ``data`` (N,) bytes or
            None, optional ``read_error`` (N,) str or None (set by the source), and carried
            string columns.
        spec: target geometry; every output image is ``spec.output_hw``.
        storage_options: fsspec options for fetching paths.
        io: connect/read timeout and retries for fetching (default ``io_policy.IOPolicy()``).
        decode_timeout: seconds per image (None: no limit); a late image is ``decode_timeout``.
        fetching: a fetch of this batch's rows already started by ``decode_block`` (so the next
            batch downloads while this one decodes); None starts one here.

    Returns:
        The carried columns plus ``pixels`` (N, H, W, 3) uint8 (zeros on error rows), ``error``
        (N,) str (``""`` or ``"code: detail"``), ``width``/``height`` (N,) int32 (-1 when
        never decoded). The raw bytes are dropped here so they never reach the actors.
        Never raises for one row: an unexpected exception while fetching or decoding a row
        (a bug) becomes that row's ``internal_error``, with the traceback in the worker log.
    """
    n = len(batch["path"])
    h, w = spec.output_hw
    pixels = np.zeros((n, h, w, 3), np.uint8)
    # "" (not None) marks success between stages: an all-None column would become Arrow's null
    # type and come back as NaN, indistinguishable from a missing value.
    errors = np.full(n, "", object)
    widths = np.full(n, -1, np.int32)
    heights = np.full(n, -1, np.int32)
    data_col = batch.get("data")
    read_errors = batch.get("read_error")
    fail_on = os.environ.get(FAIL_DECODE_ENV) or None
    rows, pending = fetching if fetching is not None else _start_batch_fetch(batch, storage_options, io)
    fetched = dict(zip(rows, pending.result()))
    for i in range(n):
        if read_errors is not None and isinstance(read_errors[i], str) and read_errors[i]:
            errors[i] = read_errors[i]  # the source could not read this input (e.g. a corrupt tar)
            continue
        path = str(batch["path"][i])
        try:
            if fail_on is not None and fail_on in path:
                raise RuntimeError(f"failure injected by {FAIL_DECODE_ENV}")
            data = None if data_col is None else data_col[i]
            if data is None:
                data, err = fetched[i]
                if err is not None:
                    errors[i] = err
                    continue
                assert data is not None  # a fetch returns its bytes or an error
            result = decode_image(bytes(data), spec, timeout=decode_timeout)
            errors[i] = result.error or ""
            if result.width is not None and result.height is not None:  # both or neither
                widths[i], heights[i] = result.width, result.height
            if result.pixels is not None:
                pixels[i] = result.pixels
        except Exception as exc:  # noqa: BLE001 - a bug costs this input, not the job
            log.exception("internal error on input %s", path)
            errors[i] = error_string(INTERNAL_ERROR, f"{type(exc).__name__}: {exc} (traceback in the worker log)")
            widths[i] = heights[i] = -1
            pixels[i] = 0
    out = {k: v for k, v in batch.items() if k not in ("data", "read_error")}
    out.update(pixels=pixels, error=errors, width=widths, height=heights)
    return out


def decode_block(block: dict[str, np.ndarray], spec: PreprocessSpec, storage_options: dict | None = None,
                 batch_size: int = 64, io: IOPolicy | None = None,
                 decode_timeout: float | None = DEFAULT_DECODE_TIMEOUT) -> Iterator[dict[str, np.ndarray]]:
    """The decode stage: one whole input block in, its rows decoded ``batch_size`` at a time out
    (``decode_batch`` on each slice). The inputs of the next slice are fetched while this one
    decodes (one slice ahead: at most ``2 * batch_size`` fetched files in memory). Ray Data's
    output block shaping joins the slices into blocks of at most
    ``DataContext.target_max_block_size`` (128 MiB), which bounds a task's decoded pixels
    however large the input block (a 1,024-row input block at 32 x 32 model resolution reaches
    the labeler whole; at 224 x 224 it leaves as blocks of ~890 rows).

    Ray Data fuses the read of a block into this stage only because it takes whole blocks (a
    stage with a batch size is never fused with a read); read, fetch and decode of a block then
    run as one task (``pipeline.run_label_job``).
    """
    n = len(block["path"])
    slices = [{k: v[start:start + batch_size] for k, v in block.items()} for start in range(0, n, batch_size)]
    pending = _start_batch_fetch(slices[0], storage_options, io) if slices else None
    for k, batch in enumerate(slices):
        current = pending
        pending = _start_batch_fetch(slices[k + 1], storage_options, io) if k + 1 < len(slices) else None
        yield decode_batch(batch, spec, storage_options, io=io, decode_timeout=decode_timeout, fetching=current)


def actor_threads(fallback: int) -> int:
    """torch intra-op threads for a CPU labeler actor: the CPUs Ray assigned to it, rounded up.

    Rounded up so that an actor holding 1.5 CPUs (a 2-core machine leaving 0.5 for decoding)
    runs 2 threads: decoding is a small share of the work and fills the gaps, while 1 thread
    would leave a core idle (benchmarks/README.md). ``fallback`` when Ray reports no CPUs.
    """
    import ray

    try:
        cpus = float(ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0))
    except Exception:  # noqa: BLE001 - outside an actor (tests calling the class directly)
        cpus = 0.0
    return max(1, math.ceil(cpus - 1e-6) if cpus > 0 else int(fallback))


@dataclass
class LabelerSettings:
    """What a labeler actor needs besides the label embeddings (all picklable, no secrets logged).

    ``dtype`` "auto" means float16 on CUDA and float32 on CPU; ``num_threads`` is the torch
    intra-op thread count (the CPUs the actor holds, so actors and decode tasks do not
    oversubscribe cores).
    """

    model: str
    revision: str | None
    storage_options: dict[str, Any]
    schema: pa.Schema
    top_k: int
    # The driver's resolved checkpoint folder and its digest: each actor loads those weights or
    # refuses (``model.labeler_checkpoint``).
    checkpoint: str = ""
    digest: str = ""
    dtype: str = "auto"
    num_threads: int = 1
    store_embeddings: bool = False
    spec_overrides: dict[str, Any] = field(default_factory=dict)
    # Multi-label / abstention rule (``ranking.RankingRule``); None keeps plain top-k.
    ranking: RankingRule | None = None
    # ``calibration.Calibration`` applied to the logits, and ``hierarchy.Hierarchy`` for the
    # hier_* columns (needs ``ranking.min_score``); None for neither.
    calibration: Calibration | None = None
    hierarchy: Hierarchy | None = None
    # ``heads.Head`` whose logits replace the zero-shot ones (moved to the actor's device once)
    head: Head | None = None


def _none_where_negative(values: np.ndarray) -> np.ndarray:
    """``values`` as an object array with None where negative (-1: never decoded), a null in the output."""
    out = values.astype(object)
    out[values < 0] = None
    return out


class Labeler:
    """Ray Data callable class: holds the image tower and the (C, D) label embeddings.

    Constructed once per actor: resolves the checkpoint (cached once per node), loads it on the
    device the actor landed on (CUDA when Ray assigned it a GPU, else CPU), and fetches the
    label embeddings from the object store by reference. Each call labels one batch.
    """

    def __init__(self, settings: LabelerSettings, label_refs: list, label_names: list[str]):
        import ray
        import torch

        from .errors import ModelLoadError
        from .model import labeler_checkpoint, load_model, resolve_checkpoint

        self.settings = settings
        gpu_ids = ray.get_gpu_ids()
        if gpu_ids and not torch.cuda.is_available():
            # Ray gave this actor a GPU the installed torch cannot use (a CPU-only build, or a
            # driver mismatch): labeling on the CPU instead would be silently 10-100x slower.
            raise ModelLoadError(f"this labeler actor holds GPU(s) {gpu_ids} but torch {torch.__version__} "
                                 "cannot use CUDA on node " + ray.get_runtime_context().get_node_id()
                                 + "; install a CUDA build of torch there, or run with --num-gpus-per-actor 0")
        use_cuda = torch.cuda.is_available() and len(gpu_ids) > 0
        device = "cuda" if use_cuda else "cpu"
        dtype = {"auto": torch.float16 if use_cuda else torch.float32, "float32": torch.float32,
                 "float16": torch.float16, "bfloat16": torch.bfloat16}[settings.dtype]
        if not use_cuda:
            torch.set_num_threads(actor_threads(settings.num_threads))
        if settings.digest:
            path = labeler_checkpoint(settings.model, settings.checkpoint, settings.digest, settings.revision,
                                      settings.storage_options)
        else:
            path = resolve_checkpoint(settings.model, settings.revision, settings.storage_options)
        self.model = load_model(path, device=device, dtype=dtype, **settings.spec_overrides)
        self.classifier = ZeroShotClassifier(
            label_embeddings=torch.from_numpy(np.array(ray.get(label_refs[0]))).to(device),
            label_names=np.asarray(label_names, dtype=object), logit_scale=self.model.logit_scale,
            logit_bias=self.model.logit_bias, score_kind=self.model.score_kind,
            rule=settings.ranking or RankingRule(top_k=settings.top_k), calibration=settings.calibration,
            hierarchy=settings.hierarchy, head=settings.head)
        log.info("labeler ready on %s (%s, %d torch threads), %d labels", device, dtype,
                 torch.get_num_threads(), len(label_names))

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """Label the decoded rows of ``batch`` (see ``decode_batch``); returns output rows."""
        scored = score_rows(self.classifier, batch["error"],
                            lambda rows: self.model.encode_images(batch["pixels"][rows]))
        columns: dict[str, Any] = dict(batch)  # arrays, and the hierarchy columns' lists
        columns["error"] = scored.errors
        columns["width"] = _none_where_negative(batch["width"])
        columns["height"] = _none_where_negative(batch["height"])
        columns.update(scored.hierarchy_columns)
        ranked = scored.ranked
        emb_out = None
        if self.settings.store_embeddings and scored.embeddings is not None:
            emb_out = scored.embeddings.float().cpu().numpy()
        return result_table(self.settings.schema, columns, self.classifier.label_names,
                            None if ranked is None else ranked.indices, None if ranked is None else ranked.scores,
                            scored.ok, emb_out, counts=None if ranked is None else ranked.counts,
                            abstained=None if ranked is None else ranked.abstained)
