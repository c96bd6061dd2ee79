"""The gallery behind ``finealign serve``: its images embedded once, cached on disk, plus caption candidates.

Cache key = sha256 of (the checkpoint's identity, the gallery's file list with sizes and mtimes, the
candidate-caption file's size and mtime, the image size). The checkpoint's identity is its ``meta.json``
(which lists the sha256 of every checkpoint file) when it has one, else the sha256 of the files in the
model directory (exports, Hugging Face dirs). A changed gallery (a file added, removed, rewritten or
touched) or another checkpoint gives another key: the gallery is embedded again. The cache file holds
only tensors, strings and numbers and is read back with ``torch.load(weights_only=True)``.

Caption candidates (the "closest captions" of an uploaded image), in this order:

1. the gallery's own dataset: ``DIR/captions.jsonl`` (the ``jsonl`` source's format, image paths relative
   to DIR) or ``DIR/captions.csv`` (the ``csv`` source's: ``filepath,title``);
2. else the test split of the checkpoint's training dataset (what ``finealign retrieve --image`` ranks),
   when it can be built here (procedural sources always can; file datasets need their files);
3. else none: the API says so (``candidates.source == "none"`` with the reason).

At most ``MAX_CANDIDATES`` unique captions are kept.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger("finealign")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
CAPTION_FILES = (("captions.jsonl", "jsonl"), ("captions.csv", "csv"))
MAX_CANDIDATES = 5000
CACHE_VERSION = 1


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "finealign" / "serve"


def list_images(root: Path) -> list[Path]:
    """The gallery's image files (by suffix, recursive, sorted by relative path; hidden dirs skipped)."""
    if not root.is_dir():
        raise FileNotFoundError(f"gallery {root} is not a directory")
    out = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
           and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def checkpoint_identity(path: Path) -> str:
    """sha256 naming the model's weights (see the module docstring)."""
    h = hashlib.sha256()
    meta = path / "meta.json"
    if meta.is_file():
        h.update(meta.read_bytes())
    else:
        from ..train.checkpoint import _sha256
        for f in sorted(p for p in path.iterdir() if p.is_file()):
            h.update(f.name.encode() + b"\0" + _sha256(f).encode())
    return h.hexdigest()


def _caption_file(root: Path) -> tuple[Path, str] | None:
    for name, source in CAPTION_FILES:
        if (root / name).is_file():
            return root / name, source
    return None


