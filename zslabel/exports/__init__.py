"""``zslabel export OUT --format NAME --output ...``: hand a finished run to the tools people use
next.

One module per format, each exposing ``NAME``, ``SUMMARY``, ``add_arguments(group)`` (its own
flags) and ``run(args) -> ExportResult``, plus a Python function doing the work
(``label_studio.export_label_studio``, ``lance.export_lance``). The registry ``FORMATS`` below is
the only list of formats (``--format`` choices and the help are read from it): adding a format
(FiftyOne, CVAT, COCO) is one module plus one line here. Modules are imported when used, so a
format's optional dependency (pylance) is needed only by that format.

Shared pieces are in ``common`` (reading a run as record batches, the result line, the
"output exists" rule). No Ray.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from ..errors import ConfigError
from .common import ExportResult, RunOutput, open_run


@dataclass(frozen=True)
class ExportFormat:
    """A registered export format: its ``--format`` name, one-line summary and module name."""

    name: str
    summary: str
    module: str

    def load(self) -> ModuleType:
        """The format's module (``zslabel.exports.<module>``)."""
        return importlib.import_module(f"{__name__}.{self.module}")


FORMATS: tuple[ExportFormat, ...] = (
    ExportFormat("label-studio", "Label Studio tasks JSON with predictions, plus the labeling config XML",
                 "label_studio"),
    ExportFormat("lance", "Lance dataset of every row, embedding as a vector column; --index adds a vector index",
                 "lance"),
)
_BY_NAME = {f.name: f for f in FORMATS}

__all__ = ["FORMATS", "ExportFormat", "ExportResult", "RunOutput", "get", "open_run"]


def get(name: str) -> ExportFormat:
    """The registered format called ``name``.

    Raises:
        ConfigError: no such format (the message lists the registered ones).
    """
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ConfigError(f"unknown export format {name!r}; formats: {', '.join(_BY_NAME)}") from None
