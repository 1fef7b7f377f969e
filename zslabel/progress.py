"""Progress of a labeling run for a person watching it: images done / total, images per second,
errors so far, ETA.

On a terminal (the stream is a TTY) one tqdm bar; otherwise (logs, ``ray job logs``, CI) one
plain line every ``interval_s`` seconds and a last line when the run ends. The driver feeds it
as committed output files come back from the pipeline (``update(rows, errors)``), so what it
counts is what is on disk. Free of Ray.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

# Seconds between two log lines when the stream is not a terminal: often enough to show a run
# is alive, rarely enough not to flood a job log.
LOG_INTERVAL_S = 15.0


def _duration(seconds: float) -> str:
    """``seconds`` as ``1h02m03s`` / ``2m03s`` / ``3s``."""
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """Counts committed images and shows them (see the module docstring).

    Args:
        total: images this run will write (None when unknown until the end, e.g. tar inputs).
        enabled: False (``--quiet``) shows nothing.
        stream: where to show it (default ``sys.stderr``; stdout keeps the run's summary line).
        interval_s: seconds between log lines when ``stream`` is not a terminal.
        unit: what is counted, for the messages.
        desc: what the run does, the messages' prefix ("labeling", "relabeling").
    """

    def __init__(self, total: int | None, *, enabled: bool = True, stream: TextIO | None = None,
                 interval_s: float = LOG_INTERVAL_S, unit: str = "images", desc: str = "labeling"):
        self.total, self.enabled, self.unit, self.desc = total, enabled, unit, desc
        self.stream = stream if stream is not None else sys.stderr
        self.interval_s = interval_s
        self.done = self.errors = 0
        self.t0 = time.monotonic()
        self._last_log = self.t0
        self._bar = None
        if enabled and _isatty(self.stream):
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit=" img", file=self.stream, dynamic_ncols=True,
                             desc=desc, smoothing=0.1)

    def update(self, rows: int, errors: int = 0) -> None:
        """Count ``rows`` more committed images, ``errors`` of them with an error code."""
        self.done += rows
        self.errors += errors
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(f"{self.errors} errors", refresh=False)
            self._bar.update(rows)
            return
        now = time.monotonic()
        if now - self._last_log >= self.interval_s and (self.total is None or self.done < self.total):
            self._last_log = now
            self._print(self.line())

    def rate(self) -> float:
        """Images per second since the start."""
        elapsed = time.monotonic() - self.t0
        return self.done / elapsed if elapsed > 0 else 0.0

    def line(self, final: bool = False) -> str:
        """``labeling: 120/1,000 images (12%), 8.3 images/s, 2 errors, ETA 1m46s``."""
        rate = self.rate()
        if self.total is not None:
            pct = 100.0 * self.done / self.total if self.total else 100.0
            head = f"{self.done:,}/{self.total:,} {self.unit} ({pct:.0f}%)"
        else:
            head = f"{self.done:,} {self.unit}"
        text = f"{self.desc}: {head}, {rate:.1f} {self.unit}/s, {self.errors:,} errors"
        if final:
            return text + f", took {_duration(time.monotonic() - self.t0)}"
        if self.total is not None and rate > 0 and self.done < self.total:
            return text + f", ETA {_duration((self.total - self.done) / rate)}"
        return text

    def close(self) -> None:
        """End the bar, or print the last log line (with the final counts)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(f"{self.errors} errors", refresh=False)
            self._bar.close()
            self._bar = None
        else:
            self._print(self.line(final=True))

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        elif self._bar is not None:  # the error message follows on a clean line
            self._bar.close()
            self._bar = None


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
