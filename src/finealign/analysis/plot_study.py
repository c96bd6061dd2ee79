"""``finealign viz study``: a metric of an ablation study against a varied key, one line per series.

Reads the study's ``results.json`` (``finealign ablate``). Each row is a point at ``x = row["varied"][key]``
(the study's ``_study.yaml`` ``vary`` keys); rows are grouped into series by recipe name with the
trailing ``-<suffix>`` removed (``timix-25``, ``timix-50`` -> ``timix``). Points are the mean over
seeds with ± 1 sample std bars.
"""
from __future__ import annotations

import json
from pathlib import Path


def study_series(results: dict, x: str, metric: str) -> dict[str, list[tuple[float, float, float]]]:
    """``{series: [(x, mean, std), ...] sorted by x}`` for rows that have ``metric``."""
    series: dict[str, list[tuple[float, float, float]]] = {}
    for row in results["rows"]:
        varied = row.get("varied") or {}
        if x not in varied:
            raise ValueError(f"row {row['recipe']!r} has no varied key {x!r} (varied: {sorted(varied)}); "
                             f"declare it in the study's _study.yaml 'vary'")
        stat = (row.get("metrics") or {}).get(metric)
        if not stat:
            continue
        name = row["recipe"].rsplit("-", 1)[0]
        series.setdefault(name, []).append((float(varied[x]), stat["mean"], stat["std"]))
    if not series:
        known = sorted({k for row in results["rows"] for k, v in (row.get("metrics") or {}).items() if v})
        raise ValueError(f"no row reports metric {metric!r}; the rows report: {', '.join(known) or 'none'}")
    return {k: sorted(v) for k, v in series.items()}


def save_study_plot(results_path: str | Path, out: str | Path, x: str = "data.fraction",
                    metric: str = "t2i_r1", label: str | None = None) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    results_path = Path(results_path)
    if results_path.is_dir():                    # an ablation directory: its results.json
        results_path = results_path / "results.json"
    results = json.loads(results_path.read_text())
    series = study_series(results, x, metric)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, pts in series.items():
        xs, ms, ss = zip(*pts)
        ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=name)
    ax.set_xlabel(x)
    ax.set_ylabel(label or metric)
    seeds = len(results.get("seeds", []))
    ax.set_title(f"{label or metric} vs {x} ({seeds} seeds, mean ± std)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    from .viz import save_figure
    return save_figure(fig, out, plt)
