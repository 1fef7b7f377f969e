"""Error types and the stable per-image error codes of the output contract.

Job-level problems (bad labels, unreachable model, occupied output) raise ``ZslabelError``
subclasses before any image is read. Per-image problems never raise out of a stage: they become
an ``error`` string ``"<code>: <detail>"`` on that image's row, with ``<code>`` one of ``CODES``.
"""

from __future__ import annotations

READ_ERROR = "read_error"                  # storage I/O failed (missing, permission, network)
UNIDENTIFIED_IMAGE = "unidentified_image"  # bytes are not an image Pillow can identify
TRUNCATED = "truncated"                    # image data ends early
TOO_MANY_PIXELS = "too_many_pixels"        # header claims more pixels than --max-pixels
UNSUPPORTED_FORMAT = "unsupported_format"  # a known image container with no decoder here (HEIF/AVIF, ...)
IMAGE_TOO_SMALL = "image_too_small"        # a side below --min-side
NON_FINITE_SCORES = "non_finite_scores"    # the model produced NaN/inf for this image
INTERNAL_ERROR = "internal_error"          # a bug in zslabel while handling this one input (traceback logged)
DECODE_TIMEOUT = "decode_timeout"          # decoding took longer than --decode-timeout

CODES = (READ_ERROR, UNIDENTIFIED_IMAGE, TRUNCATED, TOO_MANY_PIXELS, UNSUPPORTED_FORMAT,
         IMAGE_TOO_SMALL, NON_FINITE_SCORES, INTERNAL_ERROR, DECODE_TIMEOUT)


def error_string(code: str, detail: str) -> str:
    """Format a row's ``error`` value as ``"<code>: <detail>"`` (detail shortened to 300 chars)."""
    # Lone surrogates (undecodable bytes of an OS file name) cannot be stored in Arrow strings.
    detail = " ".join(str(detail).split()).encode("utf-8", "backslashreplace").decode("utf-8")
    return f"{code}: {detail[:300]}"


def error_code(error: str | None) -> str | None:
    """The stable code of an ``error`` value (the part before the first colon), or None."""
    return None if error is None else error.split(":", 1)[0]


class ZslabelError(Exception):
    """A job-level error with a message meant for the user; the CLI prints it and exits 2."""


class ConfigError(ZslabelError):
    """Invalid configuration: labels, templates, flags, or a YAML config file."""


class InputError(ZslabelError):
    """The input cannot be planned: nothing found, unreadable manifest, unknown format."""


class ModelLoadError(ZslabelError):
    """The checkpoint cannot be found or loaded."""


class OutputError(ZslabelError):
    """The output location is unusable (occupied without --resume/--overwrite, not writable)."""


class AccountingError(OutputError):
    """The committed rows do not account for every listed input (``listed == rows + skipped +
    duplicates_removed`` failed): nothing was committed. The CLI exits 4."""


class ErrorBudgetExceeded(ZslabelError):
    """More images failed than ``--max-error-fraction`` allows; the output is still written.

    Attributes:
        summary: the run's ``summary.RunSummary`` (its counts line is printed as for any run).
    """

    def __init__(self, message: str, summary=None):
        super().__init__(message)
        self.summary = summary


class RayStartError(ZslabelError):
    """Ray could not be started or joined (no cluster at ``--address``, a local node that timed
    out starting under load); the CLI prints it and exits 3. Nothing was written."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, Kubernetes, Slurm) received by a label or relabel command.

    A ``KeyboardInterrupt`` so that it unwinds a job exactly as Ctrl-C does: Ray Data's
    executor and the output's claim are shut down and released by the same handlers, and
    committed files stay for ``--resume``. The CLI exits 143 (128 + SIGTERM)."""
