"""Name patterns, as text: glob metacharacters, brace ranges (bash's rules), and the part of an
HTTP(S) URL a kind is told by. No filesystem is asked here (``zslabel.storage`` globs and asks
whether a name exists); no Ray.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from .errors import InputError

_GLOB_CHARS = re.compile(r"[*?\[]")
_HTTP = re.compile(r"(?i)^https?://")


def is_http_url(uri: str) -> bool:
    """Whether ``uri`` is an ``http(s)://`` URL (any case), whose ``?`` starts its query."""
    return bool(_HTTP.match(uri))


def kind_name(uri: str) -> str:
    """The part of ``uri`` its kind is told by (``.tar``, ``.parquet``, ``.csv``): an HTTP(S) URL
    without its query and fragment (a presigned ``shard.tar?X-Amz-Signature=..``, a hub file's
    ``?download=true``), anything else as it is."""
    if not is_http_url(uri):
        return uri
    return urlsplit(uri)._replace(query="", fragment="").geturl()


def has_glob(uri: str) -> bool:
    """True when the path part of ``uri`` holds a glob metacharacter (``*``, ``?``, ``[``); an
    HTTP(S) URL's query is no part of it (its ``?`` starts the query)."""
    if is_http_url(uri):
        return bool(_GLOB_CHARS.search(urlsplit(uri).path))
    return bool(_GLOB_CHARS.search(uri.split("://", 1)[-1]))


def glob_start(path: str) -> int | None:
    """Index of the first glob metacharacter in ``path``, or None."""
    match = _GLOB_CHARS.search(path)
    return match.start() if match else None


_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?$")
_LETTERS = re.compile(r"^([A-Za-z])\.\.([A-Za-z])(?:\.\.(-?\d+))?$")
# What is left of a range that was not expanded ("{a..5}", "{1..}", "{000..004.tar").
_UNEXPANDED_RANGE = re.compile(r"\{[^{}]*\.\.")
# More names than any shard list has: a typo such as {0..99999999} is refused, not expanded.
MAX_BRACE_NAMES = 1_000_000


def _padded(bound: str) -> bool:
    """Whether a range bound asks for zero padding, as in bash: ``01``, ``-05`` (not ``0``)."""
    digits = bound[1:] if bound.startswith("-") else bound
    return len(digits) > 1 and digits.startswith("0")


def _sequence(body: str) -> list[str] | None:
    """The names of a bash sequence expression ``N..M[..STEP]`` (integers, or single ASCII
    letters), or None when ``body`` is none. The step's sign is ignored (the direction goes from
    ``N`` to ``M``) and a step of 0 is 1; integers keep the zero padding of a bound written
    with a leading zero (the width of the wider bound, sign included), as bash pads."""
    rng = _RANGE.match(body)
    letters = None if rng else _LETTERS.match(body)
    match = rng or letters
    if match is None:
        return None
    lo, hi, step_text = match.groups()
    step = abs(int(step_text)) if step_text else 1
    step = step or 1
    if letters:
        a, b = ord(lo), ord(hi)
        if (abs(b - a) // step + 1) > MAX_BRACE_NAMES:
            raise InputError(f"the brace range {{{body}}} names more than {MAX_BRACE_NAMES:,} names")
        return [chr(i) for i in range(a, b + (1 if b >= a else -1), step if b >= a else -step)]
    a, b = int(lo), int(hi)
    if abs(b - a) // step + 1 > MAX_BRACE_NAMES:
        raise InputError(f"the brace range {{{body}}} names more than {MAX_BRACE_NAMES:,} names")
    width = max(len(lo), len(hi)) if _padded(lo) or _padded(hi) else 0
    return [f"{i:0{width}d}" for i in range(a, b + (1 if b >= a else -1), step if b >= a else -step)]


def _top_level_split(body: str) -> list[str]:
    """``body`` split at the commas outside nested braces."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(body):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(body[start:i])
            start = i + 1
    parts.append(body[start:])
    return parts


def _first_group(pattern: str) -> tuple[int, int, list[str]] | None:
    """``(start, end, alternatives)`` of the leftmost brace group bash would expand in
    ``pattern`` (``pattern[start:end]`` is the group, braces included), or None. As bash scans:
    a ``{`` whose group is not expandable (no comma outside nested braces, no sequence, never
    closed) is text, and the scan goes on after it."""
    for start, ch in enumerate(pattern):
        if ch != "{":
            continue
        depth = 0
        for end in range(start, len(pattern)):
            if pattern[end] == "{":
                depth += 1
            elif pattern[end] == "}":
                depth -= 1
                if depth == 0:
                    break
        else:
            continue  # never closed: text
        body = pattern[start + 1:end]
        alternatives = _top_level_split(body)
        if len(alternatives) > 1:
            return start, end + 1, alternatives
        seq = _sequence(body)
        if seq is not None:
            return start, end + 1, seq
    return None


def expand_braces(pattern: str) -> list[str]:
    """Expand shell-style braces as bash does (and WebDataset's ``braceexpand``), left to right,
    several groups as a product:

    - lists ``{x,y}`` -> x y (nested ``{a,{b,c}}`` -> a b c; ``x{a,}`` -> xa x);
    - integer ranges ``a{00..02}b`` -> a00b a01b a02b, descending ``{3..1}`` -> 3 2 1, with a
      step ``{000..004..2}`` -> 000 002 004 (its sign ignored, 0 read as 1); a bound written
      with a leading zero (``01``, ``-05``, not ``0``) pads every name to the wider bound's
      width, sign included;
    - letter ranges ``{a..c}`` -> a b c, ``{a..e..2}`` -> a c e (single ASCII letters).

    A group with neither ``..`` nor a comma (``{literal}``) and a ``{`` never closed are kept
    as written, as bash keeps them.

    Raises:
        InputError: a group that looks like a range but is none (``{a..5}``, ``{1..}``,
            ``{aa..c}``, ``{000..004.tar``): bash would keep it as text, which names no file;
            or a pattern naming more than ``MAX_BRACE_NAMES`` names.
    """
    out: list[str] = []
    todo = [pattern]
    while todo:
        one = todo.pop()
        group = _first_group(one)
        if group is None:
            unexpanded = _UNEXPANDED_RANGE.search(one)
            if unexpanded:
                close = one.find("}", unexpanded.start())
                bad = one[unexpanded.start():close + 1] if close >= 0 else one[unexpanded.start():] + " (never closed)"
                raise InputError(
                    f"cannot expand the brace group {bad} in {pattern}: a range is {{N..M}} or "
                    "{N..M..STEP} of integers (zero padding kept: {000..099}) or of single letters ({a..f}), "
                    "a list is {x,y,z}, and every { needs its }")
            out.append(one)
            if len(out) > MAX_BRACE_NAMES:
                raise InputError(f"{pattern} names more than {MAX_BRACE_NAMES:,} names")
            continue
        start, end, alternatives = group
        head, tail = one[:start], one[end:]
        # Reversed onto the stack, so that names come out in order.
        todo.extend(head + alt + tail for alt in reversed(alternatives))
    return out
