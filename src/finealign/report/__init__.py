"""``finealign report RUN_DIR [RUN_DIR...]``: one self-contained HTML page of runs (and ablation studies).

:func:`build_report` writes ``OUT.html`` (every image inlined as a ``data:image/png;base64`` URI; no external
CSS, scripts or fonts) and the PNGs behind it in ``OUT_files/`` beside it. Per run: training curves (loss per
objective, learning rate, samples/s), the evaluation results found in the run (see :mod:`.inputs`), and from
its latest checkpoint a retrieval grid, caption samples (captioning models), mask overlays (runs with
maskers), mixed samples (runs with a mixer) and the modality-gap plots when ``finealign analyze gap`` ran.
Several runs are compared side by side; an ablation directory renders its table and bar charts.
"""
from __future__ import annotations

import argparse
import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from .inputs import AblationDir, NotARunDir, RunDir, open_input

log = logging.getLogger("finealign")
__all__ = ["build_report", "NotARunDir", "add_report_parser", "cmd_report"]


def default_out(run_dirs: Sequence[str | Path]) -> Path:
    return Path(run_dirs[0]) / "report.html" if len(run_dirs) == 1 else Path("report.html")


def build_report(run_dirs: Sequence[str | Path], out: str | Path | None = None, split: str | None = None,
                 num: int = 6, run_eval: bool = False, progress: bool = True, command: str | None = None) -> Path:
    """Write the report of ``run_dirs`` (run or ablation directories) to ``out`` (default: RUN_DIR/report.html
    for one input, ./report.html for several) and its PNGs to ``<out stem>_files/``; returns ``out``.

    ``split``: the split the model views embed (default: each run's data.test); ``num``: queries of the
    retrieval grid and caption samples; ``run_eval``: first evaluate each run with a checkpoint on at most 64
    images of ``split`` (written to RUN_DIR/eval_<split>_report.json). Raises :class:`NotARunDir` (a
    ``ValueError``) naming the first input that is neither a run nor an ablation directory."""
    from tqdm.auto import tqdm
    from . import sections as S
    from .html import Section, render, table
    from .inputs import unique_names
    if not run_dirs:
        raise ValueError("finealign report needs at least one run directory")
    if num < 1:
        raise ValueError(f"--num must be at least 1, got {num}")
    inputs = [open_input(p) for p in run_dirs]                 # every input checked before any work
    out = Path(out) if out is not None else default_out(run_dirs)
    if out.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"{out}: the report is an HTML file (give --out NAME.html)")
    assets = out.with_name(out.stem + "_files")
    assets.mkdir(parents=True, exist_ok=True)
    runs = [i for i in inputs if isinstance(i, RunDir)]
    unique_names(runs)
    unique_names([i for i in inputs if isinstance(i, AblationDir)])     # their charts are files named after them
    if run_eval:
        for run in runs:
            quick_eval(run, split, progress)
        if len(runs) < len(inputs):
            log.info("report --eval: ablation studies are shown from their results.json (their runs were "
                     "evaluated by finealign ablate); pass a member's run directory to evaluate it again")
    top: list = []
    for ab in (i for i in inputs if isinstance(i, AblationDir)):
        members, missing = [], []
        for r in ab.results["runs"]:
            m = _member(ab, r)
            if m is None:
                missing.append(str(r.get("run_dir")))          # moved away: its table row stays
                continue
            m.name = f"{r.get('recipe', m.name)}/seed{r.get('seed', '?')}"
            members.append(m)
        top += S.ablation_sections(ab, assets, members, missing)
    if len(runs) > 1:
        top.append(S.comparison_section(runs, assets))
    columns = []
    for run in tqdm(runs, desc="report", disable=not progress or len(runs) < 2):
        about = Section("Run").html(table(["key", "value"], describe(run), cls="about"))
        secs = [about, S.curves_section(run, assets), S.eval_section(run)]
        secs += S.model_sections(run, assets, split, num, progress)
        gap = S.gap_section(run, assets)
        columns.append((run.name, secs + ([gap] if gap else [])))
    title = "finealign report: " + ", ".join(i.name for i in inputs)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta = f"generated {when}" + (f" by `{command}`" if command else "") + f"; PNGs in {assets.name}/"
    out.write_text(render(title, meta, top, columns), encoding="utf-8")
    return out


