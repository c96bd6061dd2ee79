"""The ablation table: per recipe, mean ± std over seeds of each metric (``finealign ablate`` writes it to
table.md and results.json; ablate.py runs the study)."""
from __future__ import annotations

import math
import statistics
from typing import Sequence

# (task, metric key, column header) in table order; a column no row has is left out of the table
METRICS = [("retrieval", "t2i_r1", "t2i R@1"), ("retrieval", "i2t_r1", "i2t R@1"),
           ("retrieval", "mean_recall", "mean R"), ("caption", "cider", "CIDEr"),
           ("caption", "bleu4", "BLEU-4"), ("tgir", "r10", "TGIR R@10"), ("tgir", "r50", "TGIR R@50"),
           ("classify", "top1", "top-1"), ("vqa", "accuracy", "VQA acc")]
# (metric keys are unique across tasks: a row's metrics are keyed by them)
MISSING = "–"


def summarize(results: Sequence[dict]) -> list[dict]:
    """Per recipe (in order of first appearance): mean ± sample std over seeds of each metric of METRICS.

    ``results``: run records ``{"recipe": name, "seed": k, "results": evaluate(...) output}``. A row is
    ``{"recipe", "seeds": [...], "metrics": {key: {"mean", "std", "n", "values"} or None}}``; std uses
    ddof=1 when n > 1, else 0; a metric no seed reported is None (shown as "–").
    """
    by_recipe: dict[str, list[dict]] = {}
    for r in results:
        by_recipe.setdefault(r["recipe"], []).append(r)
    rows = []
    for name, runs in by_recipe.items():
        metrics: dict[str, dict | None] = {}
        for task, key, _ in METRICS:
            vals = [float(v) for r in runs
                    if isinstance(v := (r["results"].get(task) or {}).get(key), (int, float))
                    and not isinstance(v, bool) and math.isfinite(v)]
            metrics[key] = None if not vals else {
                "mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                "n": len(vals), "values": vals}
        rows.append({"recipe": name, "seeds": [r["seed"] for r in runs], "metrics": metrics})
    return rows


def format_cell(stat: dict | None, digits: int = 1) -> str:
    """``12.3 ± 0.4`` (or "–" for a missing metric)."""
    if not stat:
        return MISSING
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def format_table(rows: Sequence[dict], digits: int = 1) -> str:
    """Markdown table: one row per recipe, one column per metric of METRICS that any row has."""
    cols = [(key, head) for _, key, head in METRICS if any(r["metrics"].get(key) for r in rows)]
    varied = list(rows[0].get("varied", {})) if rows else []
    lines = ["| " + " | ".join(["recipe"] + varied + [h for _, h in cols]) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(varied) + len(cols))) + "|"]
    for r in rows:
        cells = [r["recipe"]] + [str(r["varied"][k]) for k in varied] + [
            format_cell(r["metrics"].get(k), digits) for k, _ in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def footer(seeds: Sequence[int], common: dict, command: str | None) -> str:
    from .config_checks import PROCEDURAL_SOURCES
    where = ("generated" if common["data.source"] in PROCEDURAL_SOURCES else f"root {common['data.root']}")
    data = (f"{common['data.source']} ({where}, splits {common['data.train']}/"
            f"{common['data.val']}/{common['data.test']}, fraction {common['data.fraction']}, "
            f"num_samples {common['data.num_samples']}, data.seed {common['data.seed']})")
    line = (f"seeds: {', '.join(map(str, seeds))} · steps: {common['train.steps']} · batch: "
            f"{common['data.batch_size']} (grad_accum {common['train.grad_accum']}) · data: {data}")
    return line + (f" · command: `{command}`" if command else "")
