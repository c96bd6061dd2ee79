"""Pictures of what a model does. ``finealign viz masks``: the image, its patch-text relevance, the
patches the caption head keeps, the patches TG-MIM hides, and the reconstruction. Fusion models with
synchronized masking get the SyncMask figure instead (``viz_sync``: masked words beside masked patches)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..masking import build_masker
from ..types import Batch

DEFAULT_IC = {"type": "attentive", "mask_ratio": 0.5, "mask": "least"}
DEFAULT_MIM = {"type": "attentive", "mask_ratio": 0.5, "mask": "most"}


def unpatchify(patches: torch.Tensor, p: int, grid: int) -> torch.Tensor:
    """(N, 3*p*p) in ViT patch order -> (3, grid*p, grid*p)."""
    x = patches.reshape(grid, grid, 3, p, p).permute(2, 0, 3, 1, 4)         # (3, g, p, g, p)
    return x.reshape(3, grid * p, grid * p)


@torch.no_grad()
def mask_panels(model, tokenizer, cfg, image: torch.Tensor, text: str) -> dict:
    """image (3, S, S) normalised -> dict of (H, W[, 3]) arrays for the figure, plus the masks."""
    model.eval()
    ids, tmask = tokenizer.encode_batch([text], cfg.model.context_length)
    batch = Batch(images=image[None], text=ids, text_mask=tmask, image_ids=torch.zeros(1, dtype=torch.long),
                  item_ids=torch.zeros(1, dtype=torch.long), captions=[text], keys=["viz"])
    feats = model.encode(batch)
    rel = model.patch_text_relevance(feats.image_tokens, feats.text_tokens, tmask, cfg.masking.relevance)
    ic = build_masker(cfg.masking.ic or DEFAULT_IC)(rel)
    mim = build_masker(cfg.masking.mim or DEFAULT_MIM)(rel)
    p, g = cfg.model.patch_size, model.visual.grid
    out = {"relevance": rel[0].reshape(g, g), "ic": ic, "mim": mim, "grid": g, "patch": p}
    if model.image_decoder is not None:
        pred = model.heads(feats, batch, {"mim": mim}).extras["mim_pred"][0]      # (M, 3p²)
        out["reconstruction"] = reconstruction(image, pred, mim.masked[0], p, g, _norm_pix(cfg))
    return out


def reconstruction(image: torch.Tensor, pred: torch.Tensor, masked: torch.Tensor, p: int, g: int,
                   norm_pix: bool) -> torch.Tensor:
    """The image (3, S, S) with its masked patches replaced by the predictions (M, 3p²); per-patch
    normalised predictions are shown in the true patch's scale."""
    from ..objectives.tg_mim import patchify
    target = patchify(image[None], p)[0].clone()                                  # (N, 3p²)
    if norm_pix:
        mean = target[masked].mean(-1, keepdim=True)
        std = target[masked].var(-1, keepdim=True).add(1e-6).sqrt()
        pred = pred * std + mean
    target[masked] = pred.to(target.dtype)
    return unpatchify(target, p, g)


def _norm_pix(cfg) -> bool:
    """Whether the model's pixel MIM objective (``tg_mim``, or the same loss under its generic name ``mim``)
    predicts per-patch normalised pixels; the first one switched on decides (default True)."""
    active = cfg.active_objectives()
    for name in ("tg_mim", "mim"):
        if name in active:
            return bool(active[name].get("norm_pix", True))
    return True


def _shade(img: torch.Tensor, masked: torch.Tensor, p: int, g: int) -> torch.Tensor:
    """Grey out the masked patches of img (3, S, S) in [0, 1]."""
    img = img.clone()
    for i in masked.tolist():
        r, c = divmod(i, g)
        img[:, r * p:(r + 1) * p, c * p:(c + 1) * p] = 0.5 * img[:, r * p:(r + 1) * p, c * p:(c + 1) * p] + 0.35
    return img


def save_mask_figure(loaded, image_path: str | Path, text: str, out: str | Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image
    from ..data.transforms import ImageTransform, denormalize, to_rgb

    cfg = loaded.config
    with Image.open(image_path) as im:
        im.load()
        image = ImageTransform(cfg.model.image_size, train=False)(to_rgb(im))
    if cfg.masking.sync or cfg.model.arch == "fusion":
        from .viz_sync import draw_sync_figure
        fig, _ = draw_sync_figure(loaded, image, text, plt)
        return save_figure(fig, out, plt)
    panels = mask_panels(loaded.model, loaded.tokenizer, cfg, image, text)
    p, g = panels["patch"], panels["grid"]
    shown = denormalize(image)
    tiles = [("image", shown.permute(1, 2, 0)),
             ("patch-text relevance", panels["relevance"]),
             ("IC keeps", _shade(shown, panels["ic"].masked[0], p, g).permute(1, 2, 0)),
             ("TG-MIM masks", _shade(shown, panels["mim"].masked[0], p, g).permute(1, 2, 0))]
    if "reconstruction" in panels:
        tiles.append(("reconstruction", denormalize(panels["reconstruction"]).permute(1, 2, 0)))
    fig = tile_figure(plt, tiles, height=3.4)
    fig.suptitle(f'"{text}"', fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out, plt)


def tile_figure(plt, tiles, height: float):
    """One row of panels: ``tiles`` = [(title, (H, W) heat map or (H, W, 3) image)] -> the figure."""
    fig, axes = plt.subplots(1, len(tiles), figsize=(3 * len(tiles), height))
    for ax, (title, arr) in zip(axes, tiles):
        ax.imshow(arr.float().numpy(), cmap="inferno" if arr.ndim == 2 else None, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    return fig


def save_figure(fig, out, plt, dpi: int = 100) -> Path:
    """Write ``fig`` to ``out`` (parent directories created) and close it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out
