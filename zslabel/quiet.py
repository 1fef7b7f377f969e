"""Keep a clean run's terminal free of library noise that says nothing about the user's data.

Each filter names one message and the reason it is not the user's concern; everything else
(warnings about inputs, models, resources) still shows. Free of Ray and transformers imports:
filters work by logger name and message text, set before those libraries speak.
"""

from __future__ import annotations

import contextlib
import logging
import warnings


class _DropMessages(logging.Filter):
    """Drop records whose message contains one of ``needles``."""

    def __init__(self, *needles: str):
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in record.getMessage() for n in self.needles)


def quiet_ray_logs() -> None:
    """Silence the driver-side Ray messages every healthy run printed.

    - "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt
      out": printed by ``ray.init`` whenever a token exists (Ray creates one on the first local
      start). Token auth on is the secure default and nothing the user has to act on.
    - ``RayDeprecationWarning: `ray_remote_args` is deprecated``: the pipeline passes
      ``scheduling_strategy``, ``max_retries``, ``max_restarts`` and ``max_task_retries`` to
      ``map_batches``; Ray 2.50-2.63 (the pinned range, ``ray<2.64`` in pyproject.toml) has no
      named parameter for them, so there is no non-deprecated call to make yet.
    - "Progress bars disabled. To enable, set ...": Ray Data's note that its bars are off, which
      zslabel does on purpose (``zslabel.progress`` shows images done, rate, errors and ETA).
    Idempotent.
    """
    _drop("ray._private.authentication.authentication_token_setup",
          "Token authentication is enabled for this Ray cluster")
    _drop("ray.data._internal.progress", "Progress bars disabled")
    warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated", module=r"zslabel\.")


def _drop(logger_name: str, needle: str) -> None:
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _DropMessages) and needle in f.needles for f in logger.filters):
        logger.addFilter(_DropMessages(needle))


@contextlib.contextmanager
def no_transformers_progress():
    """Within: no "Loading weights" tqdm bar from ``from_pretrained`` of a local folder (one per
    labeler actor otherwise). The previous setting is restored, so hub download bars elsewhere
    keep showing."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()
