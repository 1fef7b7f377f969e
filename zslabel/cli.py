"""Command line: ``zslabel label INPUT --labels ... --output OUT`` (also ``python -m zslabel``).

Flags override keys of ``--config job.yaml`` (same names, dashes for underscores). Exit codes:
see ``EXIT_CODES``.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys

from .config import INPUT_FORMATS, JobConfig, parse_concurrency, parse_storage_options, resolve_templates
from .errors import (
    AccountingError,
    ConfigError,
    ErrorBudgetExceeded,
    OutputError,
    RayStartError,
    Terminated,
    ZslabelError,
)
from .interrupts import ctrl_c_ignored, sigterm_as_interrupt
from .labels import DEFAULT_TEMPLATE, TEMPLATE_SETS, parse_label_list
from .options import DEFAULT_MODEL
from .sources import KINDS as INPUT_KINDS

log = logging.getLogger("zslabel")

# Flags that are not job options (every other flag's dest is a field of JobConfig/RelabelConfig,
# which is how flags reach the config: see LabelingOptions.from_args).
CLI_ONLY = frozenset({"command", "config", "verbose", "quiet", "ground_truth", "eval_json"})

EXIT_CODES = """exit codes:
  0    success
  1    error budget exceeded (--max-error-fraction): the output is written
  2    bad configuration, input, model or output (nothing written); an output that cannot be
       written mid-run (a full disk): what was committed is kept, rerun with --resume
  3    Ray could not be started or joined (unreachable --address or $RAY_ADDRESS, node start timed out)
  4    the rows do not account for every input (a zslabel bug): nothing committed, rows kept
  130  interrupted by Ctrl-C (SIGINT): committed files are kept, rerun with --resume (the message
       says when nothing was committed)
  143  stopped by SIGTERM (timeout, Kubernetes, Slurm), label and relabel: as 130
"""

EPILOG = """examples:
  zslabel label ./photos --labels "cat,dog,bird" --output ./labels
  zslabel label s3://bucket/images/ --labels-file labels.txt --output s3://bucket/labels/ \\
      --model openai/clip-vit-large-patch14 --num-gpus-per-actor 1 --concurrency 1,8
  zslabel label ./photos --config job.yaml --top-k 3

output: Parquet files with columns path, input_index, labels (top-k, best first), scores,
error, width, height, plus _run_manifest.json. Scores are softmax over all labels for CLIP
checkpoints and independent sigmoids for SigLIP checkpoints.

progress: images done / total, images/s, errors so far and ETA go to stderr: one bar on a
terminal, else a line every 15 s and one at the end (--quiet: none).

""" + EXIT_CODES


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad value of one option said in one line (the usage block above it buried
    the message); other usage errors (a missing or unknown argument) keep the usage lines."""

    def error(self, message: str):
        if message.startswith("argument "):
            self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        super().error(message)

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but a flag the command does not know is refused by the command's own
        parser (its usage, not zslabel's), with the closest flags it has (``--top_k``: did you
        mean --top-k?)."""
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            import difflib

            command = self._subparsers._group_actions[0].choices[parsed.command]
            flags = [s for a in command._actions for s in a.option_strings if s.startswith("--")]
            close = [m for e in extra if e.startswith("-")
                     for m in difflib.get_close_matches(e.split("=")[0], flags, n=1, cutoff=0.75)]
            command.error(f"unrecognized arguments: {' '.join(extra)}"
                          + (f" (did you mean {', '.join(dict.fromkeys(close))}?)" if close else ""))
        return parsed


GROUND_TRUTH_HELP = "CSV/TSV/Parquet (path,label), folder-per-class root, or Label Studio JSON export"


def _checked(convert):
    """``convert`` as an argparse ``type``: a ZslabelError becomes argparse's usage error (exit 2)."""
    def parse(text: str):
        try:
            return convert(text)
        except ZslabelError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    parse.__name__ = convert.__name__.strip("_").replace("_", " ")
    return parse


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ZslabelError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise ZslabelError(f"must be >= 0 (got {value})")
    return value


