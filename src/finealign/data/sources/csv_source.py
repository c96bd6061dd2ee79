"""Sources "csv" and "tsv": image/caption tables in the open_clip convention.

The first line is a header; ``cfg.image_key`` names the image-path column and ``cfg.caption_key``
the caption column (defaults ``filepath`` / ``title`` as in open_clip). The delimiter is
``cfg.separator`` or ``,`` (csv) / tab (tsv). TSV files are read without quote processing
(captions may contain ``"``), CSV files with standard quoting.

The split value (``cfg.train`` etc.) is a file: absolute, relative to ``cfg.root`` or a bare name
(``train`` -> ``root/train.csv``). Image paths are relative to the table's directory (then root).

Rows sharing the same image path become one ``Sample`` with several captions (retrieval with
5 captions per image); ``image_id`` is the index of the unique image. Malformed rows are reported
as ``skips.skip(reason, "file:line")``: "wrong field count", "empty caption", "empty image path".
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

from ...config import DataConfig
from ...registry import SOURCES
from ..skips import SkipLog
from .common import (LazyImage, SampleGrouper, SourceFormatError, clean_text, image_candidates,
                     missing_column_error, resolve_split_file, root_dir)
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
    rdir = root_dir(cfg)
    grouper = SampleGrouper()
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
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
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if not row or not any(c.strip() for c in row):
                continue  # blank line
            if len(row) != len(header):
                skips.skip("wrong field count", where)
                continue
            img, cap = row[i_img].strip(), clean_text(row[i_cap])
            if not img:
                skips.skip("empty image path", where)
                continue
            if not cap:
                skips.skip("empty caption", where)
                continue
            cands = image_candidates(img, path, rdir)
            grouper.add(img, LazyImage(*cands), [cap], source=where)
    # the key is the resolved primary path so that skip reports point at a real file
    for s in grouper.samples:
        s.key = s.load_image.candidates[0]
    return grouper.samples


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
