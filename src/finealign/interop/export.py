"""Exported models: one directory with what rebuilds a model for inference, no training state.

``finealign export SRC OUT_DIR`` (SRC: anything ``finealign.load`` reads -- a run or checkpoint directory, an
export, a Hugging Face CLIPModel directory) writes::

    OUT_DIR/model.safetensors   weights; tied tensors stored once and listed in the file's "aliases"
                                metadata (the checkpoint format, read by train/checkpoint.py's loader)
    OUT_DIR/config.yaml         the resolved finealign config (a Hugging Face text tower's config.json rides
                                inside, as model.text_hf_config, so no model.text_path is needed to load)
    OUT_DIR/tokenizer.json      the model's tokenizer (absent only for a CLIP import that had none)
    OUT_DIR/export.json         {"format": "finealign-export", "version": 1, "files": {name: sha256}}, last

Each file is written under a temporary name and renamed, export.json last; ``load_export`` checks the hashes.
``finealign.load(OUT_DIR)`` / ``finealign.from_pretrained(OUT_DIR)`` read it back (:func:`load_export`).
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import torch
import yaml

from ..train.checkpoint import _sha256

FORMAT = "finealign-export"
VERSION = 1
FILES = ("model.safetensors", "config.yaml", "tokenizer.json")
MARKER = "export.json"


class ExportError(ValueError):
    """An export directory that is incomplete, corrupt or would be overwritten."""


def is_export_dir(path: str | Path) -> bool:
    """An export: export.json, or (hand-made) model.safetensors + config.yaml without checkpoint files."""
    p = Path(path)
    if not p.is_dir():
        return False
    if (p / MARKER).is_file():
        return True
    return ((p / "model.safetensors").is_file() and (p / "config.yaml").is_file()
            and not (p / "meta.json").exists() and not (p / "state.pt").exists())


def _write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def export(src, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write ``src`` (a ``Loaded`` or a path ``finealign.load`` reads) to ``out_dir``; returns ``out_dir``."""
    from safetensors.torch import save_file
    from ..api import Loaded, load
    from ..train.checkpoint import _dedup_state_dict, _unwrap
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory")
    clash = [f for f in FILES + (MARKER,) if (out / f).exists()]
    if clash and not overwrite:
        raise ExportError(f"{out} already holds an export ({', '.join(clash)}); pass --force to overwrite")
    others = sorted(p.name for p in out.iterdir() if p.name not in FILES + (MARKER,)) if out.is_dir() else []
    if others:
        raise ExportError(f"{out} holds other files ({', '.join(others[:5])}{', ...' if len(others) > 5 else ''}): "
                          f"an export goes into a new or empty directory (or over an earlier export, with --force)")
    loaded = src if isinstance(src, Loaded) else load(src)
    out.mkdir(parents=True, exist_ok=True)
    # until the final marker replaces it, this one says the files are in flux: an interrupted export (or
    # overwrite) is refused on load, never read as a hand-made export of mixed old and new files
    _write(out / MARKER, lambda p: p.write_text(json.dumps({"format": FORMAT, "incomplete": True})))
    weights, aliases = _dedup_state_dict(_unwrap(loaded.model).state_dict())
    meta = {"format": "pt", "finealign_export": str(VERSION), "aliases": json.dumps(aliases)}
    def write_weights(p: Path) -> None:
        save_file(weights, str(p), metadata=meta)
        os.chmod(p, 0o644)                       # readable like the other files (safetensors writes 0600)
    _write(out / "model.safetensors", write_weights)
    text = yaml.safe_dump(loaded.config.to_dict(), sort_keys=False)
    _write(out / "config.yaml", lambda p: p.write_text(text))
    names = ["model.safetensors", "config.yaml"]
    if loaded.tokenizer is not None:
        _write(out / "tokenizer.json", lambda p: p.write_text(loaded.tokenizer.to_str()))
        names.append("tokenizer.json")
    elif (out / "tokenizer.json").exists():
        (out / "tokenizer.json").unlink()
    marker = {"format": FORMAT, "version": VERSION, "torch": torch.__version__,
              "files": {n: _sha256(out / n) for n in names}}
    _write(out / MARKER, lambda p: p.write_text(json.dumps(marker, indent=1)))
    return out


def load_export(path: str | Path, device: str | torch.device = "cpu"):
    """An export directory -> ``finealign.api.Loaded`` (hashes checked when export.json is present)."""
    from ..api import Loaded
    from ..config import from_dict
    from ..data.tokenizer import Tokenizer
    from ..models.factory import build_model
    from ..train import checkpoint as ckpt
    p = Path(path)
    if (p / MARKER).is_file():
        try:
            marker = json.loads((p / MARKER).read_text())
        except ValueError as e:
            raise ExportError(f"{p / MARKER} is corrupt: {e}") from None
        if isinstance(marker, dict) and marker.get("incomplete"):
            raise ExportError(f"{p}: the export into it was interrupted (files may be mixed); run "
                              f"`finealign export CHECKPOINT {p} --force` again")
        try:
            files = marker["files"]
        except (KeyError, TypeError) as e:
            raise ExportError(f"{p / MARKER} is corrupt: {e}") from None
        if marker.get("format") != FORMAT:
            raise ExportError(f"{p / MARKER}: not a finealign export (format {marker.get('format')!r})")
        for name, digest in files.items():
            if not (p / name).is_file():
                raise ExportError(f"{p / name} is missing (listed in {MARKER})")
            if _sha256(p / name) != digest:
                raise ExportError(f"{p / name} is corrupt: sha256 differs from {MARKER}")
    for name in ("model.safetensors", "config.yaml"):
        if not (p / name).is_file():
            raise ExportError(f"{p / name} is missing: incomplete export")
    try:
        raw = yaml.safe_load((p / "config.yaml").read_text()) or {}
    except yaml.YAMLError as e:
        raise ExportError(f"{p / 'config.yaml'} is not valid YAML: {e}") from None
    cfg = from_dict(raw)
    tokenizer = Tokenizer.load(p) if (p / "tokenizer.json").is_file() else None
    if tokenizer is None and cfg.model.vocab_size <= 0:
        raise ExportError(f"{p / 'tokenizer.json'} is missing and the config has no model.vocab_size")
    model = build_model(cfg.model, tokenizer.vocab_size if tokenizer is not None else 0, full=cfg,
                        tokenizer=tokenizer, pretrained=False)
    ckpt.load_weights(model, p)
    model.to(device).eval()
    return Loaded(model=model, tokenizer=tokenizer, config=cfg, path=p)
