"""``finealign viz masks`` for fusion models: synchronized masking (SyncMask) or text-guided MIM (SemMIM).

Panels: the image; the teacher's cross-attention of the masked words (summed over them) as a heat map;
the image with the masked patches greyed out; the MIM reconstruction (when the model has a pixel image
decoder) or, for semantic MIM (SemMIM), the teacher's prototype of every masked patch beside the student's
prediction (one colour per prototype id); and the caption with the masked words highlighted, so one sees that the words and the
patches they describe are hidden together.
"""
from __future__ import annotations

import torch

from ..masking import build_masker
from ..masking.sync import SynchronizedMasker
from ..masking.text import special_positions
from ..pipeline import Pipeline
from ..types import Batch

DEFAULT_SYNC = {"words": 0.15, "patches": 0.25, "layer": -1}


@torch.no_grad()
def sync_panels(model, tokenizer, cfg, image: torch.Tensor, text: str) -> dict:
    """image (3, S, S) normalised, caption -> {"attention" (g, g), "mim" MaskIndices, "tokens" [(str, masked)],
    "reconstruction" (3, S, S) or absent, "grid", "patch"}."""
    model.eval()
    ids, tmask = tokenizer.encode_batch([text], cfg.model.context_length)
    batch = Batch(images=image[None], text=ids, text_mask=tmask, image_ids=torch.zeros(1, dtype=torch.long),
                  item_ids=torch.zeros(1, dtype=torch.long), captions=[text], keys=["viz"])
    feats = model.encode(batch)
    special = special_positions(ids, tokenizer.special_ids)
    if not cfg.masking.sync and cfg.masking.mim:    # SemMIM: text-guided patches, no words
        attn = model.cross_attention(feats, batch)                                # (1, T, N)
        mim = build_masker(cfg.masking.mim)(Pipeline(model, cfg.masking, tokenizer).relevance(feats, batch))
        positions = torch.zeros(0, 2, dtype=torch.long)
    else:
        masker = SynchronizedMasker(**(cfg.masking.sync or DEFAULT_SYNC))
        attn = model.cross_attention(feats, batch, masker.layer)                  # (1, T, N)
        positions, mim = masker(attn, tmask.bool(), special)
    chosen = positions[:, 1].tolist()
    p, g = cfg.model.patch_size, model.visual.grid
    heat = attn[0, chosen].sum(0) if chosen else attn[0].sum(0)                   # (N,)
    real = [i for i in range(ids.shape[1]) if tmask[0, i] and not special[0, i]]
    tokens = [(tokenizer.decode([int(ids[0, i])]).strip() or "·", i in chosen) for i in real]
    out = {"attention": heat.reshape(g, g), "mim": mim, "tokens": tokens, "grid": g, "patch": p}
    if getattr(model, "image_decoder", None) is not None:
        masked_text = ids                                                         # SemMIM: no word is masked
        if len(positions):
            from ..masking.text import corrupt_tokens
            masked_text = corrupt_tokens(ids, positions, mask_id=tokenizer.mask_id, vocab_size=tokenizer.vocab_size,
                                         special_ids=tokenizer.special_ids, replace_ratio=(1.0, 0.0, 0.0))
        extras = model.heads(feats, batch, {"mim": mim, "mlm": (masked_text, positions)},
                             needs={"mim_pred"}).extras
        pred = extras["mim_pred"][0]                                              # (M, 3p²) or (M, K)
        if "mim_teacher_logits" in extras:                                        # semantic targets
            out["prototypes"] = {"student": pred.argmax(-1), "teacher": extras["mim_teacher_logits"][0].argmax(-1)}
        else:
            from .viz import _norm_pix, reconstruction
            out["reconstruction"] = reconstruction(image, pred, mim.masked[0], p, g, _norm_pix(cfg))
    return out


def prototype_overlay(shown: torch.Tensor, masked: torch.Tensor, ids: torch.Tensor, p: int, g: int) -> torch.Tensor:
    """shown (3, S, S) in [0, 1]; each masked patch filled with a colour fixed by its prototype id (the same
    id gets the same colour in every panel), visible patches washed out to near white."""
    img = shown.clone() * 0.15 + 0.8
    gen = torch.Generator()
    for i, k in zip(masked.tolist(), ids.tolist()):
        gen.manual_seed(int(k))
        r, c = divmod(i, g)
        img[:, r * p:(r + 1) * p, c * p:(c + 1) * p] = (0.2 + 0.8 * torch.rand(3, generator=gen))[:, None, None]
    return img


def draw_sync_figure(loaded, image: torch.Tensor, text: str, plt):
    """The matplotlib figure for ``sync_panels`` (the caller saves it)."""
    from ..data.transforms import denormalize
    from .viz import _shade, tile_figure
    panels = sync_panels(loaded.model, loaded.tokenizer, loaded.config, image, text)
    p, g = panels["patch"], panels["grid"]
    shown = denormalize(image)
    tiles = [("image", shown.permute(1, 2, 0)),
             ("teacher attention of masked words" if "prototypes" not in panels
              else "teacher attention of the caption", panels["attention"]),
             ("masked patches", _shade(shown, panels["mim"].masked[0], p, g).permute(1, 2, 0))]
    if "reconstruction" in panels:
        tiles.append(("MIM reconstruction", denormalize(panels["reconstruction"]).permute(1, 2, 0)))
    if "prototypes" in panels:
        masked, pr = panels["mim"].masked[0], panels["prototypes"]
        hits = int((pr["student"] == pr["teacher"]).sum())
        tiles.append(("teacher prototype per masked patch", prototype_overlay(shown, masked, pr["teacher"], p, g)
                      .permute(1, 2, 0)))
        tiles.append((f"student prediction ({hits}/{len(masked)} agree)",
                      prototype_overlay(shown, masked, pr["student"], p, g).permute(1, 2, 0)))
    fig = tile_figure(plt, tiles, height=3.8)
    # the caption, masked words on a highlighted box, laid out left to right across the figure
    x = 0.02
    for word, masked in panels["tokens"]:
        fig.text(x, 0.04, word, fontsize=11, color="white" if masked else "black",
                     bbox=dict(facecolor="crimson", edgecolor="none", pad=1.5) if masked else None)
        x += 0.012 * (len(word) + 1) * (4 / len(tiles))
        if x > 0.95:
            break
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig, panels
