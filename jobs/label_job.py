"""Entrypoint for ``ray job submit``: hands its arguments to ``zslabel label`` and exits with its code.

Usage (from the repository root)::

    ray job submit --runtime-env jobs/runtime_env.yaml -- \
        python jobs/label_job.py --config jobs/configs/s3_gpu.yaml [--output s3://...]

Every argument is passed through unchanged, so flags given after ``--config`` override the
config file exactly as they do for ``zslabel label``. No logic lives here: ``import zslabel``
works because Ray puts the job's ``working_dir`` (the repository root) on ``PYTHONPATH``.
"""

from __future__ import annotations

import sys

from zslabel.cli import main

if __name__ == "__main__":
    sys.exit(main(["label", *sys.argv[1:]]))