def _add_labeling_flags(p: argparse.ArgumentParser, model_help: str) -> None:
    """Flags of ``options.LabelingOptions`` (shared by label and relabel); dest == field name."""
    g = p.add_argument_group("labels and model")
    g.add_argument("--labels", type=parse_label_list, help="comma-separated candidate labels, e.g. 'cat,dog,bird'")
    g.add_argument("--labels-file", help="file with one label per line ('# ...' or a lone '#' is a comment; "
                   "'#1 pick' is a label); with --labels too, the labels of both (--labels first)")
    t = g.add_mutually_exclusive_group()
    t.add_argument("--template", dest="templates", type=lambda text: [text], metavar="TEMPLATE",
                   help=f"prompt template with one {{}} (default: {DEFAULT_TEMPLATE!r})")
    t.add_argument("--templates", type=_checked(resolve_templates),
                   help="prompt ensemble: a file of templates, one per line, or a named set: "
                   + ", ".join(TEMPLATE_SETS))
    g.add_argument("--model", help=model_help)
    g.add_argument("--revision", help="hub revision (branch, tag or commit) of --model")
    g.add_argument("--top-k", type=int, help="labels kept per image (default 5; capped at the number of labels)")
    g = p.add_argument_group("abstention and multi-label")
    g.add_argument("--min-score", type=float, help="mark rows whose best score is below this as abstained "
                   "(adds a bool 'abstained' column; labels are still written); with --calibration the scores are "
                   "estimated probabilities of being right")
    g.add_argument("--multi-label", action="store_true", default=None,
                   help="SigLIP-family (sigmoid) models only: keep every label with score >= --threshold, "
                   "best first (possibly none), instead of the top k")
    g.add_argument("--threshold", type=float, help="score cut for --multi-label, in [0, 1]")
    g = p.add_argument_group("calibration and hierarchy")
    g.add_argument("--calibration", help="calibration file from `zslabel calibrate` for this model, labels and "
                   "templates: scores (and --min-score) become estimated probabilities of being right")
    g.add_argument("--head", help="head file from `zslabel fit` for this model, labels and templates: its "
                   "logits replace the zero-shot ones (calibration, top-k, abstention, multi-label and "
                   "hierarchies then work on the head's scores)")
    g.add_argument("--hierarchy", action="store_true", default=None,
                   help="labels written as paths (animal/mammal/dog): add hier_label, hier_score, hier_path, "
                   "the deepest path whose rolled-up score reaches --min-score")
    g = p.add_argument_group("output")
    g.add_argument("--output", "-o", help="output folder or fsspec URI for Parquet + run manifest")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_const", const="resume", dest="mode",
                      help="continue an interrupted run into the same output (a finished one with nothing "
                      "left to do returns at once)")
    mode.add_argument("--overwrite", action="store_const", const="overwrite", dest="mode",
                      help="replace existing output (atomically: the old output stays readable and whole "
                      "until the new run commits)")
    g.add_argument("--retry-errors", action="store_true", default=None,
                   help="with --resume: recompute the rows that failed in earlier runs (kept otherwise)")
    g.add_argument("--max-error-fraction", type=float,
                   help="fail (exit 1, output still written) when more than this fraction of images fail")
    g.add_argument("--storage-options", type=_checked(parse_storage_options),
                   help="fsspec options as JSON/YAML text or file, e.g. "
                   "'{\"client_kwargs\": {\"endpoint_url\": \"http://127.0.0.1:9000\"}}'")
    g = p.add_argument_group("evaluation")
    g.add_argument("--ground-truth", help="after the run, evaluate against this CSV/TSV/Parquet (path,label), "
                   "folder-per-class root or Label Studio JSON export and print the report (see `zslabel eval --help`)")
    g.add_argument("--eval-json", help="also write the evaluation report as JSON here")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress display and no INFO log lines (the summary line, warnings and errors "
                   "still print)")


