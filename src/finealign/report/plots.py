"""matplotlib figures of a report (Agg backend): training curves, run comparisons, ablation bar charts."""
from __future__ import annotations

import math
from pathlib import Path

from .inputs import Metrics

SCALARS = [("lr", "learning rate"), ("samples_per_s", "samples / s")]
OTHER = ["grad_norm", "itc/acc", "itc/logit_scale", "skipped"]


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, out: Path, plt) -> Path:
    from ..analysis.viz import save_figure
    fig.tight_layout()
    return save_figure(fig, out, plt, dpi=90)


def _grid(plt, n: int, cols: int = 3, size=(4.0, 2.8)):
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat[:n]


def _prefixes(m: Metrics) -> list[str]:
    """Logging prefixes in the metrics (``train``, ``val``, ...), train first."""
    pre = {k.split("/", 1)[0] for k in m.keys() if "/" in k}
    return sorted(pre, key=lambda p: (p != "train", p))


def loss_panels(m: Metrics) -> list[tuple[str, list[str]]]:
    """[(panel title, [metric keys drawn in it])]: the total loss, then one panel per objective."""
    pre = _prefixes(m)
    panels = [("total loss", [f"{p}/loss" for p in pre if m.series(f"{p}/loss")[0]])]
    panels += [(f"{obj} loss", [f"{p}/{obj}/loss" for p in pre if m.series(f"{p}/{obj}/loss")[0]])
               for obj in m.objectives()]
    return [(t, keys) for t, keys in panels if keys]


def training_curves(m: Metrics, out_dir: Path, stem: str) -> list[tuple[Path, str]]:
    """Loss per objective, learning rate + samples/s, other scalars -> [(png, caption)]."""
    plt = _plt()
    figs = []
    panels = loss_panels(m)
    if panels:
        fig, axes = _grid(plt, len(panels))
        for ax, (title, keys) in zip(axes, panels):
            for k in keys:
                ax.plot(*m.series(k), label=k.split("/", 1)[0], lw=1.2)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("step", fontsize=8)
            if len(keys) > 1:
                ax.legend(fontsize=7)
        figs.append((_save(fig, out_dir / f"{stem}_losses.png", plt),
                     "losses: " + ", ".join(t for t, _ in panels)))
    rate = [(f"train/{k}", t) for k, t in SCALARS if m.series(f"train/{k}")[0]]
    if rate:
        fig, axes = _grid(plt, len(rate), cols=2)
        for ax, (k, t) in zip(axes, rate):
            ax.plot(*m.series(k), lw=1.2, color="tab:green" if "lr" in k else "tab:purple")
            ax.set_title(t, fontsize=10)
            ax.set_xlabel("step", fontsize=8)
        figs.append((_save(fig, out_dir / f"{stem}_schedule.png", plt), " and ".join(t for _, t in rate)))
    other = [f"train/{k}" for k in OTHER if m.series(f"train/{k}")[0]]
    if other:
        fig, axes = _grid(plt, len(other), cols=4, size=(3.2, 2.4))
        for ax, k in zip(axes, other):
            ax.plot(*m.series(k), lw=1.0, color="tab:gray")
            ax.set_title(k.split("/", 1)[1], fontsize=9)
        figs.append((_save(fig, out_dir / f"{stem}_scalars.png", plt), "other logged scalars"))
    return figs


def compare_curves(runs: list[tuple[str, Metrics]], out: Path, groups: list[str] | None = None) -> Path | None:
    """Several runs overlaid: total loss, each objective's loss, learning rate, samples/s. ``groups``: one
    colour and legend entry per group (an ablation's seeds of one recipe); default: one per run."""
    keys: dict[str, str] = {"train/loss": "total loss"}
    for _, m in runs:
        keys.update({f"train/{o}/loss": f"{o} loss" for o in m.objectives()})
    keys.update({f"train/{k}": t for k, t in SCALARS})
    keys = {k: t for k, t in keys.items() if any(m.series(k)[0] for _, m in runs)}
    if not keys:
        return None
    groups = groups or [name for name, _ in runs]
    colour = {g: f"C{i % 10}" for i, g in enumerate(dict.fromkeys(groups))}
    plt = _plt()
    fig, axes = _grid(plt, len(keys) + 1)
    handles = {}
    for ax, (k, title) in zip(axes, keys.items()):
        for (name, m), g in zip(runs, groups):
            xs, ys = m.series(k)
            if xs:
                handles[g], = ax.plot(xs, ys, lw=1.1, color=colour[g], alpha=0.85)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
    axes[-1].axis("off")                                      # the last panel holds the one legend
    axes[-1].legend(list(handles.values()), list(handles), loc="center", fontsize=8, frameon=False)
    return _save(fig, out, plt)


def ablation_bars(rows: list[dict], metrics: list[tuple[str, str]], out: Path) -> Path | None:
    """One bar chart per metric: mean over seeds per recipe with ±std error bars."""
    shown = [(k, h) for k, h in metrics if any(r["metrics"].get(k) for r in rows)]
    if not shown:
        return None
    plt = _plt()
    fig, axes = _grid(plt, len(shown), cols=3, size=(max(3.2, 0.9 * len(rows) + 1.5), 3.0))
    names = [r["recipe"] for r in rows]
    for ax, (k, head) in zip(axes, shown):
        stats = [r["metrics"].get(k) or {} for r in rows]
        means = [s.get("mean", float("nan")) for s in stats]
        errs = [s.get("std", 0.0) for s in stats]
        ax.bar(range(len(rows)), means, yerr=errs, capsize=3, color=[f"C{i}" for i in range(len(rows))])
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(head, fontsize=10)
    return _save(fig, out, plt)
