"""What a report shows of a trained model: a retrieval grid and caption samples on a small eval split.

The retrieval grid is composed with PIL at a fixed layout (:func:`tile_box`): row q is a text query,
columns 0-4 its top-5 gallery images by ITC similarity; an image the query describes (the query is one
of its reference captions) is outlined green. When none is in the top 5, a sixth tile shows the best
ranked correct image outlined red with its rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

TILE, PAD, BORDER, TEXT_H = 72, 8, 4, 30
GREEN, RED, GREY = (0, 170, 0), (210, 0, 0), (200, 200, 200)
TOP = 5


@dataclass
class Gallery:
    samples: list            # unique-image Samples (finealign.types.Sample)
    images: list             # PIL RGB images, same order
    skipped: int             # images that could not be read (counted, not shown)


def load_gallery(cfg, split: str, limit: int) -> Gallery:
    """The first ``limit`` readable unique images of ``split`` of the run's data source."""
    from ..data.loader import build_source, unique_images
    from ..data.skips import SkipLog
    from ..data.transforms import to_rgb
    samples, images, skipped = [], [], 0
    for s in unique_images(build_source(cfg.data, split, SkipLog())):
        if len(samples) == limit:
            break
        try:
            im = to_rgb(s.load_image())
            im.load()
        except (OSError, ValueError):
            skipped += 1
            continue
        samples.append(s)
        images.append(im)
    if len(samples) < 2:
        raise ValueError(f"split {split!r} of data.source={cfg.data.source} (root {cfg.data.root}) has "
                         f"{len(samples)} readable image(s); the report needs at least 2")
    return Gallery(samples, images, skipped)


@torch.no_grad()
def embed_gallery(loaded, gallery: Gallery, batch_size: int = 64) -> torch.Tensor:
    from ..data.transforms import ImageTransform
    tf = ImageTransform(loaded.config.model.image_size, train=False)
    out = []
    for i in range(0, len(gallery.images), batch_size):
        x = torch.stack([tf(im) for im in gallery.images[i:i + batch_size]])
        out.append(loaded.model.encode_image(x)["embed"].float())
    return torch.cat(out)                                                 # (G, E)


def pick_queries(gallery: Gallery, num: int) -> list[int]:
    """``min(num, n)`` distinct gallery positions spread evenly over the n images, first and last included
    (each gives its first caption)."""
    n = len(gallery.samples)
    k = min(num, n)
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})


def _norm(text: str) -> str:
    return " ".join(text.split())


@torch.no_grad()
def retrieval_rows(loaded, gallery: Gallery, img: torch.Tensor, num: int) -> list[dict]:
    """Per query: {"query", "source": gallery index, "top": [indices], "correct": [indices], "rank": 1-based
    rank of the best correct image}. Scores are ITC cosine similarities (no ITM re-ranking)."""
    from ..eval.runner import embed_texts
    cfg, tok = loaded.config, loaded.tokenizer
    picks = [i for i in pick_queries(gallery, num) if gallery.samples[i].captions]
    queries = [_norm(gallery.samples[i].captions[0]) for i in picks]
    txt = embed_texts(loaded.model, tok, queries, cfg.model.context_length, "cpu")   # (Q, E)
    order = (txt @ img.t()).argsort(dim=1, descending=True)                       # (Q, G)
    rows = []
    for q, src, ranked in zip(queries, picks, order.tolist()):
        correct = [j for j, s in enumerate(gallery.samples) if q in {_norm(c) for c in s.captions}]
        rank = min(ranked.index(j) for j in correct) + 1
        rows.append({"query": q, "source": src, "top": ranked[:TOP], "correct": correct, "rank": rank,
                     "best_correct": ranked[rank - 1]})
    return rows


def tile_box(row: int, col: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of tile (row, col) in the grid image, border included."""
    x = PAD + col * (TILE + PAD)
    y = PAD + row * (TEXT_H + TILE + PAD) + TEXT_H
    return x, y, x + TILE, y + TILE


def _fit(draw, text: str, font, width: int) -> str:
    """``text`` cut (with an ellipsis) to at most ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def draw_retrieval_grid(gallery: Gallery, rows: list[dict], out: Path) -> Path:
    from PIL import Image, ImageDraw, ImageFont
    width = PAD + (TOP + 1) * (TILE + PAD)
    height = PAD + len(rows) * (TEXT_H + TILE + PAD)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:                                     # Pillow < 10.1: fixed-size bitmap font
        font = ImageFont.load_default()
    inner = TILE - 2 * BORDER
    for r, row in enumerate(rows):
        x0, y0 = PAD, PAD + r * (TEXT_H + TILE + PAD)
        draw.text((x0, y0 + 6), _fit(draw, f'{r + 1}. "{row["query"]}"', font, TOP * (TILE + PAD) - PAD),
                  fill="black", font=font)
        tiles = [(j, GREEN if j in row["correct"] else GREY) for j in row["top"]]
        if row["rank"] > TOP:
            tiles.append((row["best_correct"], RED))
        for c, (j, colour) in enumerate(tiles):
            box = tile_box(r, c)
            draw.rectangle(box, fill=colour)
            thumb = gallery.images[j].resize((inner, inner))
            canvas.paste(thumb, (box[0] + BORDER, box[1] + BORDER))
        if row["rank"] > TOP:
            draw.text((tile_box(r, TOP)[0], y0 + 6), f"rank {row['rank']}", fill=RED, font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


@torch.no_grad()
def caption_samples(loaded, gallery: Gallery, num: int, out_dir: Path, stem: str) -> list[dict]:
    """Generated captions (the run's eval.decode) for ``num`` gallery images -> [{"image": png, "key",
    "references", "generated"}]; the images are written to ``out_dir`` upscaled to 128 px."""
    from ..data.transforms import ImageTransform
    cfg, tok, model = loaded.config, loaded.tokenizer, loaded.model
    picks = pick_queries(gallery, num)
    tf = ImageTransform(cfg.model.image_size, train=False)
    x = torch.stack([tf(gallery.images[i]) for i in picks])
    ids = model.generate(x, tok.bos_id, tok.eos_id, tok.pad_id, **cfg.eval.decoding(),
                         generator=torch.Generator().manual_seed(0))
    out = []
    for k, (i, row) in enumerate(zip(picks, ids)):
        png = out_dir / f"{stem}_caption_{k}.png"
        out_dir.mkdir(parents=True, exist_ok=True)
        gallery.images[i].resize((128, 128)).save(png)
        s = gallery.samples[i]
        out.append({"image": png, "key": s.key, "references": list(s.captions),
                    "generated": tok.decode(row.tolist())})
    return out
