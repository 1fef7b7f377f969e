"""Development helpers, not shipped with zslabel: offline tiny checkpoints (``tiny``) and the
synthetic shapes data set (``shapes``) used by tests, benchmarks and scripts/train_shapes_clip.py,
and tasks-at-once from Ray's task timeline (``timeline``).

Importable from the repository root (pytest sets ``pythonpath = ["."]``; scripts and benchmarks
put the root on ``sys.path``)."""
