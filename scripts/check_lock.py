#!/usr/bin/env python3
"""Check that requirements/lock.txt and pyproject.toml agree, and that declared == imported.

1. Every dependency of ``[project].dependencies`` and of the extras the lock covers
   (``LOCKED_EXTRAS``) is pinned in the lock (``name==version``), and the pin lies inside the
   declared range. (The lock holds the whole installed closure, so it pins more than that.)
2. The third-party modules imported by ``zslabel/`` are exactly the runtime dependencies, up to
   ``RUNTIME_ONLY`` (needed at run time but never imported by name); those imported by
   ``tests/`` are declared as runtime or ``test`` dependencies.

Imports are found with ``ast`` (every ``import`` statement, also inside functions); module
names map to distributions through the installed metadata
(``importlib.metadata.packages_distributions``), so run this with the project's venv.

Exit status 0 when consistent, 1 with one line per problem otherwise. Used by ``.ci/run``
and ``tests/test_install.py``.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"
# The extras CI and scripts/setup.sh install (gcs/azure are optional and not locked).
LOCKED_EXTRAS = ("s3", "test", "cluster", "lint")
# Declared runtime dependencies that zslabel never imports by name, and why they are declared.
RUNTIME_ONLY = {
    "safetensors": "transformers reads *.safetensors checkpoints with it",
}
# The environment the lock is for: markers are evaluated against it.
LOCK_ENV = {"python_version": "3.11", "python_full_version": "3.11.7", "sys_platform": "linux",
            "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
            "implementation_name": "cpython", "platform_python_implementation": "CPython"}


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """``{canonical name: version}`` of the ``name==version`` lines of a lock file.

    Raises:
        ValueError: a line that is neither a comment nor an exact pin.
    """
    pins = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not version or any(c in version for c in "<>=!~,; "):
            raise ValueError(f"{path.name}:{n}: not an exact pin: {line!r}")
        pins[canonicalize_name(name)] = version.strip()
    return pins


def declared(pyproject: dict, extras=("",)) -> list[Requirement]:
    """Requirements of ``[project].dependencies`` ("" in ``extras``) and the named extras."""
    project = pyproject["project"]
    out = []
    for extra in extras:
        reqs = project["dependencies"] if extra == "" else project["optional-dependencies"][extra]
        out += [Requirement(r) for r in reqs]
    return out


def lock_problems(pyproject: dict, pins: dict[str, str]) -> list[str]:
    """One message per declared dependency missing from the lock or pinned outside its range."""
    problems = []
    for req in declared(pyproject, ("", *LOCKED_EXTRAS)):
        if req.marker is not None and not req.marker.evaluate(LOCK_ENV):
            continue
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{req} is declared in pyproject.toml but not pinned in requirements/lock.txt")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"requirements/lock.txt pins {name}=={pins[name]}, outside pyproject.toml's {req}")
    return problems


def imported_modules(folder: Path) -> set[str]:
    """Top-level names of the absolute imports in the ``*.py`` files under ``folder``,
    without the standard library and the folder's own modules."""
    local = {p.stem for p in [*folder.rglob("*.py"), *(ROOT / "scripts").glob("*.py")]} | {folder.name, "zslabel", "zslabel_dev"}
    local |= {p.name for p in folder.rglob("*") if p.is_dir()}
    names, optional = set(), set()
    for path in folder.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            # `try: import x / except ImportError:` is an optional import, not a dependency.
            if isinstance(node, ast.Try) and any(
                    isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                    for h in node.handlers):
                optional |= {n for b in node.body for n in _top_names(b)}
            names |= _top_names(node)
    names -= optional
    return {n for n in names if n not in sys.stdlib_module_names and n not in local and n != "__future__"}


def _top_names(node: ast.AST) -> set[str]:
    """Top-level module names an ``import`` statement imports (absolute imports only)."""
    if isinstance(node, ast.Import):
        return {a.name.split(".")[0] for a in node.names}
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return {node.module.split(".")[0]}
    return set()


def distributions_of(modules: set[str]) -> tuple[set[str], set[str]]:
    """(canonical distribution names providing ``modules``, modules no installed distribution provides)."""
    by_module = md.packages_distributions()
    dists, unknown = set(), set()
    for m in modules:
        if m in by_module:
            dists.update(canonicalize_name(d) for d in by_module[m])
        else:
            unknown.add(m)
    return dists, unknown


def import_problems(pyproject: dict) -> list[str]:
    """Declared == imported for zslabel/ (runtime) and imported <= declared for tests/."""
    problems = []
    runtime = {canonicalize_name(r.name) for r in declared(pyproject)}
    test = runtime | {canonicalize_name(r.name) for r in declared(pyproject, ("test", "s3"))}
    used, unknown = distributions_of(imported_modules(ROOT / "zslabel"))
    problems += [f"zslabel/ imports {m!r}, which no installed distribution provides" for m in sorted(unknown)]
    problems += [f"zslabel/ imports {d} but pyproject.toml does not declare it" for d in sorted(used - runtime)]
    problems += [f"pyproject.toml declares {d} but zslabel/ never imports it (use it, drop it, or list it "
                 "in RUNTIME_ONLY with the reason)" for d in sorted(runtime - used - set(RUNTIME_ONLY))]
    used, unknown = distributions_of(imported_modules(ROOT / "tests"))
    problems += [f"tests/ import {m!r}, which no installed distribution provides" for m in sorted(unknown)]
    problems += [f"tests/ import {d} but it is not a runtime or test dependency" for d in sorted(used - test)]
    return problems


def main() -> int:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    problems = lock_problems(pyproject, read_lock()) + import_problems(pyproject)
    for p in problems:
        print(f"check_lock: {p}", file=sys.stderr)
    if not problems:
        print("check_lock: requirements/lock.txt matches pyproject.toml; declared dependencies == imported")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
