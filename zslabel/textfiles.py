"""The text of the files a user hands us: labels, templates, manifests, ground truth, YAML config.

One rule for all of them, so a file saved by any common editor reads the same: UTF-8 with or
without a byte-order mark (Windows Notepad's "UTF-8 with BOM"), UTF-16 when it starts with a
UTF-16 BOM (Notepad's "Unicode"), and LF, CRLF or CR line ends. Anything else (e.g. a cp1252 or
Latin-1 file) is refused with the file's name, the byte offset of the first byte that is not
UTF-8 and the bytes around it, rather than guessed: a guessed encoding silently changes label
names, and label names are the output.

No I/O here (the input listing decodes manifests with it): ``userfiles.read_text`` reads a file
the user names and decodes it by this rule.
"""

from __future__ import annotations

import codecs
import re
from typing import Any

from .errors import ConfigError

_BOMS = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))


class TextDecodeError(ConfigError):
    """A user's text file is not UTF-8 (or BOM-marked UTF-16); names the file and byte offset.

    Attributes:
        source: the file as the user named it.
        offset: byte offset (0-based, counted from the start of the file, BOM included) of the
            first byte that cannot be decoded.
    """

    def __init__(self, source: str, offset: int, data: bytes, encoding: str):
        self.source, self.offset = source, offset
        near = data[max(0, offset - 12):offset + 12]
        super().__init__(
            f"{source}: not valid {encoding} text at byte offset {offset} (bytes near it: {near!r}); "
            "save the file as UTF-8 (e.g. `iconv -f cp1252 -t utf-8 FILE > FILE.utf8`)")


def decode_text(data: bytes, source: str) -> str:
    """Decode a user's text file: UTF-8 (BOM optional) or UTF-16 with a BOM; newlines -> ``\\n``.

    Args:
        data: the file's bytes.
        source: the name to put in errors (path or URI as the user gave it).

    Returns:
        The text without a BOM, every CRLF and lone CR turned into LF.

    Raises:
        TextDecodeError: the bytes are not valid in the detected encoding (offset in bytes).
    """
    encoding, skip = "utf-8", 0
    for bom, name in _BOMS:
        if data.startswith(bom):
            encoding, skip = name, len(bom)
            break
    try:
        text = data[skip:].decode(encoding)
    except UnicodeDecodeError as exc:
        raise TextDecodeError(source, skip + exc.start, data, encoding) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


# Lines end at LF, CRLF or CR, nothing else: ``str.splitlines`` also splits at form feeds and
# U+2028, which a name or label may hold.
LINE_END = re.compile(r"\r\n|\r|\n")


def is_comment(line: str) -> bool:
    """A comment line (already stripped): only ``#``, or ``#`` and a space first. ``#1 pick`` or
    ``#1.jpg`` is a label or an entry, not a comment."""
    return line == "#" or line.startswith("# ")


def read_lines(text: str) -> list[str]:
    """The labels (or templates) of a labels or templates file: its lines, stripped, without
    blank and comment lines (:func:`is_comment`); the same rules as a ``.txt`` manifest's."""
    return [ln for ln in (line.strip() for line in LINE_END.split(text)) if ln and not is_comment(ln)]


def load_yaml(text: str) -> Any:
    """``yaml.safe_load(text)``, except that a key given twice in one mapping is an error: PyYAML
    keeps the last silently (yaml/pyyaml#165), so ``top_k: 1`` then ``top_k: 2`` ran with 2
    and nothing said so. YAML 1.2 requires mapping keys to be unique.

    Raises:
        yaml.YAMLError: invalid YAML, or a repeated key (a ``ConstructorError`` naming its line).
    """
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: set = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark, f"found the key {key!r} twice",
                        key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
