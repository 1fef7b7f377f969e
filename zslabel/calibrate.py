"""``zslabel calibrate``: fit a calibration file from a labeling run's output and ground truth.

    run output (+ run manifest) --match paths (evaluate.match_ground_truth)--> labeled sample
      -> logits (N, C): exact from stored embeddings, else reconstructed from written scores
      -> calibration.fit_calibration (fit split / held-out split) -> calibration JSON

Logits from embeddings: the run's checkpoint (its digest checked as ``relabel`` does) embeds the
run's labels and templates (``labels.build_label_set``), and ``ranking.zero_shot_logits`` of the
stored, renormalised image embeddings gives the logits a full run computes (``relabel``'s
reading code: ``store.output_parquet_files``, ``relabel.embedding_matrix``).

Logits from scores (outputs without ``embedding``): softmax scores give logits up to a per-row
constant, ``log(score)``, which is all temperature scaling needs; sigmoid scores give them
exactly, ``log(s / (1 - s))``. Labels missing from a row's top-k are unknown: softmax rows give
each the row's remaining mass split evenly, ``(1 - sum(top-k)) / (C - k)``; sigmoid rows give
each the row's lowest written score. Exact when the run wrote all labels (``--top-k`` >= C),
an approximation otherwise (the file's ``fit.scores_complete`` says which); store embeddings for
an exact fit.

No Ray: the sample is small (a few hundred to a few thousand images).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from .calibration import Calibration, check_holdout, fit_calibration
from .errors import ConfigError, InputError
from .evaluate import _basename, as_candidates, label_key, load_ground_truth, match_ground_truth, normalise_path
from .hierarchy import prompt_name
from .store import footer_checked_batches, output_parquet_files, read_manifest, refuse_inside_output

log = logging.getLogger(__name__)
# Score clip before log/logit: float32 scores of 0 or 1 must not become infinite logits.
EPS = 1e-7


@dataclass
class Sample:
    """The labeled sample of a run.

    Attributes:
        paths: (N,) normalised paths. y: (N,) int64 true label index.
        embeddings: (N, D) float32 renormalised embeddings, or None (then ``scores`` is set).
        top_labels / top_scores: per row, the written labels and scores (when no embeddings).
        counts: matching facts for the calibration file.
    """

    paths: list[str]
    y: np.ndarray
    embeddings: np.ndarray | None
    top_labels: list[list[str]] | None
    top_scores: list[list[float]] | None
    counts: dict


def label_index(labels: list[str]) -> dict[str, int]:
    """Ground-truth label text -> label index: a label's full name, and also its leaf name
    (``hierarchy.prompt_name``) when that leaf is unique, so ground truth written ``"dog"``
    matches a run label ``"animal/mammal/dog"``; keys compared as ``evaluate.label_key``.
    Ground-truth text that is no key but equals one after case folding is mapped to it by
    ``evaluate.as_candidates`` (as ``eval`` does) before it is looked up here."""
    index = {label_key(name): i for i, name in enumerate(labels)}
    leaves: dict[str, list[int]] = {}
    for i, name in enumerate(labels):
        leaves.setdefault(label_key(prompt_name(name)), []).append(i)
    for leaf, where in leaves.items():
        if len(where) == 1 and leaf not in index:
            index[leaf] = where[0]
    return index


def read_sample(output: str, ground_truth: str, storage_options: dict | None = None) -> tuple[Sample, dict]:
    """Rows of ``output`` that match ``ground_truth``, labeled and with a candidate true label.

    Returns:
        ``(Sample, run manifest)``.

    Raises:
        InputError: no run manifest (its model, labels and templates are needed), no Parquet
            files, no ``embedding`` and no ``scores`` column, or no labeled row matching the
            ground truth with a true label among the run's labels.
    """
    from .relabel import embedding_matrix

    fs, files, root = output_parquet_files(output, storage_options)
    manifest = read_manifest(root, storage_options)
    if manifest is None or not manifest.get("labels") or not manifest.get("model"):
        raise InputError(f"{output} has no run manifest with model and labels (_run_manifest.json); "
                         "calibrate needs the output folder of a finished `zslabel label` or `relabel` run")
    labels = list(manifest["labels"])
    gt = load_ground_truth(ground_truth, storage_options)
    wanted_paths, wanted_names = set(gt.paths), {_basename(p) for p in gt.paths}

    rows: dict[str, tuple] = {}
    examples: list[str] = []
    use_embeddings = None
    for f in files:
        with fs.open(f, "rb") as fh:
            reader = pq.ParquetFile(fh)
            names = reader.schema_arrow.names
            if use_embeddings is None:
                use_embeddings = "embedding" in names
                if not use_embeddings and "scores" not in names:
                    raise InputError(f"{output} has neither an 'embedding' nor a 'scores' column; "
                                     "calibrate needs a zslabel output (best made with --store-embeddings)")
            cols = ["path", "error"] + (["embedding"] if use_embeddings else ["labels", "scores"])
            missing = [c for c in cols if c not in names]
            if missing:
                raise InputError(f"{f} lacks column(s) {', '.join(missing)}")
            for batch in footer_checked_batches(reader, f, columns=cols):
                paths = [normalise_path(p) for p in batch.column(0).to_pylist()]
                examples += paths[:2 - len(examples)]
                keep = [i for i, p in enumerate(paths)
                        if (p in wanted_paths or _basename(p) in wanted_names) and p not in rows]
                if not keep:
                    continue
                errors = batch.column(1).to_pylist()
                if use_embeddings:
                    col = batch.column(2).take(keep)
                    dim = getattr(col.type, "list_size", None) or max(
                        (len(v) for v in col.to_pylist() if v is not None), default=0)
                    emb, present = embedding_matrix(col, dim)
                    for j, i in enumerate(keep):
                        rows[paths[i]] = (errors[i], emb[j] if present[j] else None)
                else:
                    labs, scs = batch.column(2).to_pylist(), batch.column(3).to_pylist()
                    for i in keep:
                        rows[paths[i]] = (errors[i], (labs[i], scs[i]))
    matches, unmatched, by_name = match_ground_truth(gt, rows)
    index = label_index(labels)
    gt, mapped = as_candidates(gt, index)
    keep_paths, ys, errored, not_candidate = [], [], 0, set()
    for gi, key in matches:
        err, payload = rows[key]
        truth = gt.labels[gi]
        if err is not None or payload is None:
            errored += 1
            continue
        if truth not in index:
            not_candidate.add(truth)
            continue
        keep_paths.append(key)
        ys.append(index[truth])
    counts = {"ground_truth_images": len(gt.paths), "matched": len(matches), "matched_by_basename": by_name,
              "unmatched_ground_truth": len(unmatched), "errored": errored,
              "truth_not_a_label": sorted(not_candidate), "used": len(keep_paths)}
    if mapped:
        counts["truth_labels_mapped"] = mapped
    if not matches:
        raise InputError(f"no row of {output} matches ground truth {ground_truth} (compared as normalised full "
                         f"paths, then unique file names; output paths e.g. {examples}, ground truth e.g. "
                         f"{list(gt.paths[:2])}); are they the same images?")
    if not keep_paths:
        raise InputError(f"{len(matches)} rows of {output} match {ground_truth} but none is usable: {errored} "
                         f"errored, ground-truth labels not among the run's labels: {sorted(not_candidate)[:10]}")
    if not_candidate:
        log.warning("%d ground-truth labels are not labels of the run and their images are left out: %s",
                    len(not_candidate), sorted(not_candidate)[:10])
    y = np.asarray(ys, np.int64)
    if use_embeddings:
        emb = np.stack([rows[k][1] for k in keep_paths]).astype(np.float32)
        bad = ~np.isfinite(emb).all(axis=1)
        if bad.any():  # a damaged embedding gave a calibration fitted to it (T = 1000), written as fine
            raise InputError(f"{int(bad.sum())} of {len(emb)} sample embeddings are NaN/infinite; the run's "
                             "stored embeddings are damaged: relabel or re-embed those images")
        return Sample(keep_paths, y, emb, None, None, counts), manifest
    return Sample(keep_paths, y, None, [rows[k][1][0] for k in keep_paths],
                  [rows[k][1][1] for k in keep_paths], counts), manifest


def logits_from_scores(top_labels: list[list[str]], top_scores: list[list[float]], labels: list[str],
                       score_kind: str) -> tuple[np.ndarray, bool]:
    """(N, C) float32 logits reconstructed from written top-k scores (module docstring).

    Returns:
        ``(logits, complete)``: ``complete`` when every row held all C labels (exact).
    """
    index = {name: i for i, name in enumerate(labels)}
    n, c = len(top_labels), len(labels)
    out = np.zeros((n, c), np.float64)
    complete = True
    for r, (labs, scs) in enumerate(zip(top_labels, top_scores)):
        s = np.clip(np.asarray(scs, np.float64), EPS, 1 - EPS)
        known = np.zeros(c, bool)
        known[[index[x] for x in labs]] = True
        if not known.all():
            complete = False
        if score_kind == "softmax":
            rest = max(EPS, (1.0 - s.sum()) / max(1, c - len(s)))
            out[r, :] = np.log(rest)
            out[r, [index[x] for x in labs]] = np.log(s)
        else:
            low = s.min() if len(s) else EPS
            out[r, :] = np.log(low / (1 - low))
            out[r, [index[x] for x in labs]] = np.log(s / (1 - s))
    return out.astype(np.float32), complete


def run_calibrate(output: str, ground_truth: str, *, calibration_path: str = "calibration.json",
                  holdout: float = 0.3, seed: int = 0, storage_options: dict | None = None) -> Calibration:
    """Fit a calibration for the run in ``output`` and write it to ``calibration_path``.

    Raises:
        InputError: see ``read_sample``.
        ConfigError: bad ``holdout``, too few images, another checkpoint than the run's.
        ModelLoadError: the run's checkpoint cannot be loaded (embeddings path).
    """
    import torch

    from .labels import build_label_set
    from .model import checkpoint_digest, load_model, resolve_checkpoint
    from .ranking import zero_shot_logits
    from .relabel import check_same_model

    check_holdout(holdout)  # before the sample and the model are read
    refuse_inside_output(calibration_path, storage_options, "a calibration file", one_file=True)
    sample, manifest = read_sample(output, ground_truth, storage_options)
    model = manifest["model"]
    labels, templates = list(manifest["labels"]), list(manifest.get("templates") or [])
    score_kind = model.get("score_kind")
    info = dict(sample.counts)
    if sample.embeddings is not None:
        path = resolve_checkpoint(model["id"], model.get("revision"), storage_options)
        digest = checkpoint_digest(path)
        check_same_model(manifest, model["id"], model.get("revision"), digest)
        zs = load_model(path)
        label_set = build_label_set(labels, templates, zs, digest=digest)
        score_kind = zs.score_kind
        if sample.embeddings.shape[1] != label_set.embeddings.shape[1]:
            raise ConfigError(f"the stored embeddings have {sample.embeddings.shape[1]} dimensions but "
                              f"{model['id']} embeds labels in {label_set.embeddings.shape[1]}")
        head = _run_head(manifest, output, storage_options, digest=digest, labels=labels, templates=templates,
                         score_kind=score_kind)
        if head is not None:  # the run's scores came from a head: calibrate its logits
            logits = head.logits(sample.embeddings)
        else:
            logits = zero_shot_logits(torch.from_numpy(sample.embeddings), torch.from_numpy(label_set.embeddings),
                                      zs.logit_scale, zs.logit_bias).numpy()
        info.update(source="embeddings", scores_complete=True)
    else:
        digest = model.get("digest")
        if not digest:
            raise InputError(f"the run manifest of {output} records no checkpoint digest")
        assert sample.top_labels is not None and sample.top_scores is not None  # read_sample: one or the other
        logits, complete = logits_from_scores(sample.top_labels, sample.top_scores, labels, score_kind)
        info.update(source="scores", scores_complete=complete)
        if not complete:
            log.warning("the run wrote only the top-k scores: logits of the other labels are approximated; "
                        "label with --store-embeddings (or --top-k %d) for an exact fit", len(labels))
    info["run"] = output
    head_id = (manifest.get("head") or {}).get("id")
    calib = fit_calibration(logits, sample.y, score_kind, labels=labels, templates=templates,
                            checkpoint_digest=digest, model=model.get("id"), holdout=holdout, seed=seed,
                            fit_info=info, head=head_id)
    calib.save(calibration_path, storage_options)
    worse = worse_on_held_out(calib)
    if worse:
        log.warning("%s", worse)
    return calib


def worse_on_held_out(calib: Calibration) -> str | None:
    """A warning when the fitted calibration makes the held-out scores worse (a higher NLL, the
    quantity both fits minimise): the fit split was too small or unlike the held-out images, and
    labeling with it would hurt. None when it does not."""
    before, after = calib.metrics["before"]["nll"], calib.metrics["after"]["nll"]
    if not after > before:
        return None
    f = calib.fit
    return (f"this calibration makes the held-out scores worse (NLL {before:.4f} -> {after:.4f}); it was fitted on "
            f"{f['fit_images']} images and measured on {f['held_out_images']}. Give more ground truth (a few "
            "hundred images) before labeling with it, or label without --calibration")


def _run_head(manifest: dict, output: str, storage_options: dict | None, **expected):
    """The head a run was labeled with (its manifest's ``head`` entry), read from the recorded
    file and checked to be the same content (id); None for a zero-shot run.

    Raises:
        ConfigError: the recorded head file is missing, damaged, changed (another id) or does not
            fit the run.
    """
    from .heads import load_head

    entry = manifest.get("head") or {}
    if not entry.get("id"):
        return None
    head = load_head(entry.get("file") or "", storage_options) if entry.get("file") else None
    if head is None or head.id != entry["id"]:
        raise ConfigError(f"{output} was labeled with head {entry['id']} (file {entry.get('file')}), and that file "
                          f"now holds {'nothing' if head is None else f'head {head.id}'}; calibration needs the "
                          "run's own head to rebuild its logits: restore the file")
    head.check_compatible(checkpoint_digest=expected["digest"], labels=expected["labels"],
                          templates=expected["templates"], score_kind=expected["score_kind"],
                          source=f"head file {entry.get('file')}")
    return head


def report_text(calib: Calibration, path: str) -> str:
    """Human summary: parameters and held-out metrics before/after."""
    p = calib.params
    what = (f"temperature T = {p['temperature']:.4f}" if calib.kind == "temperature" else
            f"Platt scaling, {sum(p['per_label_fit'])} of {len(calib.labels)} labels with their own fit")
    f = calib.fit
    lines = [f"calibration {calib.id} ({calib.kind}, {calib.score_kind} scores): {what}",
             f"  fit on {f['fit_images']} images, measured on {f['held_out_images']} held out "
             f"(seed {f['seed']}); source: {f.get('source')}; matched {f.get('matched')}, used {f.get('used')}",
             f"  {'held-out':<10} {'ECE':>7} {'NLL':>7} {'top-1':>7}  accuracy at coverage"]
    for k in ("before", "after"):
        m = calib.metrics[k]
        cov = "  ".join(f"{q}: {v:.3f}" for q, v in m["accuracy_at_coverage"].items())
        lines.append(f"  {k:<10} {m['ece']:>7.4f} {m['nll']:>7.4f} {m['top1_accuracy']:>7.3f}  {cov}")
    lines.append(f"  written to {path}")
    return "\n".join(lines)
