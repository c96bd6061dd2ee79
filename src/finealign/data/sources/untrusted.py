"""Checks for data read from files we did not write: captions, image paths, shard member names.

Outcomes (the same in every file-based source: csv/tsv, jsonl, coco, webdataset, emoji):

* **Captions** go through ``clean_caption``: control characters (Unicode ``Cc``: NUL, BEL, ESC, DEL,
  C1; tab / newline are plain whitespace) and lone surrogates become spaces, whitespace is collapsed, and a caption longer than
  ``MAX_CAPTION_CHARS`` is cut at the last space before that length. Both fixes are counted as
  notes ("control characters removed", "caption truncated"; ``SkipLog.note``), the sample is kept.
  A caption that is empty or whitespace-only after cleaning is skipped ("empty caption").
* **Invalid UTF-8** in a csv/tsv/jsonl line or a shard's ``.txt`` / ``.json`` member skips that
  row / sample ("invalid utf-8"); text files are read with ``errors="surrogateescape"`` so that one
  bad byte costs one row, never the file (``has_bad_bytes`` finds the escaped bytes).
* **Image paths** written in a data file must stay inside the source's roots (``data.root``, the
  data file's directory, image directories the source itself looks in): an absolute path or a
  ``..`` path leading elsewhere is skipped ("path outside root") unless ``data.allow_outside_root``.
  The check is lexical (``os.path.abspath``): symlinks placed inside the root are followed.
* **Shard members** whose key is absolute or has a ``..`` component are refused
  ("unsafe member name"); nothing is ever extracted to disk.
"""
from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterable, Sequence

MAX_CAPTION_CHARS = 4096          # longer captions are cut (the tokenizer keeps far fewer tokens)
NOTE_CONTROL = "control characters removed"
NOTE_TRUNCATED = "caption truncated"


# Unicode Cc (U+0000-001F, U+007F-009F) minus what str.split() treats as whitespace (\t-\r, \x1c-\x1f,
# \x85), plus lone surrogates (Cs); a regex so that clean captions cost one C-level scan
_ESCAPED = re.compile("[\udc80-\udcff]")      # bytes that were not UTF-8, under errors="surrogateescape"
_BAD_CHARS = re.compile("[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f\ud800-\udfff]")


def clean_caption(x: Any) -> tuple[str, list[str]]:
    """``x`` -> ``(caption, notes)``: str, control characters / lone surrogates removed, whitespace
    collapsed, cut to ``MAX_CAPTION_CHARS``. ``notes`` lists what was fixed (see module doc)."""
    if x is None:
        return "", []
    s = str(x)
    notes: list[str] = []
    if _BAD_CHARS.search(s):
        s = _BAD_CHARS.sub(" ", s)
        notes.append(NOTE_CONTROL)
    s = " ".join(s.split())
    if len(s) > MAX_CAPTION_CHARS:
        cut = s[:MAX_CAPTION_CHARS]
        if s[MAX_CAPTION_CHARS] != " " and " " in cut:
            cut = cut[: cut.rindex(" ")]
        s = cut.rstrip()
        notes.append(NOTE_TRUNCATED)
    return s, notes


def has_bad_bytes(text: str) -> bool:
    """True if ``text`` (read with ``errors="surrogateescape"``) came from invalid UTF-8."""
    return _ESCAPED.search(text) is not None


def decode_utf8(raw: bytes) -> str | None:
    """Strict UTF-8 decode (a leading BOM dropped); None if the bytes are not valid UTF-8."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None


def _abs(p: Path | str) -> str:
    return os.path.abspath(os.path.expanduser(str(p)))


def inside(path: str, roots: Iterable[Path | str]) -> bool:
    """Whether ``path`` (made absolute, ``..`` resolved lexically) lies in one of ``roots``."""
    ap = _abs(path)
    for r in roots:
        ra = _abs(r)
        if ap == ra or ap.startswith(ra.rstrip(os.sep) + os.sep):
            return True
    return False


def keep_inside(cands: Sequence[str], roots: Iterable[Path | str] | None) -> tuple[str, ...]:
    """The candidates that lie inside ``roots`` (all of them when ``roots`` is None)."""
    if roots is None:
        return tuple(cands)
    roots = [r for r in roots if r is not None]
    return tuple(c for c in cands if inside(c, roots))


def unsafe_member_name(key: str) -> bool:
    """A shard member key that is absolute or climbs out with ``..`` (either slash style)."""
    if not key:
        return True
    for pure in (PurePosixPath(key), PureWindowsPath(key)):
        if pure.is_absolute() or pure.anchor or ".." in pure.parts:
            return True
    return False


def note_all(skips, notes: Sequence[str], where: str) -> None:
    for n in notes:
        skips.note(n, where)
