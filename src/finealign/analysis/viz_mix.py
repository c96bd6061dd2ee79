"""``finealign viz mix``: what the mixer does to a few validation pairs of a run.

One row per target image: the target with the window that is replaced (red), the source (the batch
reversed) with the window pasted from it (green), both images' patch scores (the PTA head's z-scored
log-probability, or the patch-text relevance without a PTA head / region data), and the mixed image
with its λ (the share of the target that remains). The run's own mixer is used unless ``mixer`` names
another (timix, cutmix, mixup).
"""
from __future__ import annotations

import random
from pathlib import Path

import torch

from ..config import MixerConfig
from ..mixing import build_mixer
from ..pipeline import Pipeline


def _batch(loaded, split: str, num: int):
    from ..data.loader import Collator, PairDataset, build_source
    from ..data.skips import SkipLog
    from ..data.transforms import ImageTransform
    cfg = loaded.config
    samples = list(build_source(cfg.data, split, SkipLog()))[: max(num * 4, num)]
    ds = PairDataset(samples, ImageTransform(cfg.model.image_size, train=False), train=False)
    items = []
    for i in range(len(ds)):
        item = ds[i]
        if isinstance(item, dict) and all(item["image_id"] != x["image_id"] for x in items):
            items.append(item)
        if len(items) == num:
            break
    if len(items) < 2:
        raise ValueError(f"viz mix needs at least 2 images from split {split!r}, found {len(items)}")
    return Collator(loaded.tokenizer, cfg.model.context_length)(items)


@torch.no_grad()
def mix_panels(loaded, split: str = "val", num: int = 4, mixer: str | None = None, seed: int = 0) -> dict:
    """The batch, its patch scores (B, N), the Mix, and whether the scores came from the PTA head."""
    cfg = loaded.config
    model = loaded.model.eval()
    mcfg = MixerConfig(**{**cfg.mixer.__dict__, "type": mixer or cfg.mixer.type or "timix"})
    batch = _batch(loaded, split, num)
    pipe = Pipeline(model, cfg.masking, loaded.tokenizer if cfg.masking.mlm or cfg.masking.sync else None,
                    needs=set(), mixer=mcfg)
    feats = model.encode(batch)
    scores = pipe.mix_scores(feats, batch)                                          # (B, N)
    mix = build_mixer(mcfg, cfg.model.patch_size)(batch.images, scores, random.Random(seed))
    return {"batch": batch, "scores": scores, "mix": mix, "by_pta": bool(feats.extras.get("mix_by_pta", 0)),
            "grid": model.visual.grid, "patch": cfg.model.patch_size, "mixer": mcfg.type}


def _outline(ax, window, p, colour):
    import matplotlib.patches as mpatches
    r, c, s = (int(v) for v in window)
    ax.add_patch(mpatches.Rectangle((c * p - 0.5, r * p - 0.5), s * p, s * p, fill=False, edgecolor=colour,
                                    linewidth=2))


def save_mix_figure(loaded, out: str | Path, split: str = "val", num: int = 4, mixer: str | None = None,
                    seed: int = 0) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ..data.transforms import denormalize

    pan = mix_panels(loaded, split, num, mixer, seed)
    batch, mix, g, p = pan["batch"], pan["mix"], pan["grid"], pan["patch"]
    B = len(batch)
    score_name = "PTA scores" if pan["by_pta"] else "relevance"
    cols = ["target", "source", f"target {score_name}", f"source {score_name}", "mixed"]
    fig, axes = plt.subplots(B, len(cols), figsize=(2.6 * len(cols), 2.6 * B + 0.4), squeeze=False)
    for i in range(B):
        j = int(mix.source[i])
        tiles = [denormalize(batch.images[i]).permute(1, 2, 0), denormalize(batch.images[j]).permute(1, 2, 0),
                 pan["scores"][i].reshape(g, g), pan["scores"][j].reshape(g, g),
                 denormalize(mix.images[i]).permute(1, 2, 0)]
        for k, (ax, arr) in enumerate(zip(axes[i], tiles)):
            heat = arr.ndim == 2
            ax.imshow(arr.float().numpy(), cmap="inferno" if heat else None, interpolation="nearest",
                      extent=(-0.5, g * p - 0.5, g * p - 0.5, -0.5) if heat else None)
            ax.axis("off")
            if mix.target_window is not None and k in (0, 2):
                _outline(ax, mix.target_window[i], p, "red")
            if mix.source_window is not None and k in (1, 3):
                _outline(ax, mix.source_window[i], p, "lime")
            title = cols[k] if i == 0 else ""
            if k == 4:
                title = f"mixed  λ={float(mix.lam[i]):.2f}"
            if k == 0:
                title = (title + "\n" if title else "") + batch.captions[i][:32]
            ax.set_title(title, fontsize=8)
    fig.suptitle(f"mixer: {pan['mixer']} (red: window replaced in the target, green: taken from the source)",
                 fontsize=9)
    fig.tight_layout()
    from .viz import save_figure
    return save_figure(fig, out, plt)