def _label_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("label", help="label images with a zero-shot classifier", allow_abbrev=False,
                       description="Label every image under INPUT with the top-k of the candidate labels.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", nargs="?", help="folder, glob, manifest (.txt/.csv/.tsv/.jsonl/.parquet), WebDataset "
                   "tars or Parquet with image bytes; local path or fsspec URI (s3://, gs://, az://); required "
                   "unless --config gives it")
    _add_labeling_flags(p, f"hub id, local checkpoint folder or fsspec URI (default: {DEFAULT_MODEL})")
    g = p.add_argument_group("output layout")
    g.add_argument("--store-embeddings", action="store_true", default=None,
                   help="add an L2-normalised image 'embedding' column")
    g.add_argument("--embedding-dtype", choices=["float16", "float32"],
                   help="type of the 'embedding' column's values (default float16: half the bytes; cosine "
                   "similarities of 512-d unit vectors move by < 1e-4)")
    g.add_argument("--rows-per-file", type=int,
                   help="rows per committed Parquet file, at most (default 1024); a crash loses at most "
                   "the files in flight")
    g = p.add_argument_group("inputs")
    g.add_argument("--input-format", choices=INPUT_FORMATS, metavar="{" + ",".join(INPUT_FORMATS) + "}",
                   help="auto (default: decided from the input's name) or " + "; ".join(
                       f"{k.name}: {k.summary}" for k in INPUT_KINDS))
    g.add_argument("--path-column", help="manifest column holding URIs (default: path, url, uri or file_name)")
    g.add_argument("--id-column", help="manifest column carried into the output")
    g.add_argument("--image-column", help="Parquet column holding image bytes (default: found per file: "
                   "jpg/png/image/webp/bytes/jpeg/img in any case, else the only binary column named like images)")
    g.add_argument("--dedupe", action="store_true", default=None,
                   help="label each distinct URI once (a local file's file: URI and a//b or x/.. spellings count "
                   "as the same file)")
    g.add_argument("--io-timeout", type=float,
                   help="seconds to connect to a remote input and to wait for its next bytes (default 30); "
                   "a silent server costs one timeout per input, the inputs of a batch are fetched at once; "
                   "at most 86400")
    g.add_argument("--io-retries", type=int,
                   help="retries of a transient failure (HTTP 408/425/429/5xx, connection reset) with "
                   "exponential backoff (default 3); timeouts are not retried")
    g = p.add_argument_group("decoding")
    g.add_argument("--max-pixels", type=int, help="images with more pixels get too_many_pixels (default 178956970)")
    g.add_argument("--min-side", type=int, help="images with a shorter side get image_too_small (default 1)")
    g.add_argument("--fast-decode", action="store_true", default=None,
                   help="let libjpeg downscale large JPEGs while decoding (faster; pixels differ slightly)")
    g.add_argument("--decode-timeout", type=float,
                   help="seconds to decode one image before it becomes a decode_timeout row (default 60; 0: no limit; "
                   "at most 86400)")
    g.add_argument("--reference-pixels", action="store_true", default=None,
                   help="colours exactly as transformers' load_image (alpha dropped, 16/32-bit samples clipped) "
                   "instead of alpha on white and deep samples scaled (README: Parity)")
    g = p.add_argument_group("Ray")
    g.add_argument("--config", help="YAML file with the same keys (underscores); flags override it")
    g.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else start Ray locally)")
    g.add_argument("--batch-size", type=int, help="images per model batch (default 64)")
    g.add_argument("--concurrency", type=_checked(parse_concurrency),
                   help="labeler actors: N or MIN,MAX (default: 1..what the cluster holds)")
    g.add_argument("--num-gpus-per-actor", type=float, help="GPUs per labeler actor, fractions allowed (default 0)")
    g.add_argument("--num-cpus-per-actor", type=float,
                   help="CPUs per labeler actor (default 0.5: an actor runs ceil(CPUs) torch threads, so a CPU "
                   "node gets one actor per core and keeps half its logical CPUs for decode tasks)")
    g.add_argument("--decode-cpus-per-task", type=float, help="CPUs per decode task (default 1)")
    g.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"],
                   help="model precision (auto: float16 on CUDA, float32 on CPU)")
    return p


RELABEL_EPILOG = """examples:
  zslabel label ./photos --labels "cat,dog" --store-embeddings --output ./run1
  zslabel relabel ./run1 --labels "tabby cat,puppy,kitten" --output ./run2 --top-k 3

The source must hold an 'embedding' column (zslabel label --store-embeddings). Only the text
tower runs: no image is read. Scores equal a full run's up to the stored embedding's rounding:
float32 ~1e-7; float16 up to ~1e-3 for real checkpoints (logit scale ~100), so store float32
when relabeled scores must match a full run more closely. The model defaults to the one in the source's run manifest;
another checkpoint (different digest) is refused. Output: the same schema and run manifest as
`zslabel label` with the same options; error rows stay error rows. --overwrite keeps the old
output whole until the new one is complete; --resume finishes a relabel that stopped part way.
"""

