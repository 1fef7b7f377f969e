"""How the CLI's process takes Ctrl-C (SIGINT) and SIGTERM around a job: SIGTERM unwinds the
job as Ctrl-C does (``errors.Terminated``), and the clean-up after either is not cut short by
another. (The Ctrl-C guard around Ray's start is ``cluster``'s.)
"""

from __future__ import annotations

import contextlib
import signal
import threading

from .errors import Terminated


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block, SIGTERM raises ``errors.Terminated`` (a ``KeyboardInterrupt``) in the
    main thread, so that a job stopped by ``timeout``, Kubernetes or Slurm unwinds as after
    Ctrl-C. A second SIGTERM ends the process at once (the default action), so that cleanup
    cannot hold it. The previous handler is restored afterwards. No-op outside the main thread.
    """
    if threading.current_thread() is threading.main_thread():
        def terminated(signum, frame):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            raise Terminated()

        previous = signal.signal(signal.SIGTERM, terminated)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)
    else:
        yield


@contextlib.contextmanager
def ctrl_c_ignored():
    """Within the block (the clean-up after a first Ctrl-C or SIGTERM: a second or so), a
    further Ctrl-C is ignored. Raised inside the clean-up it was a traceback ("Exception
    ignored in atexit callback"), and ending the process at once instead left the local Ray's
    dashboard and runtime-env agents running for good. Restored afterwards. No-op outside the
    main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
