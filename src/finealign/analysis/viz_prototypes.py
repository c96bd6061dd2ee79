"""``finealign viz prototypes``: SemMIM's "high-level semantics in local patches" figure.

Every patch of a folder of images is assigned to its most probable prototype (argmax of the
softmax of ``model.patch_prototypes(images)``, (B, N, K) logits); the ``num`` prototypes used by
the most patches get one row each, showing the ``top`` patches with the highest probability for
that prototype (over all patches of all images), each as a crop of (2 * context + 1)^2 patches
around it with the patch itself outlined.

* ``select_prototype_patches(logits, num, top)``: the pure selection (testable without a model).
* ``prototype_counts(logits)``: (K,) number of patches assigned to each prototype.
* ``patch_crop(image, n, grid, patch, context)``: the pixels shown for one patch.
* ``prototype_logits(model, images)`` / ``save_prototype_figure(loaded, images_dir, out, ...)``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
NO_PROTO_HEAD = ("this checkpoint has no prototype head (model.prototypes = 0); "
                 "train a semmim recipe")

Selection = list[tuple[int, list[tuple[int, int, float]]]]


def prototype_counts(logits: Tensor) -> Tensor:
    """(B, N, K) logits -> (K,) long: patches whose argmax prototype is k."""
    if logits.ndim != 3:
        raise ValueError(f"expected (B, N, K) prototype logits, got shape {tuple(logits.shape)}")
    K = logits.shape[-1]
    return torch.bincount(logits.argmax(-1).flatten(), minlength=K)          # (K,)


def select_prototype_patches(logits: Tensor, num: int, top: int) -> Selection:
    """Most used prototypes and their most confident patches.

    logits: (B, N, K) patch prototype logits. Returns up to ``num`` entries ``(k, patches)`` for
    the prototypes that are the argmax of the most patches (descending count, ties -> lower k;
    prototypes no patch is assigned to are left out); ``patches`` holds up to ``top``
    ``(b, n, prob)`` with the highest softmax probability of prototype k over all B*N patches
    (descending, ties -> earlier (b, n)).
    """
    if num <= 0 or top <= 0:
        raise ValueError(f"num and top must be positive, got num={num}, top={top}")
    counts = prototype_counts(logits)                                         # (K,)
    B, N, K = logits.shape
    probs = torch.softmax(logits.detach().float(), dim=-1).reshape(B * N, K)  # (B*N, K)
    used = [k for k in sorted(range(K), key=lambda k: (-int(counts[k]), k)) if counts[k] > 0][:num]
    out: Selection = []
    for k in used:
        p = probs[:, k]                                                       # (B*N,)
        vals, idx = torch.sort(p, descending=True, stable=True)
        picks = [(int(i) // N, int(i) % N, float(v)) for v, i in zip(vals[:top], idx[:top])]
        out.append((k, picks))
    return out


def patch_crop(image: Tensor, n: int, grid: int, patch: int, context: int = 1,
               fill: float = 1.0) -> Tensor:
    """image (3, S, S) in [0, 1] -> (3, (2c+1)p, (2c+1)p): patch ``n`` (raster order of a
    ``grid`` x ``grid`` grid of ``patch`` pixels) with ``context`` patches around it; parts
    beyond the image border are ``fill``. The patch itself sits at [c*p, (c+1)*p) in both axes."""
    r, c = divmod(int(n), grid)
    m = context * patch
    padded = torch.full((image.shape[0], image.shape[1] + 2 * m, image.shape[2] + 2 * m), fill,
                        dtype=image.dtype)
    padded[:, m:m + image.shape[1], m:m + image.shape[2]] = image
    side = (2 * context + 1) * patch
    return padded[:, r * patch:r * patch + side, c * patch:c * patch + side]


def check_prototype_model(model) -> None:
    """Raise ValueError unless ``model`` has a prototype head and ``patch_prototypes``."""
    if getattr(model, "proto_head", None) is None or not hasattr(model, "patch_prototypes"):
        raise ValueError(NO_PROTO_HEAD)


def _device(model) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def prototype_logits(model, images: Tensor, batch_size: int = 32) -> Tensor:
    """images (B, 3, S, S) normalised -> (B, N, K) float logits on the CPU."""
    check_prototype_model(model)
    model.eval()
    dev = _device(model)
    outs = [model.patch_prototypes(images[i:i + batch_size].to(dev)).float().cpu()
            for i in range(0, images.shape[0], batch_size)]
    return torch.cat(outs)


def image_paths(images_dir: str | Path) -> list[Path]:
    root = Path(images_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--images {images_dir}: not a directory")
    paths = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no .png/.jpg images in {images_dir}")
    return paths


def load_images(paths: Sequence[Path], image_size: int) -> Tensor:
    """Files -> (B, 3, S, S) with the evaluation transform."""
    from PIL import Image
    from ..data.transforms import ImageTransform, to_rgb
    t = ImageTransform(image_size, train=False)
    out = []
    for p in paths:
        with Image.open(p) as im:
            im.load()
            out.append(t(to_rgb(im)))
    return torch.stack(out)


def save_prototype_figure(loaded, images_dir: str | Path, out: str | Path, num: int = 8,
                          top: int = 6, context: int = 1) -> Path:
    """One row per selected prototype, ``top`` outlined patch crops each; writes ``out`` (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    from ..data.transforms import denormalize

    model, cfg = loaded.model, loaded.config
    check_prototype_model(model)
    paths = image_paths(images_dir)
    size = int(cfg.model.image_size)
    images = load_images(paths, size)                                         # (B, 3, S, S)
    # the head gives cosines in [-1, 1]: probabilities are shown at the student temperature the semantic
    # MIM / agreement objectives use (objectives.*.student_temp, default 0.1), as training sees them
    objectives = getattr(cfg, "objectives", None) or {}
    temp = float(objectives.get("semantic_mim", objectives.get("agreement", {})).get("student_temp", 0.1))
    logits = prototype_logits(model, images) / temp                           # (B, N, K)
    g = int(model.visual.grid)
    if logits.shape[1] != g * g:
        raise ValueError(f"patch_prototypes gave {logits.shape[1]} patches, expected {g}x{g}")
    p = size // g
    sel = select_prototype_patches(logits, num, top)
    counts = prototype_counts(logits)
    shown = denormalize(images)                                               # (B, 3, S, S) in [0, 1]

    rows, cols = len(sel), top
    fig, axes = plt.subplots(rows, cols, figsize=(1.7 * cols + 0.6, 1.8 * rows + 0.4), squeeze=False)
    for row, (k, picks) in zip(axes, sel):
        for j, ax in enumerate(row):
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(f"proto {k}\n{int(counts[k])} patches", fontsize=8)
            if j >= len(picks):
                ax.axis("off")
                continue
            b, n, prob = picks[j]
            crop = patch_crop(shown[b], n, g, p, context)
            ax.imshow(crop.permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.add_patch(Rectangle((context * p - 0.5, context * p - 0.5), p, p, fill=False,
                                   edgecolor="red", linewidth=1.5))
            ax.set_title(f"{paths[b].name[:14]} {prob:.2f}", fontsize=7)
    fig.suptitle(f"top {rows} prototypes by patch count ({len(paths)} images, "
                 f"{logits.shape[1]} patches each, K={logits.shape[2]})", fontsize=9)
    fig.tight_layout()
    from .viz import save_figure
    return save_figure(fig, out, plt)