EVAL_EPILOG = """ground truth:
  a CSV/TSV/Parquet table with a header naming a path column (path, uri, url, file, filename,
  image) and a label column (label, class, category); relative paths are relative to the
  table's folder. Or a folder-per-class root: each image's parent folder name is its label.
  Predictions match by full path; entries left unmatched then match by file name when that
  name is unique on both sides.

definitions (labeled = matched rows without an error):
  top-1 accuracy          first label == truth, over labeled rows
  top-5 accuracy          truth among the first 5 labels, over labeled rows
  top-1 including errors  first label == truth, over all matched rows (errored rows are wrong)
  precision(L), recall(L) of the first label, over labeled rows
"""


def _relabel_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("relabel", help="relabel stored embeddings with new labels (no image read)",
                       allow_abbrev=False,
                       description="Score the 'embedding' column of an earlier run against new labels/templates.",
                       epilog=RELABEL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="output folder (or Parquet file) of a `zslabel label --store-embeddings` run")
    _add_labeling_flags(p, "checkpoint for the text tower (default: the model recorded in the source's run "
                        "manifest; must be the same checkpoint)")
    g = p.add_argument_group("relabel")
    g.add_argument("--drop-embeddings", action="store_false", dest="store_embeddings", default=None,
                   help="do not copy the 'embedding' column into the new output (kept by default)")
    g.add_argument("--batch-size", type=int, help="source rows per batch (default 8192)")
    return p


def _add_io_flags(p: argparse.ArgumentParser, quiet: str = "no INFO log lines (warnings and errors still print)"
                  ) -> None:
    """``--storage-options``, ``-v`` and ``-q`` (with its help text) of the commands besides label."""
    p.add_argument("--storage-options", type=_checked(parse_storage_options),
                   help="fsspec options as JSON/YAML text or file")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help=quiet)


def _eval_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="measure an output against ground truth", allow_abbrev=False,
                       description="Top-1/top-5 accuracy, per-label precision and recall, confusions.",
                       epilog=EVAL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("predictions", help="output folder (or Parquet file) of `zslabel label` or `relabel`")
    p.add_argument("--ground-truth", required=True, help=GROUND_TRUTH_HELP)
    p.add_argument("--json", help="also write the report as JSON here")
    p.add_argument("--top-confusions", type=int, default=10, help="confused pairs to list (default 10)")
    _add_io_flags(p)
    return p


CALIBRATE_EPILOG = """examples:
  zslabel label ./sample --labels-file L.txt --store-embeddings --output ./sample_out
  zslabel calibrate ./sample_out --ground-truth sample_gt.csv --output calib.json
  zslabel label ./photos --labels-file L.txt --calibration calib.json --min-score 0.8 --output ./out

Fits, on a labeled sample of a run (best with --store-embeddings: logits are then exact), a
temperature (softmax models) or per-label Platt scaling (sigmoid models), and reports expected
calibration error (ECE, 15 bins) and top-1 accuracy at 100/80/50% coverage before and after,
on a held-out part of the sample. The file is tied to the run's checkpoint, labels and
templates; label/relabel refuse it for any other.
"""