def cache_key(ckpt_id: str, root: Path, files: list[Path], image_size: int) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}\0{ckpt_id}\0{image_size}\0".encode())
    extra = _caption_file(root)
    for p in files + ([extra[0]] if extra else []):
        st = p.stat()
        h.update(f"{p.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def caption_candidates(root: Path, cfg) -> tuple[list[str], str]:
    """(unique captions, where they came from) -- see the module docstring."""
    from ..config import ConfigError, from_dict, merge
    from ..data.loader import build_source
    from ..data.skips import SkipLog
    found = _caption_file(root)
    try:
        if found:
            path, source = found
            data = from_dict({"data": {"source": source, "root": str(root)}}).data
            samples, where = build_source(data, path.stem, SkipLog()), f"gallery: {path.name}"
        else:
            data = from_dict(merge(cfg.to_dict(), {"data": {"strict": False}})).data
            samples = build_source(data, data.test, SkipLog())
            where = f"training dataset: {data.source} {data.test}"
        seen: dict[str, None] = {}
        for s in samples:
            for c in s.captions:
                seen.setdefault(c, None)
            if len(seen) >= MAX_CANDIDATES:
                break
        return list(seen)[:MAX_CANDIDATES], where
    except (OSError, ValueError, KeyError, ConfigError) as e:
        if found:       # the user's own file: they should hear what is wrong with it
            raise ValueError(f"{found[0]}: cannot read gallery captions ({e})") from None
        return [], f"none (no captions.jsonl / captions.csv in the gallery, and the training data is not " \
                   f"readable here: {e})"


@dataclass
class Gallery:
    """Embedded gallery: ``names`` (relative paths of the readable images) and their ``embeds`` (N, E);
    ``skipped`` = [(name, reason)]; ``captions`` / ``caption_embeds`` (T, E) the candidates;
    ``from_cache`` tells whether this start re-used the cache."""
    root: Path
    names: list[str]
    embeds: torch.Tensor
    captions: list[str]
    caption_embeds: torch.Tensor
    captions_source: str
    skipped: list[tuple[str, str]] = field(default_factory=list)
    from_cache: bool = False
    cache_file: Path | None = None

    def path_of(self, index: int) -> Path:
        return self.root / self.names[index]

    def info(self) -> dict:
        return {"root": str(self.root), "images": len(self.names), "skipped": [list(s) for s in self.skipped],
                "from_cache": self.from_cache, "cache_file": str(self.cache_file) if self.cache_file else None,
                "captions": len(self.captions), "captions_source": self.captions_source}


def read_image(path: Path, size: int) -> torch.Tensor:
    """One image -> normalised (3, S, S); raises ValueError naming the file when PIL cannot read it."""
    from PIL import Image
    from ..data.transforms import ImageTransform, to_rgb
    try:
        with Image.open(path) as im:
            im.load()
            return ImageTransform(size, train=False)(to_rgb(im))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: cannot read image ({e})") from None


@torch.no_grad()
def embed_gallery(loaded, root: Path, batch_size: int = 64) -> tuple[list[str], torch.Tensor, list]:
    cfg, model = loaded.config, loaded.model
    names, out, skipped, batch = [], [], [], []
    files = list_images(root)

    def flush():
        if batch:
            out.append(model.encode_image(torch.stack(batch))["embed"].float())
            batch.clear()
    for p in files:
        try:
            batch.append(read_image(p, cfg.model.image_size))
            names.append(p.relative_to(root).as_posix())
        except ValueError as e:
            skipped.append((p.relative_to(root).as_posix(), str(e)))
        if len(batch) >= batch_size:
            flush()
    flush()
    embeds = torch.cat(out) if out else torch.zeros(0, model.embed_dim)
    return names, embeds, skipped


def load_gallery(loaded, root: str | Path, cache_dir: str | Path | None = None) -> Gallery:
    """Embed ``root`` with ``loaded`` (finealign.load's result), or read the cache when it is current."""
    from ..eval.runner import embed_texts
    root = Path(root).resolve()
    files = list_images(root)
    cfg = loaded.config
    key = cache_key(checkpoint_identity(Path(loaded.path)), root, files, cfg.model.image_size)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    cache_file = cache_dir / f"gallery-{key[:32]}.pt"
    if cache_file.is_file():
        try:
            state = torch.load(cache_file, map_location="cpu", weights_only=True)
            if state.get("key") == key:
                g = Gallery(root, list(state["names"]), state["embeds"], list(state["captions"]),
                            state["caption_embeds"], state["captions_source"],
                            [tuple(s) for s in json.loads(state["skipped"])], True, cache_file)
                log.info("gallery %s: %d images from the cache %s", root, len(g.names), cache_file)
                return g
        except (OSError, RuntimeError, KeyError, ValueError, EOFError) as e:
            log.warning("gallery cache %s is unreadable (%s): embedding again", cache_file, e)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in gallery {root}")
    names, embeds, skipped = embed_gallery(loaded, root)
    if not names:
        raise ValueError(f"gallery {root}: none of its {len(files)} images could be read "
                         f"(first: {skipped[0][1]})")
    captions, where = caption_candidates(root, cfg)
    cap_emb = (embed_texts(loaded.model, loaded.tokenizer, captions, cfg.model.context_length, "cpu")
               if captions else torch.zeros(0, embeds.shape[1]))
    g = Gallery(root, names, embeds, captions, cap_emb, where, skipped, False, cache_file)
    for name, why in skipped:
        log.warning("gallery: skipped %s", why)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
    torch.save({"key": key, "names": names, "embeds": embeds.contiguous(), "captions": captions,
                "caption_embeds": cap_emb.contiguous(), "captions_source": where,
                "skipped": json.dumps(skipped)}, tmp)
    os.replace(tmp, cache_file)
    log.info("gallery %s: embedded %d images (%d skipped), cached in %s", root, len(names), len(skipped),
             cache_file)
    return g
