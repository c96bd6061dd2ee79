"""``finealign analyze gap``: the image-text modality gap of a contrastive checkpoint (MacCap).

MacCap trains its captioner on text embeddings t with noise, ``normalise(t + ε)``, ε ~ N(0, σ² I),
so that it also works on image embeddings at test time; σ² should match the image-text gap. For M
paired unit-norm embeddings (image i_m, its first caption's text t_m) in E dimensions:

    d_m = i_m - t_m                                   (M, E) per-pair differences
    μ_j = mean_m d_mj,   v_j = mean_m (d_mj - μ_j)²   per-dimension mean and (population) variance
    centred_var   = mean_j v_j                        σ² of one isotropic Gaussian N(μ, σ² I) fitted to d
    mean_shift_sq = mean_j μ_j² = ||μ||² / E          the systematic (mean) part of the gap
    uncentred_var = mean_j mean_m d_mj² = centred_var + mean_shift_sq
                  = mean_m ||d_m||² / E = (2 - 2 · mean pair cosine) / E     (unit-norm embeddings)
    gap_norm      = ||μ|| = ||mean(i) - mean(t)||      the "modality gap" vector's length

``suggested_noise_var`` is ``uncentred_var``: MacCap's noise has zero mean, so it must cover the mean
shift μ as well as the spread around it; with this σ², E||ε||² = E σ² equals the mean squared
image-text distance E||d||², i.e. a noisy text embedding lies (before re-normalisation) as far from
its caption as the paired image does. ``centred_var`` is what the noise would be if the mean shift
were removed first. Normality of the gap (MacCap assumes Gaussian) is summarised by the skewness and
excess kurtosis of the pooled centred differences c_mj = d_mj - μ_j (0 and 0 for a Gaussian; pooling
dimensions of unequal variance alone makes the kurtosis positive) and shown as a histogram with the
fitted N(0, centred_var) pdf and a QQ plot against normal quantiles.

Subregions (MacCap's finding 1): per image, cos(global, text) vs max_i cos(subregion_i, text) and
max_i cos(normalise(global + w · subregion_i), text), and how often the best one beats the global.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..zeroshot.features import aggregate, subregion_features


def gap_statistics(image_embed: Tensor, text_embed: Tensor) -> dict[str, Any]:
    """(M, E) image and (M, E) paired text embeddings -> the gap statistics of the module docstring."""
    if image_embed.shape != text_embed.shape or image_embed.dim() != 2:
        raise ValueError(f"need two (M, E) tensors of one shape, got {tuple(image_embed.shape)} and "
                         f"{tuple(text_embed.shape)}")
    M, E = image_embed.shape
    if M < 2:
        raise ValueError(f"the gap statistics need at least 2 pairs, got {M}")
    img, txt = image_embed.double(), text_embed.double()
    d = img - txt                                                          # (M, E)
    mu = d.mean(0)                                                         # (E,)
    c = d - mu                                                             # (M, E) centred
    var = c.pow(2).mean(0)                                                 # (E,) population variance
    centred_var = float(var.mean())
    pooled = c.flatten()
    m2 = float(pooled.pow(2).mean())
    skew = float(pooled.pow(3).mean()) / m2 ** 1.5 if m2 > 0 else 0.0
    kurt = float(pooled.pow(4).mean()) / m2 ** 2 - 3.0 if m2 > 0 else 0.0
    ni, nt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    pair = (ni * nt).sum(-1)                                               # (M,)
    all_sum = float(ni.sum(0) @ nt.sum(0))                                 # Σ_{m,n} cos(i_m, t_n)
    uncentred_var = float(d.pow(2).mean())
    return {
        "n_pairs": M, "embed_dim": E,
        "centred_var": centred_var,
        "uncentred_var": uncentred_var,
        "suggested_noise_var": uncentred_var,
        "mean_shift_sq": float(mu.pow(2).mean()),
        "gap_norm": float(mu.norm()),
        "pair_cos_mean": float(pair.mean()),
        "nonpair_cos_mean": (all_sum - float(pair.sum())) / (M * (M - 1)),
        "skewness": skew,
        "excess_kurtosis": kurt,
        "per_dim_mean": mu.tolist(),
        "per_dim_std": var.sqrt().tolist(),
    }


@torch.no_grad()
def subregion_similarities(model, images: Tensor, text_embed: Tensor, k: int = 10, w: float = 1.0
                           ) -> dict[str, Tensor]:
    """images (B, 3, S, S), paired text_embed (B, E) -> ``global_embed`` (B, E) and per-image cosines
    ``global`` (B,), ``best_subregion`` (B,), ``best_aggregate`` (B,) with the paired text."""
    if not (hasattr(model, "visual") and hasattr(model, "dense_image_embed")):
        raise ValueError(f"{type(model).__name__}: subregions need a coca-arch contrastive model "
                         "(model.visual and model.dense_image_embed)")
    g = model.encode_image(images, memory=False)["embed"].float()          # (B, E)
    _, patches, attn = model.visual(images, return_attn="full")            # attn (B, 1+N, 1+N)
    sub, _ = subregion_features(model.dense_image_embed(patches), attn, k,
                                model.global_attention(patches, attn))     # (B, k, E)
    agg = aggregate(g, sub.float(), w)                                     # (B, k, E)
    t = F.normalize(text_embed.float(), dim=-1)
    return {"global_embed": g, "global": (g * t).sum(-1),
            "best_subregion": torch.einsum("bke,be->bk", sub.float(), t).amax(1),
            "best_aggregate": torch.einsum("bke,be->bk", agg, t).amax(1)}


def summarise_subregions(glob: Tensor, best_sub: Tensor, best_agg: Tensor, k: int, w: float,
                         eps: float = 1e-6) -> dict[str, Any]:
    """Means of the per-image cosines and the fractions of images where the best subregion / best
    aggregate is closer to the paired text than the global embedding (by more than ``eps``, so that
    rounding ties, e.g. w = 0, do not count)."""
    return {"k": k, "w": w, "global_cos_mean": float(glob.mean()),
            "best_subregion_cos_mean": float(best_sub.mean()),
            "best_aggregate_cos_mean": float(best_agg.mean()),
            "subregion_beats_global": float((best_sub > glob + eps).float().mean()),
            "aggregate_beats_global": float((best_agg > glob + eps).float().mean())}


def subregion_vs_global(model, images: Tensor, text_embed: Tensor, k: int = 10, w: float = 1.0) -> dict[str, Any]:
    """Per image cos(global, text) vs max_i cos(subregion_i, text) and max_i cos(aggregate_i, text):
    means and the fraction of images where the best subregion / aggregate beats the global."""
    s = subregion_similarities(model, images, text_embed, k, w)
    return summarise_subregions(s["global"], s["best_subregion"], s["best_aggregate"], k, w)


def run_dir_of(checkpoint: str | Path) -> Path:
    """``RUN/checkpoints/step_N`` -> ``RUN``; any other path is its own run dir."""
    p = Path(checkpoint)
    return p.parent.parent if p.parent.name == "checkpoints" else p


def gap_json_path(run_dir: str | Path) -> Path:
    """Where ``run_gap_analysis`` writes by default (MacCap's ``maccap.noise_var=auto`` reads it)."""
    return run_dir_of(run_dir) / "gap" / "gap.json"


def _normal_quantiles(n: int) -> list[float]:
    probs = [(i + 0.5) / n for i in range(n)]
    try:
        from scipy.stats import norm
        return [float(x) for x in norm.ppf(probs)]
    except ImportError:
        from statistics import NormalDist
        return [NormalDist().inv_cdf(p) for p in probs]


def save_plots(centred: Tensor, sigma2: float, sims: dict[str, Tensor], out_dir: Path) -> list[Path]:
    """gap_hist.png, gap_qq.png and gap_subregions.png under ``out_dir``; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    x = centred.flatten().double().numpy()
    sigma = math.sqrt(max(sigma2, 1e-30))
    paths = [out_dir / "gap_hist.png", out_dir / "gap_qq.png", out_dir / "gap_subregions.png"]

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(x, bins=100, density=True, alpha=0.6, label="centred differences d - μ")
    grid = np.linspace(x.min(), x.max(), 400)
    ax.plot(grid, np.exp(-grid ** 2 / (2 * sigma ** 2)) / (sigma * math.sqrt(2 * math.pi)), "r-",
            label=f"N(0, σ²={sigma2:.3g})")
    ax.set_xlabel("per-dimension image - text difference, centred")
    ax.set_ylabel("density")
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    n = min(len(x), 2000)
    sample = np.quantile(x, [(i + 0.5) / n for i in range(n)])
    theory = np.asarray(_normal_quantiles(n))
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(theory, sample, ".", ms=3, label="centred differences")
    ax.plot(theory, theory * sigma, "r-", label="y = x·σ")
    ax.set_xlabel("standard normal quantile")
    ax.set_ylabel("sample quantile")
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 5))
    gl = sims["global"].numpy()
    ax.scatter(gl, sims["best_subregion"].numpy(), s=8, alpha=0.6, label="best subregion")
    ax.scatter(gl, sims["best_aggregate"].numpy(), s=8, alpha=0.6, label="best aggregate")
    lo = float(min(gl.min(), sims["best_subregion"].min(), sims["best_aggregate"].min()))
    hi = float(max(gl.max(), sims["best_subregion"].max(), sims["best_aggregate"].max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
    ax.set_xlabel("cos(global image, paired text)")
    ax.set_ylabel("max over subregions: cos(·, paired text)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[2], dpi=120)
    plt.close(fig)
    return paths


@torch.no_grad()
def run_gap_analysis(loaded, split: str | None = None, out_dir: str | Path | None = None,
                     max_images: int | None = None, progress: bool = True, k: int = 10,
                     w: float = 1.0) -> dict[str, Any]:
    """Embed ``split`` (default ``data.test``) of the checkpoint's data source (first caption of each
    image as its pair), write ``gap.json`` and the three plots to ``out_dir`` (default
    ``<run dir>/gap/``) and return the JSON dict (with ``files``)."""
    from ..data.loader import build_source, iter_eval_images
    from ..data.skips import SkipLog
    from ..data.transforms import ImageTransform
    cfg, model, tok = loaded.config, loaded.model, loaded.tokenizer
    split = split or cfg.data.test
    out = Path(out_dir) if out_dir else run_dir_of(loaded.path) / "gap"
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    skips = SkipLog(strict=cfg.data.strict)
    samples = build_source(cfg.data, split, skips)
    if max_images:
        samples = [s for _, s in zip(range(int(max_images)), samples)]
    img, txt, sims = [], [], {"global": [], "best_subregion": [], "best_aggregate": []}
    bar = tqdm(desc="gap", disable=not progress, unit="img", dynamic_ncols=True)
    try:
        for images, batch in iter_eval_images(samples, ImageTransform(cfg.model.image_size, train=False),
                                              cfg.data.eval_batch_size, cfg.data.workers, skips):
            caps = [next((" ".join(c.split()) for c in s.captions if c.split()), "") for s in batch]
            keep = [i for i, c in enumerate(caps) if c]
            if keep:
                ids, mask = tok.encode_batch([caps[i] for i in keep], cfg.model.context_length)
                t = model.encode_text(ids.to(device), mask.to(device))["embed"].float()
                s = subregion_similarities(model, images[keep].to(device), t, k, w)
                img.append(s.pop("global_embed").cpu())
                txt.append(t.cpu())
                for key in sims:
                    sims[key].append(s[key].cpu())
            bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    if len(img) == 0 or sum(len(x) for x in img) < 2:
        raise ValueError(f"gap analysis: fewer than 2 captioned images in split {split!r} of "
                         f"{cfg.data.root}: {skips.summary()}")
    image_embed, text_embed = torch.cat(img), torch.cat(txt)
    cat = {key: torch.cat(v) for key, v in sims.items()}
    res: dict[str, Any] = {"checkpoint": str(loaded.path), "split": split, "source": cfg.data.source}
    res.update(gap_statistics(image_embed, text_embed))
    res["subregions"] = summarise_subregions(cat["global"], cat["best_subregion"], cat["best_aggregate"], k, w)
    res["skipped"] = skips.to_dict()
    out.mkdir(parents=True, exist_ok=True)
    d = (image_embed - text_embed).double()
    files = save_plots(d - d.mean(0), res["centred_var"], cat, out)
    (out / "gap.json").write_text(json.dumps(res, indent=2, default=str))
    res["files"] = [str(out / "gap.json")] + [str(p) for p in files]
    return res


def format_gap_summary(res: dict[str, Any]) -> str:
    """A short plain-text table of the headline numbers."""
    sub = res.get("subregions", {})
    rows = [("pairs", f"{res['n_pairs']} ({res['split']})"),
            ("σ² centred (isotropic fit)", f"{res['centred_var']:.5g}"),
            ("suggested_noise_var (E d²)", f"{res['suggested_noise_var']:.5g}"),
            ("gap norm ||mean(i - t)||", f"{res['gap_norm']:.4f}"),
            ("cosine pair / non-pair", f"{res['pair_cos_mean']:.4f} / {res['nonpair_cos_mean']:.4f}"),
            ("skewness / excess kurtosis", f"{res['skewness']:.3f} / {res['excess_kurtosis']:.3f}")]
    if sub:
        rows += [(f"subregion beats global (k={sub['k']})", f"{sub['subregion_beats_global']:.3f}"),
                 (f"aggregate beats global (w={sub['w']})", f"{sub['aggregate_beats_global']:.3f}")]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{a:<{width}}  {b}" for a, b in rows)