def _calibrate_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("calibrate", help="fit score calibration from a labeled sample of a run",
                       allow_abbrev=False, epilog=CALIBRATE_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Fit a calibration file (temperature / Platt scaling) from a run and ground truth.")
    p.add_argument("run", help="output folder of a `zslabel label` (or relabel) run, ideally with --store-embeddings")
    p.add_argument("--ground-truth", required=True, help=GROUND_TRUTH_HELP)
    p.add_argument("--output", "-o", default="calibration.json", help="calibration file to write "
                   "(default calibration.json)")
    p.add_argument("--holdout", type=float, default=0.3, help="fraction of the sample held out to measure "
                   "before/after (default 0.3)")
    p.add_argument("--seed", type=_checked(_non_negative_int), default=0,
                   help="seed of the fit/held-out split (default 0)")
    _add_io_flags(p)
    return p


EXPORT_EPILOG = """examples:
  zslabel export ./out --format label-studio --output tasks.json --image-root /srv/images
  zslabel export ./out --format label-studio --output review.json --order uncertainty --limit 500
  zslabel export ./out --format lance --output table.lance --index

label-studio: one task per labeled row (error rows are left out and counted) with a prediction
(the top-1 label as a single choice, its score, model_version = the run's id; the top-k in the
task data), plus the labeling config matching it (TASKS.label_config.xml). Local paths become
/data/local-files/?d=<path relative to --image-root> (start Label Studio with
LOCAL_FILES_SERVING_ENABLED=true and LOCAL_FILES_DOCUMENT_ROOT=<--image-root>); s3://, gs://
and http(s) URIs are written as they are. Annotated exports come back as --ground-truth of
eval and calibrate.
lance: every row, embedding as a fixed-size vector column; --index builds a cosine vector index.
"""


def _export_parser(sub) -> argparse.ArgumentParser:
    """``zslabel export``: common flags, then one group of flags per registered format."""
    from .exports import FORMATS

    p = sub.add_parser("export", help="export a run to another tool's format (" + ", ".join(f.name for f in FORMATS)
                       + ")", allow_abbrev=False, epilog=EXPORT_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Write a finished run's rows in another tool's format.")
    p.add_argument("source", help="output folder of a `zslabel label` or `relabel` run")
    p.add_argument("--format", required=True, choices=[f.name for f in FORMATS],
                   help="; ".join(f"{f.name}: {f.summary}" for f in FORMATS))
    p.add_argument("--output", "-o", required=True, help="file or dataset to write (local path or fsspec URI)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output")
    p.add_argument("--storage-options", type=_checked(parse_storage_options),
                   help="fsspec options (JSON/YAML text or file) for reading the run and writing files")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="no INFO log lines (warnings and errors still print)")
    owners: dict[str, str] = {}
    for fmt in FORMATS:
        before = {a.dest for a in p._actions}
        fmt.load().add_arguments(p.add_argument_group(f"--format {fmt.name}"))
        owners.update({a.dest: fmt.name for a in p._actions if a.dest not in before})
    p.set_defaults(export_flag_owners=owners)
    return p


def run_export_command(args: argparse.Namespace) -> int:
    """``zslabel export``: refuse another format's flags, run the format, print its line."""
    from .errors import ConfigError
    from .exports import get

    fmt = get(args.format)
    for dest, owner in args.export_flag_owners.items():
        if owner != fmt.name and getattr(args, dest) is not None:
            raise ConfigError(f"--{dest.replace('_', '-')} is an option of --format {owner}, not {fmt.name}")
    print(fmt.load().run(args).line())
    return 0


FIT_EPILOG = """examples:
  zslabel label ./sample --labels-file L.txt --store-embeddings --output ./sample_out
  zslabel fit ./sample_out --ground-truth sample_gt.csv --output head.safetensors
  zslabel label ./photos --labels-file L.txt --head head.safetensors --output ./out
  zslabel relabel ./sample_out --head head.safetensors --output ./sample_relabeled

Fits a linear head over the run's labels on its stored embeddings: the zero-shot classifier
(label embeddings, logit scale) plus a change pulled toward zero by an L2 prior whose strength is
chosen by stratified k-fold cross-validation on the sample (softmax head for CLIP-family models,
per-label sigmoid head for SigLIP). Labels without examples keep their zero-shot weights.
Prints examples per label, held-out top-1/top-5/ECE before (zero-shot) and after, the worst
labels and a learning curve (1, 2, 4, 8, 16 examples per label where the sample allows). The
file is tied to the run's checkpoint, labels and templates; label/relabel refuse it for any other.
"""


def _fit_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("fit", help="fit a few-shot head on a run's stored embeddings and ground truth",
                       allow_abbrev=False, epilog=FIT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Fit a linear head (zero-shot prior, strength by cross-validation) from a run "
                       "made with --store-embeddings and ground truth.")
    p.add_argument("run", help="output folder of a `zslabel label --store-embeddings` (or relabel) run")
    p.add_argument("--ground-truth", required=True, help=GROUND_TRUTH_HELP)
    p.add_argument("--output", "-o", default="head.safetensors", help="head file to write (default head.safetensors)")
    p.add_argument("--holdout", type=float, default=0.3, help="fraction of each label's examples held out to "
                   "measure before/after and the learning curve (default 0.3; 0: measure nothing); the saved head "
                   "is refitted on every example")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    p.add_argument("--seed", type=_checked(_non_negative_int), default=0,
                   help="seed of the split, folds and subsamples (default 0)")
    p.add_argument("--no-learning-curve", action="store_true", help="skip the learning curve (faster)")
    _add_io_flags(p, quiet="no progress lines")
    return p


def run_fit_command(args: argparse.Namespace) -> int:
    """``zslabel fit``: fit, write the head file, print the report."""
    from .fit import run_fit
    from .heads import report_text

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    head = run_fit(args.run, args.ground_truth, head_path=args.output, holdout=args.holdout, seed=args.seed,
                   folds=args.folds, learning_curve=not args.no_learning_curve,
                   storage_options=args.storage_options or {}, progress=None if args.quiet else progress)
    print(report_text(head, args.output))
    return 0


def run_calibrate_command(args: argparse.Namespace) -> int:
    """``zslabel calibrate``: fit, write the file, print the before/after report."""
    from .calibrate import report_text, run_calibrate

    calib = run_calibrate(args.run, args.ground_truth, calibration_path=args.output, holdout=args.holdout,
                          seed=args.seed, storage_options=args.storage_options or {})
    print(report_text(calib, args.output))
    return 0


def _report_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("report", help="write a static HTML review report of an output (thumbnails, figures)",
                       allow_abbrev=False, description="A static report (index.html, thumbnails, figures) of a "
                       "labeling run, opened from disk: per-label counts, score distributions, the most and least "
                       "confident images, abstained and error rows; with --ground-truth the eval metrics, "
                       "confusions and a reliability diagram. Needs the 'report' extra.")
    p.add_argument("output", metavar="RUN", help="output folder (or Parquet file) of `zslabel label` or `relabel`")
    p.add_argument("--output", "-o", dest="report_dir", metavar="REPORT_DIR", required=True,
                   help="local folder to write the report to")
    p.add_argument("--ground-truth", help=GROUND_TRUTH_HELP)
    p.add_argument("--seed", type=_checked(_non_negative_int), default=0, help="seed of the random samples (default 0)")
    p.add_argument("--per-label", type=int, default=6, help="thumbnails per grid (default 6)")
    p.add_argument("--max-label-sections", type=int, default=60,
                   help="labels with thumbnail grids, worst first (default 60); the table lists all")
    p.add_argument("--workers", type=int, default=8, help="threads making thumbnails (default 8)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier report (never files it did not write)")
    _add_io_flags(p, quiet="no progress display")
    return p


def run_report_command(args: argparse.Namespace) -> int:
    """``zslabel report``: build the report, print where it is."""
    from .review import build_report

    result = build_report(args.output, args.report_dir, ground_truth=args.ground_truth, seed=args.seed,
                          per_label=args.per_label, max_label_sections=args.max_label_sections,
                          workers=args.workers, storage_options=args.storage_options or {},
                          progress=not args.quiet, overwrite=args.overwrite)
    print(result.line())
    return 0


def relabel_config_from_args(args: argparse.Namespace):
    """``zslabel relabel`` flags -> ``relabel.RelabelConfig`` (by field name)."""
    from .relabel import RelabelConfig

    return RelabelConfig.from_args(args)


def _check_evaluation_json(json_path: str | None, output: str, storage_options: dict) -> None:
    """Refuse a ``--json``/``--eval-json`` path inside a zslabel output (``output``, or any other):
    a file there blocked the run's next --overwrite ("files zslabel did not write")."""
    from .storage import comparable_path
    from .store import refuse_inside_output

    if not json_path:
        return
    refuse_inside_output(json_path, storage_options, "an evaluation report", one_file=True)
    if comparable_path(json_path).startswith(comparable_path(output).rstrip("/") + "/"):
        raise OutputError(f"{json_path} is inside the output {output}: an evaluation report written there would "
                          "block the run's next --overwrite; write it outside the run's folder")


def _print_evaluation(args, output: str, ground_truth, storage_options: dict, json_path: str | None) -> None:
    from .evaluate import evaluate

    top_confusions = getattr(args, "top_confusions", 10)
    if top_confusions < 0:
        raise ConfigError(f"--top-confusions must be >= 0 (got {top_confusions})")
    _check_evaluation_json(json_path, output, storage_options)
    report = evaluate(output, ground_truth, storage_options=storage_options, top_confusions=top_confusions)
    if json_path:  # before the text: a reader of stdout that leaves (| head) must not cost the file
        report.write_json(json_path, storage_options)
    print(report.text())


def _run_and_evaluate(args, run, config) -> int:
    """Run a label/relabel job; with --ground-truth (read before the run, so a bad file fails
    fast) evaluate the output afterwards, also when the error budget was exceeded."""
    from .evaluate import load_ground_truth

    if args.eval_json and not args.ground_truth:
        raise ConfigError("--eval-json writes the evaluation against --ground-truth FILE, which is not given")
    _check_evaluation_json(args.eval_json, config.output, config.storage_options)
    gt = load_ground_truth(args.ground_truth, config.storage_options) if args.ground_truth else None
    try:
        summary = run(config)
        print(summary.line())
        if summary.rows and not summary.labeled:
            # Exit 0 is the contract (errors are rows); a run that labeled nothing is still
            # almost always a wrong input (e.g. the labels file given as the input).
            source = getattr(config, "input", None) or getattr(config, "source", None)
            print(f"zslabel: warning: no image was labeled: all {summary.rows} inputs failed; check that "
                  f"{source} is the input you meant (--max-error-fraction makes such a run exit 1)",
                  file=sys.stderr)
    except ErrorBudgetExceeded as exc:
        if exc.summary is not None:
            print(exc.summary.line())  # the counts of a finished run, as when it stays within budget
        if gt is not None:
            _print_evaluation(args, config.output, gt, config.storage_options, args.eval_json)
        raise
    if gt is not None:
        _print_evaluation(args, config.output, gt, config.storage_options, args.eval_json)
    return 0


def _version() -> str:
    """The installed zslabel version (pyproject.toml's when run from a checkout on PYTHONPATH)."""
    import importlib.metadata as md

    try:
        return md.version("zslabel")
    except md.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="zslabel", allow_abbrev=False,
        description="Zero-shot image labeling at scale (Ray Data + CLIP-family models -> ranked labels in Parquet).",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _label_parser(sub)
    _relabel_parser(sub)
    _eval_parser(sub)
    _calibrate_parser(sub)
    _report_parser(sub)
    _export_parser(sub)
    _fit_parser(sub)
    show = sub.add_parser("show", help="print the first rows of an output, best labels first",
                          description="Print rows of a zslabel output in input order: the path relative to the "
                          "shown rows' common folder, then labels with scores, or the error.")
    show.add_argument("output", help="output folder or fsspec URI of a label/relabel run")
    show.add_argument("-n", "--rows", type=_checked(_non_negative_int), default=20, help="rows to print (default 20)")
    _add_io_flags(show)
    return parser


def _quiet_ray() -> None:
    """--quiet: Ray's and Ray Data's INFO lines (local instance started, dashboard URL, each
    dataset's execution plan and end) are left out too; warnings and errors still print. Ray
    reads its log level when it is imported, Ray Data configures its logger then: so the level
    is set before the one and after the other, and the execution start lines are switched off
    in the DataContext every dataset of this process copies."""
    os.environ.setdefault("RAY_LOGGER_LEVEL", "warning")
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ray.data.DataContext.get_current().print_on_execution_start = False


def config_from_args(args: argparse.Namespace) -> JobConfig:
    """Merge ``--config`` YAML (if any) with the flags that were given (by field name); flags win."""
    return JobConfig.from_args(args, JobConfig.from_yaml(args.config) if args.config else None)


# The exit code of each error the CLI reports in one line (README, "Exit codes"): the first
# type that matches.
_EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (ErrorBudgetExceeded, 1), (RayStartError, 3), (AccountingError, 4), (ZslabelError, 2),
    (IsADirectoryError, 2), (NotADirectoryError, 2))


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (``EXIT_CODES``: 0 ok, 1 error budget exceeded,
    2 usage/config error, 3 Ray did not start, 4 accounting check failed, 130 interrupted,
    143 SIGTERM during label or relabel).

    A reader of stdout that leaves early (``zslabel eval OUT --ground-truth GT | head -1``) is
    no error: the rest of the text is dropped (files such as ``--json`` are written before any
    text), and the command's code stands; 0 when the pipe closed before it was known.
    """
    code = 0
    try:
        code = _command(argv)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at interpreter exit
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return code


def _after_interrupt(output: str | None, storage_options: dict) -> str:
    """What an interrupted label/relabel run left in ``output`` and what to do next (two ``exists``
    calls): a run that committed nothing removes what it made (``WriteSession.abandon``)."""
    from .output import RUN_RECORD
    from .store import output_filesystem

    if output is None:  # interrupted before the job's settings were read
        return "nothing was written: rerun the same command"
    try:
        fs, root = output_filesystem(output, storage_options)
        if not fs.exists(root) or not fs.exists(f"{root.rstrip('/')}/{RUN_RECORD}"):
            return f"nothing was committed to {output}, which is as it was: rerun the same command"
    except Exception:  # noqa: BLE001 - cannot tell (storage unreachable): the general advice
        pass
    return "committed files are kept: rerun with --resume (in place of --overwrite, if given) to continue"


def _command(argv: list[str] | None) -> int:
    """:func:`main` without its handling of a closed stdout."""
    args = build_parser().parse_args(argv)
    output, storage_options = None, {}  # a label/relabel run's, for the interrupt message
    quiet = getattr(args, "quiet", False) and not getattr(args, "verbose", False)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else
                        logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if quiet and args.command in ("label", "relabel"):
            _quiet_ray()  # imports Ray (seconds): a Ctrl-C here is an interrupt like any other
        if args.command == "label":
            from .pipeline import run_label_job

            config = config_from_args(args)
            output, storage_options = config.output, config.storage_options
            with sigterm_as_interrupt():  # cluster.init_ray keeps this handler over Ray's
                return _run_and_evaluate(args, functools.partial(run_label_job, progress=not args.quiet), config)
        if args.command == "relabel":
            from .relabel import run_relabel_job

            relabel_config = relabel_config_from_args(args)
            output, storage_options = relabel_config.output, relabel_config.storage_options
            with sigterm_as_interrupt():
                return _run_and_evaluate(args, functools.partial(run_relabel_job, progress=not args.quiet),
                                         relabel_config)
        if args.command == "show":
            from .show import show_output

            print(show_output(args.output, args.rows, args.storage_options or {}))
            return 0
        if args.command == "calibrate":
            return run_calibrate_command(args)
        if args.command == "report":
            return run_report_command(args)
        if args.command == "export":
            return run_export_command(args)
        if args.command == "fit":
            return run_fit_command(args)
        if args.command == "eval":
            _print_evaluation(args, args.predictions, args.ground_truth, args.storage_options or {}, args.json)
            return 0
    except KeyboardInterrupt as exc:
        by = " by SIGTERM" if isinstance(exc, Terminated) else ""
        with ctrl_c_ignored():
            print(f"zslabel: interrupted{by}; {_after_interrupt(output, storage_options)}", file=sys.stderr)
            if "ray" in sys.modules:  # here, not in Ray's atexit hook, where a Ctrl-C was a traceback
                from .cluster import shutdown_started_ray

                shutdown_started_ray()
        return 143 if isinstance(exc, Terminated) else 130
    except (ZslabelError, IsADirectoryError, NotADirectoryError) as exc:  # e.g. --output or --json naming a folder
        print(f"zslabel: error: {exc}", file=sys.stderr)
        return next(code for kind, code in _EXIT_CODES if isinstance(exc, kind))
    except Exception as exc:
        # A damaged Parquet file (a truncated part) met by a reading command (eval, calibrate,
        # fit) is bad input, said in one line; anything else is a bug and keeps its traceback.
        if not type(exc).__module__.startswith("pyarrow"):
            raise
        print(f"zslabel: error: cannot read a Parquet file of the output: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