def _member(ab: AblationDir, r: dict) -> RunDir | None:
    """A run of an ablation: at its layout place OUT/RECIPE/seedK, else at its recorded run_dir (which is
    relative to where `finealign ablate` ran)."""
    places = [ab.path / str(r.get("recipe")) / f"seed{r.get('seed')}", Path(str(r.get("run_dir")))]
    for p in places:
        try:
            found = open_input(p)
        except NotARunDir:
            continue
        if isinstance(found, RunDir):
            return found
    return None


def describe(run: RunDir) -> list[list]:
    c = run.config
    get = lambda sec, key: (c.get(sec) or {}).get(key, "")          # noqa: E731
    objs = ", ".join(f"{k} ×{v.get('weight', 0)}" for k, v in (c.get("objectives") or {}).items()
                     if isinstance(v, dict) and v.get("weight", 0))
    masks = ", ".join(k for k, v in (c.get("masking") or {}).items() if isinstance(v, dict) and v)
    return [["directory", str(run.path)], ["recipe", c.get("recipe", "")],
            ["model", f"{get('model', 'arch')} (preset {get('model', 'preset') or '–'})"],
            ["data", f"{get('data', 'source')} ({get('data', 'root')})"], ["steps", get("train", "steps")],
            ["objectives", objs or "–"], ["maskers", masks or "–"], ["mixer", get("mixer", "type") or "–"],
            ["checkpoint", str(run.checkpoint.name) if run.checkpoint else "none"]]


def quick_eval(run: RunDir, split: str | None, progress: bool, max_images: int = 64) -> Path | None:
    """Evaluate the run's latest checkpoint (its eval.tasks) on at most ``max_images`` images of ``split``."""
    from ..api import load
    from ..eval.runner import evaluate
    from .inputs import find_evals
    if run.checkpoint is None:
        log.warning("report --eval: %s has no checkpoint; nothing evaluated", run.path)
        return None
    loaded = load(run.path)
    cfg = loaded.config
    cfg.eval.max_images = min(cfg.eval.max_images or max_images, max_images)
    split = split or cfg.data.test
    res = evaluate(loaded.model, loaded.tokenizer, cfg, split=split, progress=progress)
    res["report_eval"] = {"split": split, "max_images": cfg.eval.max_images, "checkpoint": loaded.path.name}
    path = run.path / f"eval_{Path(split).stem}_report.json"
    path.write_text(json.dumps(res, indent=2, default=str))
    run.evals = find_evals(run.path)
    return path


def add_report_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "report", help="one self-contained HTML report of runs or an ablation study",
        description="Write an HTML page (images inlined) and its PNGs (OUT_files/) for RUN_DIRs: training "
                    "curves, evaluations, retrieval grid, captions, masks, mixing, modality gap; several runs "
                    "side by side; an ablation directory as a comparison with its table and bar charts.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directory or ablation output directory")
    p.add_argument("--out", default=None, help="HTML file (default: RUN_DIR/report.html, or ./report.html "
                                               "for several inputs)")
    p.add_argument("--split", default=None, help="split the model views use (default: the run's data.test)")
    p.add_argument("--num", type=int, default=6, help="retrieval queries and caption samples (default: 6)")
    p.add_argument("--eval", action="store_true", help="first run a quick evaluation (≤64 images) of each run")
    p.add_argument("--no-progress", action="store_true")
    return p


def cmd_report(args) -> int:
    import shlex
    import sys
    cmd = "finealign " + " ".join(map(shlex.quote, sys.argv[1:])) if sys.argv[1:2] == ["report"] else None
    out = build_report(args.run_dirs, args.out, args.split, args.num, run_eval=args.eval,
                       progress=not args.no_progress, command=cmd)
    print(f"report written to {out} (PNGs in {out.with_name(out.stem + '_files')})")
    return 0
