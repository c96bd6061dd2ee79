"""Sources "csv" and "tsv": image/caption tables in the open_clip convention.

The first line is a header; ``cfg.image_key`` names the image-path column and ``cfg.caption_key``
the caption column (defaults ``filepath`` / ``title`` as in open_clip). The delimiter is
``cfg.separator`` or ``,`` (csv) / tab (tsv). TSV files are read without quote processing
(captions may contain ``"``), CSV files with standard quoting.

The split value (``cfg.train`` etc.) is a file: absolute, relative to ``cfg.root`` or a bare name
(``train`` -> ``root/train.csv``). Image paths are relative to the table's directory (then root).

Rows sharing the same image path become one ``Sample`` with several captions (retrieval with
5 captions per image); ``image_id`` is the index of the unique image. Malformed rows are reported
as ``skips.skip(reason, "file:line")``: "wrong field count", "empty caption", "empty image path",
"invalid utf-8" (the row's bytes), "path outside root" (absolute / ``..`` image path leaving the
table's directory and ``data.root``, unless ``data.allow_outside_root``); captions are cleaned as in
``untrusted.clean_caption`` (fixes counted as notes). A NUL byte or an unterminated quote that the
``csv`` module rejects raises ``SourceFormatError`` naming file and line.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

from ...config import DataConfig
from ...registry import SOURCES
from ..skips import SkipLog
from .common import (LazyImage, SampleGrouper, SourceFormatError, image_candidates,
                     missing_column_error, resolve_split_file, root_dir, source_roots)
from .untrusted import clean_caption, has_bad_bytes, note_all
from ...types import Sample

_FIELD_LIMIT_SET = False


def _raise_field_limit() -> None:
    """Allow very long fields (long captions) once per process."""
    global _FIELD_LIMIT_SET
    if not _FIELD_LIMIT_SET:
        limit = sys.maxsize
        while True:
            try:
                csv.field_size_limit(limit)
                break
            except OverflowError:
                limit //= 10
        _FIELD_LIMIT_SET = True


def read_table(path: Path, cfg: DataConfig, delimiter: str, quoting: int,
               skips: SkipLog) -> list[Sample]:
    """Parse one csv/tsv file into unique-image Samples (several captions per image)."""
    _raise_field_limit()
    roots = source_roots(cfg, path.parent)
    rdir = root_dir(cfg)
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        try:
            grouper = _read_rows(path, cfg, reader, delimiter, skips, roots, rdir)
        except csv.Error as e:   # NUL byte, unterminated quote at EOF: the file itself is broken
            raise SourceFormatError(f"{path}:{reader.line_num}: malformed table ({e})") from None
    # the key is the resolved primary path so that skip reports point at a real file
    for s in grouper.samples:
        s.key = s.load_image.candidates[0]
    return grouper.samples


def _read_rows(path: Path, cfg: DataConfig, reader, delimiter: str, skips: SkipLog, roots,
               rdir) -> SampleGrouper:
    """Header + rows of one table -> grouped Samples (bad rows skipped as file:line)."""
    grouper = SampleGrouper()
    cands_of: dict[str, tuple[str, ...]] = {}   # rows repeat image paths (5 captions per image)
    header = None
    for row in reader:
        if row and any(c.strip() for c in row):
            header = [c.strip() for c in row]
            break
    if header is None:
        raise SourceFormatError(f"{path}: empty file (expected a header line with columns "
                                f"{cfg.image_key!r} and {cfg.caption_key!r})")
    cols = {}
    for name in (cfg.image_key, cfg.caption_key):
        if name not in header:
            hint = ""
            if len(header) == 1 and len(header[0]) > len(name):
                hint = f" (is the delimiter {delimiter!r} right? set data.separator)"
            err = missing_column_error(path, name, header)
            raise SourceFormatError(str(err) + hint)
        cols[name] = header.index(name)
    i_img, i_cap = cols[cfg.image_key], cols[cfg.caption_key]
    first = reader.line_num + 1              # the line the next row starts on (a quoted field may span lines)
    for row in reader:
        where, first = f"{path}:{first}", reader.line_num + 1
        if not row or not any(c.strip() for c in row):
            continue  # blank line
        if len(row) != len(header):
            skips.skip("wrong field count", where)
            continue
        if any(has_bad_bytes(c) for c in row):
            skips.skip("invalid utf-8", where)
            continue
        img, (cap, notes) = row[i_img].strip(), clean_caption(row[i_cap])
        if not img:
            skips.skip("empty image path", where)
            continue
        if not cap:
            skips.skip("empty caption", where)
            continue
        cands = cands_of.get(img)
        if cands is None:
            cands = cands_of[img] = image_candidates(img, path, rdir, roots=roots)
        if not cands:
            skips.skip("path outside root", where)
            continue
        note_all(skips, notes, where)
        grouper.add(img, LazyImage(*cands, max_pixels=cfg.max_image_pixels), [cap], source=where)
    return grouper


def _build(cfg: DataConfig, split: str, skips: SkipLog, default_sep: str,
           suffixes: tuple[str, ...]) -> list[Sample]:
    path = resolve_split_file(cfg, split, suffixes)
    sep = cfg.separator or default_sep
    sep = {"\\t": "\t", "tab": "\t"}.get(sep, sep)
    if len(sep) != 1:
        raise SourceFormatError(f"data.separator must be a single character, got {sep!r}")
    quoting = csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL
    return read_table(path, cfg, sep, quoting, skips)


@SOURCES.register("csv")
def build_csv(cfg: DataConfig, split: str, skips: SkipLog) -> list[Sample]:
    """Comma-separated table (``cfg.separator`` overrides the delimiter)."""
    return _build(cfg, split, skips, ",", (".csv",))


@SOURCES.register("tsv")
def build_tsv(cfg: DataConfig, split: str, skips: SkipLog) -> list[Sample]:
    """Tab-separated table (no quote processing)."""
    return _build(cfg, split, skips, "\t", (".tsv", ".txt"))
