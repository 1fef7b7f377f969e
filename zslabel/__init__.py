"""zslabel: zero-shot image labeling at scale (Ray Data + CLIP-family models -> Parquet).

Python API: ``run_label_job(JobConfig(...))``; CLI: ``zslabel label`` / ``python -m zslabel``.
"""

from .config import JobConfig
from .errors import ZslabelError

__all__ = ["JobConfig", "ZslabelError", "run_label_job"]


def run_label_job(config: JobConfig):
    """Run a labeling job (see ``zslabel.pipeline.run_label_job``); imported lazily to keep
    ``import zslabel`` free of Ray."""
    from .pipeline import run_label_job as _run

    return _run(config)
